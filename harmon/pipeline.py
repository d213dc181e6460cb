"""The user-facing object: :class:`Harmon` = network + tokenizer + device, with ``generate`` and
``answer``.

    >>> from harmon import Harmon
    >>> model = Harmon.from_pretrained("tiny")            # random weights, for trying the API
    >>> images = model.generate(["a red circle"], seed=0)  # list of PIL images
    >>> model.answer(images, ["What is in the image?"])    # list of strings
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from . import checkpoints
from .configs import HarmonConfig, PRESETS, preset
from .data.shapeworld import complete_prompt, prompt_questions
from .fast import FastHeadSampler
from .generate import REFINE_FRACTION, REFINE_STEPS, StepInfo, sample_tokens, to_uint8
from .models.harmon import HarmonModel
from .rng import TorchDraws
from .tokenizer import (BRIEF_CAPTION_QUESTION, CAPTION_QUESTION, HarmonTokenizer,
                        byte_level_tokenizer, pad_ids)
from .understand import SCORE_METHODS, answer_log_likelihood, decode, image_embeddings, preprocess

SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "shapeworld"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None)
                                  and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device type {dev.type!r}; expected cpu, cuda or mps")
    return dev


def _size_pair(size) -> tuple[int, int]:
    """An image size given as S or (H, W) -> (H, W) of Python ints; anything else is an error."""
    pair = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                             for v in pair):
        raise ValueError(f"size must be an int or a (height, width) pair of ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPUs."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str):
        dtype = dtype.lower().removeprefix("torch.")
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def random_model(cfg: HarmonConfig, seed: int = 0) -> HarmonModel:
    """A randomly initialised model (the from-scratch initialisation of every part)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HarmonModel(cfg)
        model.mar.initialize_weights()
        model.vae.initialize_weights()
    return model.eval()


