"""Training data: sources, deterministic streams, tokenisation and micro-batch collation.

Everything a micro-batch holds is a pure function of ``(run seed, global micro-batch index G)``, so
a run can restart at any step and see exactly the data it would have seen (exact resume), and the
same global batch is produced whatever the number of processes (DDP == one process).

Layers, bottom up:

- **Sources** read items by index: :class:`ShapeWorldSource` (infinite, procedural), and from disk
  :class:`JsonlSource` (``{"image", "caption"}`` or ``{"image", "conversations"}`` per line),
  :class:`LlavaSource` (a LLaVA JSON list of ``{"image", "conversations"}``),
  :class:`WebDatasetSource` (``.tar`` shards of ``key.jpg`` + ``key.txt`` / ``key.json``) and
  :class:`TextSource` (``{"text"}`` or ``{"conversations"}`` lines).
- **Streams** (:class:`Stream`) make a finite source infinite: epoch ``e`` visits the items in the
  permutation drawn from ``(seed, e)``. An unreadable item is skipped for the next position, counted,
  and reported (the first few with a warning); the run goes on.
- **Tasks** (:class:`TaskStream`) interleave the sources of one task by integer weights.
- **Schedule** (:class:`Schedule`): the global micro-batch index G picks the task from the repeating
  pattern ``[text] * r0 + [i2t] * r1 + [t2i] * r2`` and the task's running micro-batch count.
- **Micro-batches** (:class:`MicroBatches`): a map-style dataset, item G = one collated batch.

Prompt formats (training.md §2): t2i = chat("Generate an image: {caption}") cut to 128 ids, 10%
replaced by chat("Generate an image."), right-padded with <|im_end|>; i2t = the Qwen chat turns with
``<image>`` expanded to N + 64 placeholder ids (-200), labels only on the answers and their
<|im_end|>.
"""

from __future__ import annotations

import glob
import io
from array import array
import json
import os
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..tokenizer import (GENERATE_PROMPT, IM_END, IM_START, IMAGE, SPECIAL_TOKENS,
                         UNCONDITIONAL_PROMPT, HarmonTokenizer, chat)
from ..understand import PAD_GRAY
from .config import TASKS, DataConfig, SourceConfig

IMAGE_TOKEN_ID = -200  # placeholder id of the image positions in i2t input_ids (HarmonModel default)
IGNORE_INDEX = -100
MAX_CONSECUTIVE_BAD = 1000  # a source whose next 1000 items are all unreadable is an error
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SOURCE_EXTS = {"jsonl": (".jsonl",), "llava": (".json",), "webdataset": (".tar",), "text": (".jsonl",)}

# Instructions paired with dense captions in i2t caption data. Our own paraphrases of the
# "describe in detail" kind (the reference's exact list is not published; training.md §2.1).
CAPTION_INSTRUCTIONS = (
    "Describe the image in detail.",
    "Give a detailed description of this image.",
    "What is shown in this picture? Describe it thoroughly.",
    "Provide a comprehensive description of the image.",
    "Describe everything you see in the image.",
    "Write a detailed caption for this image.",
    "Explain the contents of the image in detail.",
    "Describe this picture, including its objects and their arrangement.",
    "Tell me what this image depicts, in detail.",
    "Give an elaborate account of the scene in the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Describe the visual content of this image carefully.",
    "Analyze the image and describe its contents in detail.",
)


class BadItem(Exception):
    """An item that cannot be used (missing or corrupt image, empty text, too long...)."""


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (stable across machines and Python versions)."""
    a, b = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2)
    return int((int(a) << 31) ^ int(b)) & 0x7FFFFFFFFFFFFFFF


# ----------------------------------------------------------------------------------------------
# images


def open_image(source) -> Image.Image:
    """Decode an image (path, bytes or PIL) to RGB, raising :class:`BadItem` if it cannot."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    try:
        if isinstance(source, (bytes, bytearray)):
            with Image.open(io.BytesIO(source)) as im:
                return im.convert("RGB")
        if not os.path.isfile(source):
            raise BadItem(f"image {source} does not exist")
        with Image.open(source) as im:
            return im.convert("RGB")
    except BadItem:
        raise
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise BadItem(f"image {source if isinstance(source, str) else '<bytes>'} is unreadable: "
                      f"{type(e).__name__}: {e}") from None


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return 2.0 * x - 1.0


