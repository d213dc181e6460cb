"""Every weight format Harmon ships in, and the project's own.

Formats read:
- native release: ``harmon_*.pth`` (flat state dict without ``vae.``) + ``kl16.ckpt`` (a dict
  whose ``model`` entry is the VAE state dict);
- Hugging Face directories (``config.json`` with ``llm`` and ``mar`` sections, ``model.safetensors``
  or sharded ``model-0000x-of-0000y.safetensors`` with an index, keys with ``vae.``);
- the project's own directories (same layout, plus a ``vae`` section and ``tokenizer.json``),
  written by :func:`save_pretrained`.

Models are built on the meta device and the loaded tensors are assigned in place, so a large
model is never held twice in memory (``.pth`` files are memory-mapped).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .configs import HarmonConfig, preset
from .models.harmon import HarmonModel
from .understand import SCORE_METHODS

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


# ----------------------------------------------------------------------------------------------
# reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.ckpt``/``.bin`` or ``.safetensors`` file, or of a directory
    holding ``model.safetensors`` (or shards with ``model.safetensors.index.json``).

    Torch pickles are loaded with ``weights_only=True`` and memory-mapped. A dict wrapping the
    weights under ``model``/``state_dict``/``module`` is unwrapped.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_dir(path)
    if path.suffix == ".safetensors":
        return _read_safetensors([path])
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for non-checkpoints; old files cannot be mmapped
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(_unreadable(path, e)) from None
    return _unwrap(obj, path)


def _unreadable(path: Path, e: Exception) -> str:
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        # a pickle with Python objects besides tensors: never executed here
        return (f"{path} holds Python objects besides tensors (e.g. {found.group(1)}), which "
                "harmon does not unpickle (weights_only=True). If you trust the file, re-save its "
                "tensors once: "
                f"python -c \"import torch; sd = torch.load('{path}', weights_only=False); "
                f"torch.save({{k: v for k, v in sd.items() if isinstance(v, (dict, torch.Tensor))}}, "
                f"'{path.with_suffix('.tensors' + path.suffix)}')\"")
    # torch's weights-only message is a paragraph of advice; its cause is after "error:"
    cause = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0] or text[:200]
    return (f"{path} is not a readable PyTorch or safetensors checkpoint ({type(e).__name__}: "
            f"{cause[:300]})")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    # strip a DDP wrapper prefix
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return dequantize_int8(out)


#: Prefix of the per-row scales of a weight stored in int8 (:func:`quantize_int8`).
INT8_SCALE = "int8_scale."


def quantize_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight matrices, convolution kernels and embedding tables (``*.weight`` of 2+ dims) as
    int8 with one float32 scale per output row (absmax / 127), under ``int8_scale.KEY``; every
    other tensor (biases, norms, position tables) as it is. Half the bytes of float16; the
    rounding error of a weight is at most half a step of its row's scale."""
    out = {}
    for k, w in sd.items():
        if not (k.endswith(".weight") and w.ndim >= 2 and w.is_floating_point()):
            out[k] = w
            continue
        rows = w.detach().float().reshape(w.shape[0], -1)
        # float32 scales: a zero-initialised layer's rows (scale 0) and tiny ones stay exact
        scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-30)
        out[k] = (rows / scale).round().clamp(-127, 127).to(torch.int8).reshape(w.shape)
        out[INT8_SCALE + k] = scale.reshape(-1)
    return out