def _image_list(images) -> list:
    """One image (PIL, path, (H, W, 3) array) or many (a sequence, or a (B, H, W, 3) uint8
    array / tensor) -> a list of single images."""
    if getattr(images, "ndim", None) == 4:
        return list(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
    if isinstance(images, (str, Path, Image.Image)) or hasattr(images, "shape"):
        return [images]
    return list(images)


class Harmon:
    """A ready-to-use Harmon: ``generate`` images from text and ``answer`` questions on images."""

    def __init__(self, model: HarmonModel, tokenizer: HarmonTokenizer, name: str = "harmon",
                 trained: bool = True, provenance: str = "", answer_instruction: str = "",
                 sampling: dict[str, float | int | str] | None = None):
        if tokenizer.vocab_size > model.cfg.llm.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                             f"embedding table only {model.cfg.llm.vocab_size} rows")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.trained = trained
        self.provenance = provenance  # how the weights were made ("trained_by" in config.json)
        # the line the model's training questions ended with; answer() appends it by default
        self.answer_instruction = answer_instruction
        # generate()'s cfg, temperature, candidates, rerank and name_colors when the call gives
        # none: the paper's, unless these weights were measured to draw better with others
        # (config.json "sampling")
        self.sampling = {**checkpoints.PAPER_SAMPLING, **checkpoints.check_sampling(sampling or {})}
        self._fast_heads: dict[tuple, FastHeadSampler] = {}

    # ---- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_preset: str | Path | None = None, *, device=None, dtype=None,
                        vae: str | Path | None = None, tokenizer: str | Path | None = None,
                        config: HarmonConfig | None = None, seed: int = 0,
                        strict: bool = True) -> "Harmon":
        """Load a model.

        Args:
            path_or_preset: a preset name (``tiny``, ``harmon-0.5b``, ``harmon-1.5b``: random
                weights), a model directory (ours or Hugging Face), a native ``harmon_*.pth``, or
                None for the model shipped with the package.
            device: ``cpu``, ``cuda``, ``mps`` or ``auto`` (default).
            dtype: default float32 on CPU, bfloat16 on GPUs.
            vae: ``kl16.ckpt`` for native files (default: beside the ``.pth``).
            tokenizer: a directory with ``tokenizer.json`` (default: the model directory, or the
                directory of the ``.pth``).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if path_or_preset is None:
            if not (SHIPPED_MODEL_DIR / checkpoints.CONFIG_FILE).is_file():
                raise FileNotFoundError("this install ships no trained model yet; load a preset "
                                        f"({', '.join(PRESETS)}) or a checkpoint path")
            path_or_preset = SHIPPED_MODEL_DIR
        if isinstance(path_or_preset, str) and path_or_preset.lower() in {
                *PRESETS, "0.5b", "1.5b", "harmon_0.5b", "harmon_1.5b"} \
                and not Path(path_or_preset).exists():
            cfg = config or preset(path_or_preset)
            model = random_model(cfg, seed).to(device=dev, dtype=dt)
            tok = HarmonTokenizer.from_dir(tokenizer) if tokenizer else byte_level_tokenizer()
            return cls(model, tok, name=f"{cfg.name} (random weights)", trained=False)
        path = Path(path_or_preset)
        if not path.exists():
            raise FileNotFoundError(f"no model at {path}: expected a preset name "
                                    f"({', '.join(PRESETS)}), a model directory or a .pth file")
        model = checkpoints.load_harmon(path, vae=vae, config=config, device=dev, dtype=dt,
                                        strict=strict)
        tok_dir = Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent)
        notes = checkpoints.read_notes(path)
        return cls(model, HarmonTokenizer.from_dir(tok_dir), name=path.name,
                   provenance=notes.get("trained_by", ""),
                   answer_instruction=notes.get("answer_instruction", ""),
                   sampling=checkpoints.read_sampling(path))

    def save_pretrained(self, path: str | Path, *, int8: bool = False) -> Path:
        """Write config.json, model.safetensors and tokenizer.json to ``path`` (``int8``: weight
        matrices in int8 with per-row scales, half the bytes of float16)."""
        extra = {k: v for k, v in (("trained_by", self.provenance),
                                   ("answer_instruction", self.answer_instruction)) if v}
        own = {k: v for k, v in self.sampling.items() if v != checkpoints.PAPER_SAMPLING[k]}
        if own:
            extra["sampling"] = own
        return checkpoints.save_pretrained(self.model, path, self.tokenizer, extra_config=extra,
                                           int8=int8)

    def to(self, device=None, dtype=None) -> "Harmon":
        dev = resolve_device(device) if device is not None else self.device
        self.model.to(device=dev, dtype=resolve_dtype(dtype, dev) if dtype else self.model.dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cfg(self) -> HarmonConfig:
        return self.model.cfg

    def info(self) -> dict:
        """Name, device, dtype and parameter counts per part."""
        parts = {"vae": self.model.vae, "mar_encoder_decoder": self.model.mar,
                 "diffusion_head": self.model.mar.diffloss, "llm": self.model.llm,
                 "connectors": torch.nn.ModuleList([self.model.proj_in, self.model.proj_out])}
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        counts["mar_encoder_decoder"] -= counts["diffusion_head"]
        return {"name": self.name, "trained": self.trained, "provenance": self.provenance,
                "answer_instruction": self.answer_instruction, "sampling": dict(self.sampling),
                "device": str(self.device),
                "dtype": str(self.model.dtype).replace("torch.", ""),
                "image_size": self.cfg.image_size, "local_conv": self.cfg.mar.local_conv,
                "parameters": counts,
                "total_parameters": sum(p.numel() for p in self.model.parameters())}

    # ---- text to image ---------------------------------------------------------------------

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        return torch.Generator(self.device).manual_seed(int(seed))

    def _prompt_batch(self, texts: Sequence[str], guided: bool):
        rows = [self.tokenizer.generation_ids(t) for t in texts]
        if guided:
            rows += [self.tokenizer.unconditional_ids()] * len(rows)
        ids, mask = pad_ids(rows, self.tokenizer.pad_id)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, num_images_per_prompt: int = 1,
                 candidates: int | None = None, rerank: str | None = None,
                 name_colors: bool | None = None,
                 size: int | tuple[int, int] | None = None, steps: int | None = None,
                 cfg: float | None = None, cfg_schedule: str = "constant",
                 temperature: float | None = None, seed: int | None = None,
                 generator: torch.Generator | None = None,
                 on_step: Callable[[StepInfo], None] | None = None,
                 output: str = "pil", mode: str = "fast", compile: bool = False,
                 head_steps: int | None = None, head_sampler: str = "ddpm",
                 head_eta: float = 0.0, refine: int = 0,
                 refine_fraction: float = REFINE_FRACTION,
                 refine_steps: int = REFINE_STEPS) -> list[Image.Image] | torch.Tensor:
        """Generate images.

        Args:
            prompts: one prompt or a list; each gives ``num_images_per_prompt`` images.
            candidates: draw this many images for every image returned and keep the one the
                model itself finds most like its prompt (:meth:`score`: the understanding path
                reads each candidate); 1 returns the first draw. The candidates of
                ``generate(p, candidates=C, seed=s)`` are ``generate(p, candidates=1,
                num_images_per_prompt=C, seed=s)``; the cost is C images and C scores.
            rerank: how the candidates are read (:meth:`score`'s ``method``).
            name_colors: name a colour for every object the prompt names none for, drawn for each
                image from the colours the ShapeWorld model was trained on
                (:func:`harmon.data.shapeworld.complete_prompt`: "three circles" is drawn as
                "three yellow circles"); prompts outside ShapeWorld's caption grammar are drawn
                as given. Each image's ``info["prompt"]`` is the text it was drawn from.
            size: an int (square) or (height, width), multiples of 16; default the model's.
            steps: K, the number of masked-generation steps (default 64, the paper's; at most
                the number of tokens, which is also the default for images of fewer tokens).
            cfg: guidance scale (>= 1; 1 disables guidance); cfg_schedule "constant" or "linear".
            temperature: of the diffusion head's draws (> 0).
                cfg, temperature, candidates, rerank and name_colors default to the model's
                :attr:`sampling`: the paper's 3, 1, one draw and the prompt as given, unless
                the weights' ``config.json`` names others (the shipped model does).
            seed / generator: same seed, same device, same images.
            on_step: called after every step with a :class:`~harmon.generate.StepInfo`.
            output: "pil" (list of images, prompt-major) or "uint8" ((B, H, W, 3) tensor).
            mode: "fast" (default: the same tokens as the reference up to float rounding, with
                less work per step) or "reference" (the reference algorithm, op for op).
            compile: with mode "fast", compile the diffusion head's reverse process in chunks
                of steps (``torch.compile``): the same tokens, faster per step, after a one-time
                compilation (30-50 s on a 2-core CPU; torch caches it on disk).
            head_steps: with mode "fast", the diffusion head's reverse steps (default: the
                model's 100). Fewer steps are faster and approximate (not the reference's output).
            head_sampler: with mode "fast", "ddpm" (the reference's ancestral update) or "ddim"
                (approximate, for few head steps); head_eta is DDIM's noise level (0..1).
            refine: rounds of self-correction after the K steps (default 0: the paper's
                algorithm). Each round re-masks the ``refine_fraction`` of each image's tokens
                that the model finds fit the rest worst and samples them again in
                ``refine_steps`` steps (:func:`harmon.generate.sample_tokens`); a round runs the
                network 4 times to measure the fit, then ``refine_steps`` sampling steps.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompt given: pass a string or a non-empty list of strings")
        cfg = self.sampling["cfg"] if cfg is None else cfg
        temperature = self.sampling["temperature"] if temperature is None else temperature
        candidates = self.sampling["candidates"] if candidates is None else candidates
        rerank = self.sampling["rerank"] if rerank is None else rerank
        name_colors = self.sampling["name_colors"] if name_colors is None else name_colors
        for name, v in (("num_images_per_prompt", num_images_per_prompt),
                        ("candidates", candidates)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(cfg, numbers.Real) or not math.isfinite(cfg) or cfg < 1:
            raise ValueError(f"cfg must be a finite number >= 1 (1 disables guidance), got {cfg!r}")
        if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
                or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if rerank not in SCORE_METHODS:
            raise ValueError(f"rerank must be one of {SCORE_METHODS}, got {rerank!r}")
        if not isinstance(name_colors, bool):
            raise ValueError(f"name_colors must be True or False, got {name_colors!r}")
        if output not in ("pil", "uint8"):
            raise ValueError(f"output must be 'pil' or 'uint8', got {output!r}")
        if mode not in ("fast", "reference"):
            raise ValueError(f"mode must be 'fast' or 'reference', got {mode!r}")
        if head_steps is not None and (mode != "fast" or not 1 <= head_steps <= 1000):
            raise ValueError(f"head_steps={head_steps!r} needs mode='fast' and 1 <= head_steps "
                             "<= 1000")
        if compile and mode != "fast":
            raise ValueError("compile=True needs mode='fast' (the reference mode runs op for op)")
        if (head_sampler, head_eta) != ("ddpm", 0.0) and mode != "fast":
            raise ValueError("head_sampler / head_eta need mode='fast'")
        h, w = _size_pair(size if size is not None else self.cfg.image_size)
        grid = self.model.grid_for(h, w)
        if steps is None:
            steps = min(64, grid[0] * grid[1])
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) \
                or not 1 <= steps <= grid[0] * grid[1]:
            raise ValueError(f"steps must be an integer in [1, {grid[0] * grid[1]}] (the image's "
                             f"{grid[0]}x{grid[1]} tokens), got {steps!r}")
        n = num_images_per_prompt * candidates  # drawn per prompt, prompt-major
        draws = TorchDraws(self._generator(seed, generator))
        texts = [p for p in prompts for _ in range(n)]
        if name_colors:
            pick = lambda options: options[int(draws.randint(len(options), ()))]  # noqa: E731
            texts = [complete_prompt(t, pick) for t in texts]
        ids, mask = self._prompt_batch(texts, cfg != 1.0)
        head = None
        if mode == "fast":
            key = (compile, head_steps, head_sampler, float(head_eta))
            if key not in self._fast_heads:
                self._fast_heads[key] = FastHeadSampler(self.model.mar.diffloss, compile,
                                                        head_steps, head_sampler, head_eta)
            head = self._fast_heads[key]
            self.model.mar.pos_cache = {}  # position tables resized once per call
        try:
            tokens = sample_tokens(self.model, ids, mask, grid, draws, num_iter=steps, cfg=cfg,
                                   cfg_schedule=cfg_schedule, temperature=temperature,
                                   on_step=on_step, head_sampler=head,
                                   fast_step=mode == "fast", refine=refine,
                                   refine_fraction=refine_fraction, refine_steps=refine_steps)
        finally:
            self.model.mar.pos_cache = None
        images = to_uint8(self.model.decode_tokens(tokens[:len(texts)], grid).float()).cpu()
        if candidates > 1:
            best = self._best_candidates(images, texts, candidates, rerank)
            images, texts = images[best], [texts[i] for i in best.tolist()]
        if output == "uint8":
            return images
        out = [Image.fromarray(im.numpy()) for im in images]
        for im, text in zip(out, texts):
            im.info["prompt"] = text
        return out

    def _best_candidates(self, images: torch.Tensor, texts: list[str], candidates: int,
                         method: str) -> torch.Tensor:
        """(P * n * C, H, W, 3) prompt-major draws and the text each was drawn from -> (P * n,)
        indices of the best of each C, each read against its own text."""
        scores = self.score(images, texts, method=method).view(-1, candidates)  # (P * n, C)
        return scores.argmax(dim=1) + torch.arange(scores.shape[0]) * candidates

    def preview(self, info: StepInfo, grid: tuple[int, int]) -> list[Image.Image]:
        """Decode the tokens known so far (masked ones at zero) to images, for live previews."""
        with torch.no_grad():
            tokens = info.tokens * (1 - info.mask[..., None])
            P = tokens.shape[0] // 2 if info.cfg != 1.0 else tokens.shape[0]
            imgs = to_uint8(self.model.decode_tokens(tokens[:P], grid).float()).cpu()
        return [Image.fromarray(im.numpy()) for im in imgs]

    # ---- image to text ---------------------------------------------------------------------

    @torch.no_grad()
    def answer(self, images, questions: str | Sequence[str], *, size: int | None = None,
               max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None,
               instruction: str | None = None) -> list[str]:
        """Answer one question per image (a single question is asked of every image).

        Images may be PIL images, paths, (H, W, 3) uint8 arrays or one (B, H, W, 3) uint8
        array or tensor. Greedy decoding by default;
        ``do_sample=True`` samples with ``temperature`` and ``top_p``. ``instruction`` is
        appended to each question on a line of its own unless the question already holds it;
        None means the model's own (:attr:`answer_instruction`: the shipped model's questions
        were trained with LLaVA's short-answer instruction, and without it it answers with a
        caption), "" means none: the question exactly as given.
        """
        images = _image_list(images)
        if not images:
            raise ValueError("no image given")
        if isinstance(questions, str):
            questions = [questions] * len(images)
        questions = list(questions)
        if len(questions) != len(images):
            raise ValueError(f"got {len(images)} image(s) but {len(questions)} question(s); pass "
                             "one question per image or a single question for all")
        questions = self._with_instruction(questions, instruction)
        img = self._image_inputs(images, size)  # (B, N+64, H)
        rows = [self.tokenizer.question_ids(q, img.shape[1]) for q in questions]
        ids, mask = pad_ids(rows, self.tokenizer.pad_id, left=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.splice_images(ids, img, self.tokenizer.image_id)
        gen = self._generator(seed, None) if do_sample else None
        new = decode(self.model, embeds, mask, self.tokenizer.im_end_id, max_new_tokens,
                     do_sample, temperature, top_p, gen)
        return [self.tokenizer.decode(r).strip() for r in new]

    @torch.no_grad()
    def score(self, images, texts: str | Sequence[str], *, method: str = "yes",
              size: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """How well each text describes its image, in the model's own judgement.

        The understanding path reads the image and the LLM is teacher-forced on an answer; the
        score is a log-probability (nats) of that answer:

        - ``method="yes"`` (default): the answer to "Is there {text} in the image?" (with the
          model's answer instruction) starting with "yes" or "Yes": VQAScore's P(yes) in the
          model's own yes/no question format; any wording works, the trained ones best.
        - ``method="caption"``: the text itself, to its end of turn, as the answer to "Describe
          the image briefly." (whose training answers are prompt-like captions: "a red circle
          and a blue star"). The end of turn counts, so an image with more than the text names
          scores lower; a text that leaves out what every caption says (the shipped model's
          always name colours) is unlikely for every image.
        - ``method="questions"``: the text taken apart into the questions the model was
          trained to answer (TIFA's idea, with ShapeWorld's caption grammar for the parsing:
          :func:`harmon.data.shapeworld.prompt_questions`: how many of each shape, is each
          coloured one there, what colour is each shape named once), the log-likelihoods of
          their answers summed. "three circles" is asked "How many circles are there in the
          image?", which the model counts well, rather than "Is there three circles in the
          image?", which it reads as "are there circles". A text outside that grammar is
          scored as by "yes".

        Compare scores of one text across images (as ``generate(candidates=...)`` does).

        Args:
            images: PIL images, paths, (H, W, 3) uint8 arrays, or a (B, H, W, 3) uint8
                array or tensor.
            texts: one text per image, or one for all.
        Returns:
            (B,) float32 on the CPU, higher = better match.
        """
        images = _image_list(images)
        texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
        if not images or len(texts) != len(images):
            raise ValueError(f"score needs one text per image (or one for all), got "
                             f"{len(images)} image(s) and {len(texts)} text(s)")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("every text to score must be a non-empty string")
        if method not in SCORE_METHODS:
            raise ValueError(f"unknown scoring method {method!r}; expected one of {SCORE_METHODS}")
        end = [self.tokenizer.im_end_id]
        out = []
        for b in range(0, len(images), batch_size):
            chunk = texts[b: b + batch_size]
            img = self._image_inputs(images[b: b + batch_size], size)  # (b, N+64, H)
            if method == "caption":
                out.append(self._answer_log_likelihood(img, [
                    (BRIEF_CAPTION_QUESTION, self.tokenizer.encode(t.strip()) + end)
                    for t in chunk]))
                continue
            if method == "questions":
                out.append(self._questions_score(img, chunk))
                continue
            out.append(self._yes_score(img, chunk))
        return torch.cat(out)

    def _yes_score(self, img: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, N+64, H) image inputs, B texts -> (B,) log p(yes | "Is there TEXT in the image?")."""
        questions = self._with_instruction([f"Is there {t.strip()} in the image?" for t in texts])
        yes = [self._answer_log_likelihood(img, [(q, self.tokenizer.encode(word))
                                                 for q in questions])
               for word in ("yes", "Yes")]
        return torch.logaddexp(*yes)

    def _questions_score(self, img: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, N+64, H) image inputs, B texts -> (B,) summed answer log-likelihoods of each
        text's questions (:func:`prompt_questions`); "yes" scores for texts it cannot parse."""
        checks = [prompt_questions(t) for t in texts]
        out = torch.zeros(len(texts))
        other = [i for i, c in enumerate(checks) if c is None]
        if other:
            out[other] = self._yes_score(img[other], [texts[i] for i in other])
        owner = [i for i, c in enumerate(checks) if c is not None for _ in c]
        if owner:
            qa = [qa for c in checks if c is not None for qa in c]
            questions = self._with_instruction([q for q, _ in qa])
            ll = self._answer_log_likelihood(img[owner], [
                (q, self.tokenizer.encode(a)) for q, (_, a) in zip(questions, qa)])
            out.index_add_(0, torch.tensor(owner), ll)
        return out

    def _with_instruction(self, questions: list, instruction: str | None = None) -> list:
        """Each question with the answer instruction on a line of its own (None: the model's;
        "": none), unless it already holds it; non-strings and blanks are left for the caller."""
        extra = self.answer_instruction if instruction is None else instruction
        if not extra:
            return questions
        return [q if not isinstance(q, str) or not q.strip() or extra in q
                else f"{q.rstrip()}\n{extra}" for q in questions]

    def _pixels(self, images: list, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> ((B, 3, S, S) in [-1, 1] on the model's device, token grid); S = ``size`` or
        the model's image size, checked against the VAE stride first."""
        size = size or self.cfg.image_size
        grid = self.model.grid_for(size)
        return torch.stack([preprocess(im, size) for im in images]).to(self.device), grid

    def _image_inputs(self, images: list, size: int | None) -> torch.Tensor:
        """Images -> (B, N+64, H) LLM inputs of the understanding path."""
        return image_embeddings(self.model, self._pixels(images, size)[0])

    def _answer_log_likelihood(self, img: torch.Tensor, qa: list[tuple[str, list[int]]]
                               ) -> torch.Tensor:
        """(B, N+64, H) image inputs and B (question, answer ids) -> (B,) answer log-likelihoods."""
        rows = [(self.tokenizer.question_ids(q, img.shape[1]), a) for q, a in qa]
        L = max(len(q) + len(a) for q, a in rows)
        ids = torch.full((len(rows), L), self.tokenizer.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), L), -100, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for i, (q, a) in enumerate(rows):  # right padded: no generation follows
            ids[i, : len(q) + len(a)] = torch.tensor(q + a)
            targets[i, len(q): len(q) + len(a)] = torch.tensor(a)
            mask[i, : len(q) + len(a)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self.model.splice_images(ids, img, self.tokenizer.image_id)
        return answer_log_likelihood(self.model, embeds, mask, targets.to(self.device)).cpu()

    def caption(self, images, **kwargs) -> list[str]:
        """Describe each image (the reference's demo question)."""
        images = _image_list(images)
        # captions were trained without an answer instruction
        return self.answer(images, [CAPTION_QUESTION] * len(images), instruction="", **kwargs)

    @torch.no_grad()
    def reconstruct(self, images, *, size: int | None = None) -> list[Image.Image]:
        """Each image through the VAE and back (posterior mean): what of an image the latents
        the generator draws can hold; padded to square and resized to ``size`` (default: the
        model's image size) as the understanding path does."""
        images = _image_list(images)
        if not images:
            raise ValueError("no image given")
        pixels, grid = self._pixels(images, size)
        tokens = self.model.encode_images(pixels.to(self.model.vae_dtype()))
        out = to_uint8(self.model.decode_tokens(tokens, grid).float()).cpu()
        return [Image.fromarray(im.numpy()) for im in out]

    def __repr__(self) -> str:
        i = self.info()
        return (f"Harmon({i['name']!r}, device={i['device']}, dtype={i['dtype']}, "
                f"params={i['total_parameters'] / 1e6:.1f}M)")