def crop_square(im: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Generation transform: a random square crop of the shorter side, resized to ``size``."""
    w, h = im.size
    side = min(w, h)
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    im = im.crop((x0, y0, x0 + side, y0 + side))
    if side != size:
        im = im.resize((size, size), Image.BICUBIC)
    return to_tensor(im)


def pad_square(im: Image.Image, size: int) -> torch.Tensor:
    """Understanding transform: pad to a square with gray 127 (centred), resize to ``size``."""
    w, h = im.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), (PAD_GRAY,) * 3)
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    if side != size:
        im = im.resize((size, size), Image.BICUBIC)
    return to_tensor(im)


# ----------------------------------------------------------------------------------------------
# sources: item(i) -> dict with some of "image" (PIL / path / bytes), "caption", "conversations",
# "text"; num_items() is None for endless sources


def _expand_paths(path: str, exts: tuple[str, ...]) -> list[Path]:
    """Files named by a file, a directory (its files with ``exts``, sorted) or a glob."""
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path))
    elif p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in exts)
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"data path {path} does not exist")
    if not files:
        raise FileNotFoundError(f"data path {path} holds no {'/'.join(exts)} file")
    return files


class ShapeWorldSource:
    """ShapeWorld scenes (:mod:`harmon.data.shapeworld`): t2i captions, VQA conversations, and a
    text-only task (rewrite a detailed scene description as a short caption)."""

    synthetic = True  # rendered at the training size: no size / aspect filtering

    def __init__(self, task: str, size: int, seed: int, turns: int = 1,
                 qtype_weights: dict[str, float] | None = None,
                 kind_weights: dict[str, float] | None = None,
                 style_weights: dict[str, float] | None = None, pair_order: bool = False,
                 paraphrase: bool = False, and_horizontal: bool = False,
                 flaw_prob: float = 0.0):
        from ..data.shapeworld import DEFAULT_KIND_WEIGHTS, ShapeWorld

        self.task, self.turns, self.qtype_weights = task, turns, qtype_weights or None
        self.style_weights = style_weights or None
        self.world = ShapeWorld(size=size, seed=seed,
                                kind_weights=kind_weights or dict(DEFAULT_KIND_WEIGHTS),
                                pair_order=pair_order, paraphrase=paraphrase,
                                and_horizontal=and_horizontal, flaw_prob=flaw_prob)

    def num_items(self) -> int | None:
        return None  # endless

    def item(self, i: int) -> dict:
        if self.task == "t2i":
            it = self.world.t2i_item(i, self.style_weights)
            return {"image": it["image"], "caption": it["caption"]}
        if self.task == "i2t":
            it = self.world.vqa_item(i, self.qtype_weights, turns=self.turns)
            return {"image": it["image"], "conversations": it["conversations"]}
        caps = self.world.sample(i).captions
        return {"conversations": [
            {"from": "human", "value": "Rewrite this scene description as a short caption: "
                                       + caps["detailed"]},
            {"from": "gpt", "value": caps["short"]}]}


class JsonlSource:
    """One JSON object per line: ``image`` (path) + ``caption`` / ``conversations`` / ``text``.

    Relative image paths start at ``image_root`` (default: the directory of the .jsonl file). Only
    line offsets are kept in memory; lines are parsed when read.
    """

    def __init__(self, path: str, image_root: str = ""):
        self.files = _expand_paths(path, SOURCE_EXTS["jsonl"])
        # compact arrays (8 + 4 bytes a line): tens of millions of lines fit, and forked
        # DataLoader workers share them
        self.offsets, self.file_of = array("q"), array("i")
        for n, f in enumerate(self.files):
            with open(f, "rb") as fh:
                off = 0
                for line in fh:
                    if line.strip():
                        self.offsets.append(off)
                        self.file_of.append(n)
                    off += len(line)
        if not self.offsets:
            raise ValueError(f"data path {path} holds no JSON line")
        self.image_root = image_root

    def num_items(self) -> int | None:
        return len(self.offsets)

    def item(self, i: int) -> dict:
        n, off = self.file_of[i], self.offsets[i]
        with open(self.files[n], "rb") as fh:
            fh.seek(off)
            line = fh.readline()
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadItem(f"{self.files[n]} at byte {off}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise BadItem(f"{self.files[n]} at byte {off}: expected a JSON object")
        return _resolve_image(d, Path(self.image_root) if self.image_root else self.files[n].parent)


def _has_image(raw: dict) -> bool:
    im = raw.get("image")
    return im is not None and not (isinstance(im, (str, bytes)) and not im)


def _resolve_image(d: dict, root: Path) -> dict:
    d = dict(d)
    if isinstance(d.get("image"), list):  # LLaVA multi-image entries: we take the first image
        d["image"] = d["image"][0] if d["image"] else None
    im = d.get("image")
    if im is not None and not isinstance(im, str):
        raise BadItem(f"the item's image must be a path (a string), got {type(im).__name__} "
                      f"{str(im)[:40]!r}")
    if im:
        d["image"] = str(root / im)
    return d


class LlavaSource:
    """A LLaVA-style JSON list: ``[{"id", "image", "conversations": [{"from", "value"}...]}]``."""

    def __init__(self, path: str, image_root: str = ""):
        self.items: list[dict] = []
        self.roots: list[Path] = []
        for f in _expand_paths(path, SOURCE_EXTS["llava"]):
            try:
                data = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f} is not valid JSON: {e}") from None
            if not isinstance(data, list):
                raise ValueError(f"{f}: a LLaVA file holds a JSON list of conversations")
            self.items += data
            self.roots += [Path(image_root) if image_root else f.parent] * len(data)
        if not self.items:
            raise ValueError(f"data path {path} holds no conversation")

    def num_items(self) -> int | None:
        return len(self.items)

    def item(self, i: int) -> dict:
        d = self.items[i]
        if not isinstance(d, dict):
            raise BadItem(f"LLaVA entry {i} is not a JSON object")
        return _resolve_image(d, self.roots[i])


class WebDatasetSource:
    """``.tar`` shards in webdataset layout: members ``KEY.EXT`` grouped by KEY; an image
    (jpg/png/webp) plus ``KEY.txt`` (caption) or ``KEY.json`` (caption / conversations)."""

    FIELDS = ("img", "txt", "json")  # per sample: byte offset and size of each member (-1: none)

    def __init__(self, path: str, image_root: str = ""):
        self.shards = _expand_paths(path, SOURCE_EXTS["webdataset"])
        self.shard_of = array("i")
        self.where = {f: (array("q"), array("q")) for f in self.FIELDS}
        for n, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard, "r:") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        base = m.name.rsplit("/", 1)[-1]
                        if "." not in base:
                            continue
                        stem, ext = base.split(".", 1)
                        key = m.name[: len(m.name) - len(base)] + stem
                        groups.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
            except (tarfile.TarError, OSError) as e:
                warnings.warn(f"skipping unreadable tar shard {shard}: {e}")
                continue
            for _, g in sorted(groups.items()):
                img = next((k for k, e in enumerate(WDS_IMAGE_EXTS) if e in g), -1)
                self.shard_of.append(n)
                for f, member in (("img", WDS_IMAGE_EXTS[img] if img >= 0 else None),
                                  ("txt", "txt"), ("json", "json")):
                    off, size = g.get(member, (-1, -1))
                    self.where[f][0].append(off)
                    self.where[f][1].append(size)
        if not self.shard_of:
            raise ValueError(f"data path {path} holds no webdataset sample")

    def num_items(self) -> int | None:
        return len(self.shard_of)

    def _read(self, i: int, field: str) -> bytes | None:
        off, size = self.where[field][0][i], self.where[field][1][i]
        if off < 0:
            return None
        with open(self.shards[self.shard_of[i]], "rb") as fh:
            fh.seek(off)
            return fh.read(size)

    def item(self, i: int) -> dict:
        out: dict[str, Any] = {}
        image = self._read(i, "img")
        if image is not None:
            out["image"] = image
        meta = self._read(i, "json")
        if meta is not None:
            try:
                meta = json.loads(meta)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadItem(f"{self.shards[self.shard_of[i]]}: sample {i} has invalid JSON "
                              f"({e})") from None
            if isinstance(meta, dict):
                out.update({k: v for k, v in meta.items() if k in ("caption", "conversations",
                                                                    "text")})
        text = self._read(i, "txt")
        if text is not None and "caption" not in out:
            out["caption"] = text.decode("utf-8", errors="replace")
        return out


class TextSource(JsonlSource):
    """Text-only JSON lines: ``{"text": ...}`` (every token supervised) or ``{"conversations"}``."""


def build_source(sc: SourceConfig, image_size: int, run_seed: int):
    if sc.kind == "shapeworld":
        return ShapeWorldSource(sc.task, image_size, sc.seed, sc.turns, sc.qtype_weights,
                                sc.kind_weights, sc.style_weights, sc.pair_order, sc.paraphrase,
                                sc.and_horizontal, sc.flaw_prob)
    cls = {"jsonl": JsonlSource, "llava": LlavaSource, "webdataset": WebDatasetSource,
           "text": TextSource}[sc.kind]
    return cls(sc.path, sc.image_root)


# ----------------------------------------------------------------------------------------------
# streams


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a cheap, well-spread 64-bit hash
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def shuffled_index(i: int, n: int, key: int) -> int:
    """Position i of a pseudo-random permutation of range(n) chosen by ``key``, in O(1) memory.

    A 4-round Feistel network permutes the smallest even-bit-width domain >= n; values that land
    outside range(n) are mapped again until they fall inside (cycle walking), which keeps it a
    bijection of range(n).
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix64(key ^ (r << 60) ^ right) & mask)
        x = (left << half) | right
        if x < n:
            return x