def dequantize_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`quantize_int8` (float32 weights); a state dict without int8 weights
    is returned as it is."""
    scales = {k[len(INT8_SCALE):]: v for k, v in sd.items() if k.startswith(INT8_SCALE)}
    if not scales:
        return sd
    out = {k: v for k, v in sd.items() if not k.startswith(INT8_SCALE)}
    for k, scale in scales.items():
        if k not in out or out[k].dtype != torch.int8 or scale.numel() != out[k].shape[0]:
            raise CheckpointError(f"{INT8_SCALE}{k} scales no int8 weight of {scale.numel()} rows "
                                  "named " + repr(k))
        w = out[k]
        out[k] = (w.float().reshape(w.shape[0], -1) * scale.float()[:, None]).reshape(w.shape)
    return out


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) {missing} named in {index.name} are missing")
        return _read_safetensors([path / s for s in shards])
    single = path / MODEL_FILE
    if single.is_file():
        return _read_safetensors([single])
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if shards:
        return _read_safetensors(shards)
    for name in ("pytorch_model.bin", "model.pth"):
        if (path / name).is_file():
            return read_state_dict(path / name)
    raise FileNotFoundError(f"{path} holds no weights (expected {MODEL_FILE}, sharded "
                            "model-*.safetensors with an index, or pytorch_model.bin)")


def _config_json(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f} holds {type(d).__name__}, expected a JSON object")
    return d


def read_config(path: str | Path) -> HarmonConfig:
    """The :class:`HarmonConfig` of a model directory (ours or Hugging Face's)."""
    d = _config_json(path)
    return HarmonConfig.from_dict(d.get("model", d))


# ----------------------------------------------------------------------------------------------
# building and assigning


def empty_model(cfg: HarmonConfig) -> HarmonModel:
    """A model whose parameters live on the meta device (no memory)."""
    with torch.device("meta"):
        return HarmonModel(cfg)


def expected_shapes(cfg: HarmonConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in empty_model(cfg).state_dict().items()}


def infer_config(state_dict: dict[str, torch.Tensor]) -> HarmonConfig:
    """The preset whose parameter shapes match a (VAE-less) Harmon state dict.

    The preset is chosen by the shapes of the keys it knows (at least 90% of its weights present,
    every one of them of its shape), so a checkpoint with a few extra or missing keys is still
    recognised and :func:`load_weights` then names those keys.
    """
    keys = [k for k in state_dict if not k.startswith("vae.")]
    for name in ("harmon-0.5b", "harmon-1.5b", "tiny"):
        cfg = preset(name)
        shapes = {k: v for k, v in expected_shapes(cfg).items() if not k.startswith("vae.")}
        known = [k for k in keys if k in shapes]
        if len(known) >= 0.9 * len(shapes) and all(shapes[k] == tuple(state_dict[k].shape)
                                                    for k in known):
            return cfg
    width = state_dict.get("proj_in.0.weight")
    raise CheckpointError("the checkpoint matches no preset (harmon-0.5b, harmon-1.5b, tiny); "
                          f"proj_in.0.weight has shape "
                          f"{None if width is None else tuple(width.shape)}. Pass config=...")


def load_weights(model: HarmonModel, state_dict: dict[str, torch.Tensor], *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 strict: bool = True, source: str = "checkpoint") -> HarmonModel:
    """Assign ``state_dict`` into a (meta or real) ``model``, converting each tensor on the way.

    Missing keys are an error (a tied ``llm.lm_head.weight`` may be absent); unexpected keys are an
    error when ``strict``, else a warning. Shape mismatches always fail, naming the key.
    """
    own = model.state_dict()
    tied = model.cfg.llm.tie_word_embeddings
    sd = dict(state_dict)
    if tied:
        sd.pop("llm.lm_head.weight", None)
    wanted = {k for k in own if not (tied and k == "llm.lm_head.weight")}
    missing = sorted(wanted - set(sd))
    unexpected = sorted(set(sd) - set(own))
    # shapes first: a checkpoint of another size should be named as such, not as missing keys
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sorted(wanted & set(sd))
           if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k, got, exp = bad[0]
        raise CheckpointError(f"{source} does not fit the {model.cfg.name} model: {len(bad)} "
                              f"weight(s) differ in shape, e.g. {k} is {got}, expected {exp}")
    if missing:
        also = (f"; it also has {len(unexpected)} weight(s) the model does not know, e.g. "
                f"{unexpected[:8]}" if unexpected else "")
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) the model needs, e.g. "
                              f"{missing[:8]}{also}" + _hint(missing, unexpected))
    if unexpected:
        msg = (f"{source} has {len(unexpected)} weight(s) the model does not know, e.g. "
               f"{unexpected[:8]}")
        if strict:
            raise CheckpointError(msg + _hint(missing, unexpected)
                                  + " (strict=False loads it and ignores them)")
        warnings.warn(msg + " (ignored)")
    device = torch.device(device)
    converted = {}
    for k in wanted:
        t = sd.pop(k)
        # keep floating weights in the target dtype; integer buffers as they are
        converted[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    model.load_state_dict(converted, strict=False, assign=True)
    tie_and_materialize(model, device)
    return model


def _hint(missing: list[str], unexpected: list[str]) -> str:
    if missing and all(k.startswith("vae.") for k in missing):
        return " -- the VAE weights are missing: pass the kl16.ckpt file (vae=...)"
    if any(k.startswith(("model.", "lm_head.")) for k in unexpected):
        return " -- this looks like a bare Qwen2 checkpoint, not a Harmon one"
    return ""


def tie_and_materialize(model: HarmonModel, device: torch.device) -> None:
    """Re-tie the output embedding and build the buffers a state dict does not carry."""
    from .models.llm import tie_output_embedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    tie_output_embedding(model.llm)
    if any(b.is_meta for b in model.llm.model.rotary_emb.buffers()):
        # built on the CPU then moved: the constructor's signature differs between versions
        model.llm.model.rotary_emb = Qwen2RotaryEmbedding(config=model.llm.config).to(device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta]
    if still_meta:
        raise CheckpointError(f"weights never loaded: {still_meta[:8]}")


def load_harmon(path: str | Path, *, vae: str | Path | None = None,
                config: HarmonConfig | None = None, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, strict: bool = True) -> HarmonModel:
    """Load a Harmon model from any supported format.

    Args:
        path: a native ``.pth`` file, or a model directory (Hugging Face or ours).
        vae: ``kl16.ckpt`` for native files (default: ``kl16.ckpt`` beside ``path``).
        config: the architecture; default: the directory's config.json, or the preset whose shapes
            match a native file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        cfg = config or read_config(path)
        sd = read_state_dict(path)
        if vae is not None:
            sd.update(_vae_file_weights(vae))
        elif (path / TRAINING_STATE).is_file():
            sd = _training_checkpoint_weights(path, sd)
    else:
        sd = read_state_dict(path)
        if not any(k.startswith(("llm.", "mar.", "proj_in.", "proj_out.")) for k in sd):
            raise CheckpointError(f"{path} is not a Harmon checkpoint: it has no llm./mar./proj_* "
                                  f"weights (first keys: {sorted(sd)[:4]})"
                                  + _hint([], sorted(sd)))
        cfg = config or infer_config(sd)
        if not any(k.startswith("vae.") for k in sd):
            vae = Path(vae) if vae is not None else path.parent / "kl16.ckpt"
            if not vae.exists():
                raise FileNotFoundError(
                    f"{path.name} holds no VAE weights and no VAE file was found at {vae}; pass "
                    "vae=PATH to kl16.ckpt")
            sd.update(_vae_file_weights(vae))
    model = empty_model(cfg)
    load_weights(model, sd, device=device, dtype=dtype, strict=strict, source=str(path))
    return model.eval()


def _vae_file_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A VAE file's tensors (kl16.ckpt), under the model's ``vae.`` prefix."""
    return {"vae." + k: v for k, v in read_state_dict(path).items()}


TRAINING_STATE = "state.json"  # marks a checkpoint written by harmon.train during a run


def _training_checkpoint_weights(path: Path, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training checkpoint (``runs/NAME/checkpoints/step_*``) holds the trained weights, their
    EMA and no VAE (it never trains). The loaded model is what the run would export at that step:
    the EMA weights where kept, and the VAE from the file or model the run took it from."""
    ema = path / "ema.safetensors"
    if ema.is_file():
        sd.update(_read_safetensors([ema]))
    if any(k.startswith("vae.") for k in sd):
        return sd
    model_cfg = json.loads((path / TRAINING_STATE).read_text()).get("config", {}).get("model", {})
    source = model_cfg.get("vae") or model_cfg.get("init")
    if not source:
        raise CheckpointError(f"{path} is a training checkpoint without VAE weights, and its run "
                              "used a random VAE; pass vae=PATH (kl16.ckpt)")
    if not Path(source).exists():
        raise CheckpointError(f"{path} is a training checkpoint without VAE weights; its run took "
                              f"the VAE from {source}, which does not exist from here (paths are "
                              "relative to where the run started); pass vae=PATH")
    if model_cfg.get("vae"):
        return {**sd, **_vae_file_weights(source)}
    vae_sd = {k: v for k, v in read_state_dict(source).items() if k.startswith("vae.")}
    beside = Path(source).parent / "kl16.ckpt"  # a native .pth keeps its VAE beside it
    if not vae_sd and Path(source).is_file() and beside.is_file():
        vae_sd = _vae_file_weights(beside)
    if not vae_sd:
        raise CheckpointError(f"{path} is a training checkpoint without VAE weights, and its "
                              f"run's init {source} holds none either; pass vae=PATH")
    return {**sd, **vae_sd}


#: Notes a directory in our format may carry beside its config, and what they say:
#: ``trained_by`` how the weights were made; ``answer_instruction`` the line the model's training
#: questions ended with (e.g. LLaVA's short-answer instruction), which ``Harmon.answer`` appends.
NOTE_KEYS = ("trained_by", "answer_instruction")


def read_notes(path: str | Path) -> dict[str, str]:
    """The notes (:data:`NOTE_KEYS`) of a directory in our format; {} for anything else."""
    if not (Path(path) / CONFIG_FILE).is_file():
        return {}
    d = _config_json(path)
    if d.get("format") != "harmon":
        return {}
    return {k: str(d[k]) for k in NOTE_KEYS if d.get(k)}


#: The paper's sampling settings, which ``Harmon.generate`` uses unless a model directory says
#: otherwise in its ``sampling`` entry (as a Hugging Face ``generation_config.json`` does):
#: guidance scale, head temperature, one draw per image (``candidates``: best of N by the
#: model's own reading, ``rerank`` saying how it reads them; the paper does not do this) and the
#: prompt drawn as given (``name_colors``: ShapeWorld prompts completed with the colours they
#: leave free; the paper does not do this either).
PAPER_SAMPLING = {"cfg": 3.0, "temperature": 1.0, "candidates": 1, "rerank": "yes",
                  "name_colors": False}


def check_sampling(sampling, where: str = "sampling") -> dict[str, float | int | str]:
    """``sampling`` ({"cfg": >= 1, "temperature": > 0, "candidates": an integer >= 1, "rerank":
    one of :data:`~harmon.understand.SCORE_METHODS`, "name_colors": true or false}, every key
    optional) with cfg and temperature as floats, or a ValueError naming ``where`` and what is
    wrong."""
    if not isinstance(sampling, dict):
        raise ValueError(f"{where} must be a mapping like {{\"temperature\": 0.8}}, got "
                         f"{sampling!r}")
    unknown = set(sampling) - set(PAPER_SAMPLING)
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; expected some of "
                         f"{list(PAPER_SAMPLING)}")
    out = {}
    for k, v in sampling.items():
        if k == "rerank":
            if v not in SCORE_METHODS:
                raise ValueError(f"{where}: rerank must be one of {list(SCORE_METHODS)}, got "
                                 f"{v!r}")
            out[k] = v
            continue
        if k == "name_colors":
            if not isinstance(v, bool):
                raise ValueError(f"{where}: name_colors must be true or false, got {v!r}")
            out[k] = v
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if k == "candidates":
            if not (number and float(v).is_integer() and v >= 1):
                raise ValueError(f"{where}: candidates must be an integer >= 1, got {v!r}")
            out[k] = int(v)
            continue
        low, what = (1.0, ">= 1") if k == "cfg" else (0.0, "> 0")
        if not (number and (v >= low if k == "cfg" else v > low)):
            raise ValueError(f"{where}: {k} must be a finite number {what}, got {v!r}")
        out[k] = float(v)
    return out


def read_sampling(path: str | Path) -> dict[str, float | int | str]:
    """The ``sampling`` defaults of a directory in our format (checked); {} where it has none."""
    if not (Path(path) / CONFIG_FILE).is_file():
        return {}
    d = _config_json(path)
    if d.get("format") != "harmon" or "sampling" not in d:
        return {}
    return check_sampling(d["sampling"], f"'sampling' in {Path(path) / CONFIG_FILE}")


# ----------------------------------------------------------------------------------------------
# writing


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with the permissions any other new file gets here.

    Why: safetensors creates its files readable by their owner only (0600), so a model saved
    for a shared install, or one shipped, could not be read by anyone else.
    """
    path = Path(path)
    path.open("wb").close()  # created as open() creates files: 0666 less the umask
    mode = path.stat().st_mode & 0o777
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(mode)


def save_pretrained(model: HarmonModel, path: str | Path, tokenizer=None,
                    extra_config: dict | None = None, int8: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) to a directory.

    The tied output embedding is stored once; ``int8`` stores the weight matrices in int8 with
    per-row scales (:func:`quantize_int8`; loading gives float weights back). Existing files are
    replaced only after the new ones are fully written, so an interrupted save never destroys a
    previous model.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.llm.tie_word_embeddings:
        sd.pop("llm.lm_head.weight", None)
    if int8:
        sd = quantize_int8(sd)
    cfg = {"format": "harmon", "model": model.cfg.to_dict(), **(extra_config or {})}
    tmp = path / (MODEL_FILE + ".tmp")
    write_safetensors(sd, tmp, metadata={"format": "pt"})
    tmp.replace(path / MODEL_FILE)
    tmp_cfg = path / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(json.dumps(cfg, indent=1))
    tmp_cfg.replace(path / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save(path)
    return path