class Stream:
    """An infinite, position-addressable view of a source.

    Position j of a finite source of n items is item ``perm_e(j mod n)``, e = j // n, where
    ``perm_e`` is the permutation keyed by ``(seed, e)`` (:func:`shuffled_index`): a new order
    every epoch, nothing stored. An endless source is read at j directly.
    """

    def __init__(self, source, seed: int):
        self.source, self.seed = source, seed
        self.n = source.num_items()

    def index(self, j: int) -> int:
        if self.n is None:
            return j
        epoch, k = divmod(j, self.n)
        return shuffled_index(k, self.n, mix_seed(self.seed, epoch))


class TaskStream:
    """The sources of one task interleaved by integer weights: within each cycle of sum(w) slots,
    source s takes w_s consecutive slots, so position j maps to one source and its own position."""

    def __init__(self, streams: list[Stream], weights: list[int]):
        self.streams = streams
        self.slots = [s for s, w in enumerate(weights) for _ in range(w)]
        self.rank_in_cycle = [self.slots[:k].count(s) for k, s in enumerate(self.slots)]
        self.weights = weights

    def locate(self, j: int) -> tuple[Stream, int]:
        c, k = divmod(j, len(self.slots))
        s = self.slots[k]
        return self.streams[s], c * self.weights[s] + self.rank_in_cycle[k]


@dataclass
class Schedule:
    """Which task and which samples global micro-batch G holds.

    The pattern is [text] * r0 + [i2t] * r1 + [t2i] * r2, repeated forever; t2i comes last so that
    a step usually ends with the micro-batch that uses every trainable parameter.
    """

    ratio: list[int]
    micro_batch: dict[str, int]

    def __post_init__(self):
        self.pattern = [t for t, r in zip(TASKS, self.ratio) for _ in range(r)]

    def task(self, G: int) -> str:
        return self.pattern[G % len(self.pattern)]

    def task_micro_index(self, G: int) -> int:
        """How many micro-batches of the same task precede G."""
        c, k = divmod(G, len(self.pattern))
        t = self.pattern[k]
        return c * self.pattern.count(t) + self.pattern[:k].count(t)

    def samples(self, G: int) -> tuple[str, range]:
        t = self.task(G)
        b = self.micro_batch[t]
        m = self.task_micro_index(G)
        return t, range(m * b, (m + 1) * b)

    def tasks_seen(self, G_end: int) -> dict[str, int]:
        """Samples per task consumed by micro-batches 0 .. G_end-1 (the data position)."""
        return {t: self.task_micro_index_end(G_end, t) * self.micro_batch[t] for t in TASKS}

    def task_micro_index_end(self, G_end: int, t: str) -> int:
        c, k = divmod(G_end, len(self.pattern))
        return c * self.pattern.count(t) + self.pattern[:k].count(t)


# ----------------------------------------------------------------------------------------------
# tokenisation


def _clean(text: str) -> str:
    # data text must not inject control tokens into the chat format
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return text


def t2i_prompt_ids(tok: HarmonTokenizer, caption: str | None, drop: bool, max_tokens: int) -> list[int]:
    """chat("Generate an image: {caption}") ids cut to ``max_tokens``; dropped -> unconditional."""
    if drop:
        return tok.encode(chat(UNCONDITIONAL_PROMPT))[:max_tokens]
    return tok.encode(chat(GENERATE_PROMPT.format(prompt=_clean(caption).strip())))[:max_tokens]


def _turns(conversations) -> list[tuple[str, str]]:
    """[(user text, assistant text)] from a LLaVA list (human/gpt or user/assistant roles)."""
    if not isinstance(conversations, list) or not conversations:
        raise BadItem("empty or malformed conversations")
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns, pending = [], None
    for msg in conversations:
        if not isinstance(msg, dict):
            raise BadItem("a conversation message is not an object")
        role = roles.get(msg.get("from", msg.get("role")))
        value = msg.get("value", msg.get("content"))
        if role is None or not isinstance(value, str):
            raise BadItem(f"conversation message {msg!r:.80} has no known role / text")
        if role == "user":
            pending = value if pending is None else pending + "\n" + value
        elif pending is not None:
            turns.append((pending, value))
            pending = None
    if not turns:
        raise BadItem("the conversation has no user -> assistant turn")
    return turns


def chat_ids(tok: HarmonTokenizer, turns: list[tuple[str, str]], image_length: int | None
             ) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation; the first ``<image>`` becomes ``image_length`` placeholders.

    Per turn: ``<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n`` (ignored), ``{a}<|im_end|>``
    (supervised), ``\\n`` (ignored). No BOS, no system prompt.
    """
    ids: list[int] = []
    labels: list[int] = []
    image_done = image_length is None
    for t, (q, a) in enumerate(turns):
        if not image_done:
            if IMAGE not in q:
                q = IMAGE + "\n" + q
            before, after = q.split(IMAGE, 1)
            head = (tok.encode(f"{IM_START}user\n{_clean(before)}") + [IMAGE_TOKEN_ID] * image_length
                    + tok.encode(f"{_clean(after)}{IM_END}\n{IM_START}assistant\n"))
            image_done = True
        else:
            head = tok.encode(f"{IM_START}user\n{_clean(q)}{IM_END}\n{IM_START}assistant\n")
        answer = tok.encode(_clean(a).strip() + IM_END)
        sep = tok.encode("\n")
        ids += head + answer + sep
        labels += [IGNORE_INDEX] * len(head) + answer + [IGNORE_INDEX] * len(sep)
    return ids, labels


# ----------------------------------------------------------------------------------------------
# micro-batches


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset: item G is the collated micro-batch G (see :class:`Schedule`).

    Returns a dict with ``task``, ``G``, ``skipped`` (unusable items replaced in this batch),
    ``tokens`` (sequence positions the LLM processes), and per task:

    - t2i: ``pixel_values`` (B, 3, S, S), ``input_ids`` / ``attention_mask`` (B, L)
    - i2t: ``pixel_values``, ``input_ids`` (image positions = -200), ``attention_mask``, ``labels``
    - text: ``input_ids``, ``attention_mask``, ``labels``
    """

    def __init__(self, cfg: DataConfig, tokenizer: HarmonTokenizer, seed: int,
                 vae_stride: int = 16, num_buffers: int = 64):
        self.cfg, self.tok, self.seed = cfg, tokenizer, seed
        self.schedule = Schedule(list(cfg.ratio), {t: getattr(cfg.micro_batch, t) for t in TASKS})
        if cfg.image_size % vae_stride:
            raise ValueError(f"data.image_size={cfg.image_size} is not a multiple of the VAE "
                             f"stride {vae_stride}")
        self.image_length = (cfg.image_size // vae_stride) ** 2 + num_buffers  # N + buffers
        self.tasks: dict[str, TaskStream] = {}
        for ti, task in enumerate(TASKS):
            scs = [s for s in cfg.sources if s.task == task]
            if not scs or not cfg.ratio[ti]:
                continue
            streams = [Stream(build_source(s, cfg.image_size, seed), mix_seed(seed, s.seed, k, ti))
                       for k, s in enumerate(scs)]
            self.tasks[task] = TaskStream(streams, [s.weight for s in scs])
        self.warned = 0

    def __len__(self):  # the sampler decides which G are read; the stream itself is endless
        return sys.maxsize

    def __getitem__(self, G: int) -> dict:
        task, idx = self.schedule.samples(int(G))
        items, skipped = [], 0
        for j in idx:
            item, bad = self.sample(task, j)
            items.append(item)
            skipped += bad
        batch = getattr(self, f"_collate_{task}")(items)
        batch.update(task=task, G=int(G), skipped=skipped)
        return batch

    def sample(self, task: str, j: int) -> tuple[dict, int]:
        """Sample j of ``task``: the item at that stream position, or the next usable one."""
        stream, pos = self.tasks[task].locate(j)
        for tries in range(MAX_CONSECUTIVE_BAD):
            rng = np.random.default_rng([self.seed, TASKS.index(task), j, tries])
            try:
                raw = stream.source.item(stream.index(pos + tries))
                synthetic = getattr(stream.source, "synthetic", False)
                return self._prepare(task, raw, rng, synthetic), tries
            except BadItem as e:
                self.warned += 1
                if self.warned <= 10:
                    warnings.warn(f"skipping a {task} data item: {e}"
                                  + (" (further skips are only counted)" if self.warned == 10
                                     else ""), stacklevel=2)
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD} consecutive {task} data items are unusable "
                           f"(around stream position {pos}); check the data paths")

    def _prepare(self, task: str, raw: dict, rng: np.random.Generator, synthetic: bool) -> dict:
        cfg = self.cfg
        if task == "t2i":
            caption = raw.get("caption") or raw.get("text")
            if not isinstance(caption, str) or not caption.strip():
                raise BadItem("a t2i item without a caption")
            if not _has_image(raw):
                raise BadItem("a t2i item without an image")
            im = open_image(raw["image"])
            pixels = crop_square(im, cfg.image_size, rng)
            drop = bool(rng.random() < cfg.caption_dropout)
            return {"pixel_values": pixels,
                    "input_ids": t2i_prompt_ids(self.tok, caption, drop, cfg.max_prompt_tokens)}
        if task == "i2t":
            if not _has_image(raw):
                raise BadItem("an i2t item without an image")
            im = open_image(raw["image"])
            w, h = im.size
            if not synthetic:  # the size rules are for real photos (training.md §2.1)
                if min(w, h) < cfg.min_image_side:
                    raise BadItem(f"image {w}x{h} is smaller than data.min_image_side="
                                  f"{cfg.min_image_side}")
                if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
                    raise BadItem(f"image {w}x{h} is more elongated than data.max_aspect_ratio")
            if raw.get("conversations"):
                turns = _turns(raw["conversations"])
            else:
                caption = raw.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    raise BadItem("an i2t item without a caption or conversations")
                q = CAPTION_INSTRUCTIONS[int(rng.integers(len(CAPTION_INSTRUCTIONS)))]
                turns = [(q, caption)]
            ids, labels = chat_ids(self.tok, turns, self.image_length)
            ids, labels = self._cut(ids, labels)
            return {"pixel_values": pad_square(im, cfg.image_size), "input_ids": ids,
                    "labels": labels}
        # text
        if raw.get("conversations"):
            ids, labels = chat_ids(self.tok, _turns(raw["conversations"]), None)
        else:
            text = raw.get("text") or raw.get("caption")
            if not isinstance(text, str) or not text.strip():
                raise BadItem("a text item without text or conversations")
            ids = self.tok.encode(_clean(text)) + [self.tok.im_end_id]
            labels = list(ids)
        ids, labels = self._cut(ids, labels)
        return {"input_ids": ids, "labels": labels}

    def _cut(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        L = self.cfg.max_length
        if len(ids) > L:
            if IMAGE_TOKEN_ID in ids[L:]:
                raise BadItem(f"a sequence of {len(ids)} ids does not fit data.max_length={L} "
                              "with its image")
            ids, labels = ids[:L], labels[:L]
        if not any(lab >= 0 for lab in labels[1:]):
            raise BadItem("no supervised token left (empty answer or cut by data.max_length)")
        return ids, labels

    # collation: right padding with <|im_end|>, 0 attention, -100 labels

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        L = max(len(r) for r in rows)
        out = torch.full((len(rows), L), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def _mask(self, rows: list[list[int]]) -> torch.Tensor:
        L = max(len(r) for r in rows)
        return torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], dtype=torch.long)

    def _collate_t2i(self, items: list[dict]) -> dict:
        rows = [it["input_ids"] for it in items]
        n_img = self.image_length
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "input_ids": self._pad(rows, self.tok.pad_id), "attention_mask": self._mask(rows),
                "tokens": sum(len(r) for r in rows) + n_img * len(rows)}

    def _collate_i2t(self, items: list[dict]) -> dict:
        rows = [it["input_ids"] for it in items]
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                "input_ids": self._pad(rows, self.tok.pad_id), "attention_mask": self._mask(rows),
                "labels": self._pad([it["labels"] for it in items], IGNORE_INDEX),
                "tokens": sum(len(r) for r in rows)}

    def _collate_text(self, items: list[dict]) -> dict:
        rows = [it["input_ids"] for it in items]
        return {"input_ids": self._pad(rows, self.tok.pad_id), "attention_mask": self._mask(rows),
                "labels": self._pad([it["labels"] for it in items], IGNORE_INDEX),
                "tokens": sum(len(r) for r in rows)}


class RankSampler(torch.utils.data.Sampler):
    """The global micro-batch indices rank ``rank`` reads for ``steps`` optimiser steps.

    Step s (counted from this sampler's start) has W * A micro-batches G = G0 + s*W*A + r*A + j
    (j < A): rank r takes a contiguous block, so one process with A' = W * A reads exactly the
    micro-batches of W processes, and a resumed run continues at the G it had reached.
    """

    def __init__(self, G0: int, steps: int, rank: int, world: int, accum: int):
        self.G0, self.steps, self.rank, self.world, self.accum = G0, steps, rank, world, accum

    def __iter__(self):
        W, A = self.world, self.accum
        for s in range(self.steps):
            for j in range(A):
                yield self.G0 + s * W * A + self.rank * A + j

    def __len__(self):
        return self.steps * self.accum


def identity(x):
    return x
