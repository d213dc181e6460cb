"""Typed training configuration, read from TOML, with ``key=value`` overrides.

A run is described by one :class:`TrainConfig` with four sections::

    stage = 1                      # label only (what trains is set by optim.frozen)
    [model]   what to build or load (preset, init checkpoint, VAE, tokenizer)
    [data]    sources, the text : i2t : t2i micro-batch ratio, micro-batch sizes, image size
    [optim]   learning rate per module group, AdamW, warm-up + schedule, clipping
    [run]     steps, accumulation, precision, checkpointing, EMA, intervals, output, distribution

Every key is checked: an unknown key is a ``ValueError`` that names it and lists the valid ones, and
a value of the wrong type is a ``ValueError`` that names the key and the expected type. Overrides
use dotted paths (``run.steps=100``, ``optim.lr_llm=2e-6``, ``data.sources.0.path=/data/x.jsonl``);
their values are parsed as TOML literals, falling back to a plain string (``model.preset=tiny``).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("text", "i2t", "t2i")  # the order of data.ratio
SOURCE_KINDS = ("shapeworld", "jsonl", "llava", "webdataset", "text")
GROUPS = ("mar_encoder", "mar_decoder", "head", "connectors", "llm")  # optimiser module groups


@dataclass
class ModelConfig:
    """What to train. Either a preset with random weights, or an init checkpoint (optionally the
    LLM and the MAR parts from their own pre-trained files)."""

    preset: str = "tiny"  # tiny | harmon-0.5b | harmon-1.5b: the architecture when init is empty
    init: str = ""  # Harmon checkpoint (our dir, HF dir or native .pth) to start from; "" = random
    llm_init: str = ""  # Qwen2.5-Instruct HF directory loaded into the LLM (stage I from scratch)
    mar_init: str = ""  # MAR checkpoint (mar_base / mar_huge .pth, EMA weights preferred)
    vae: str = ""  # KL-16 weights (kl16.ckpt); "" = the VAE in init, else the seeded random one
    tokenizer: str = ""  # dir with tokenizer.json; "" = init / llm_init dir, else byte-level
    seed: int = 0  # seed of the random initialisation (also of a random VAE)
    dropout: float = 0.1  # MAR attention / projection dropout in training (training.md §1.1)
    # row norms of 2-D sin-cos tables added to the MAR encoder's / decoder's learned position
    # tables when the run starts (0 = none; see harmon.models.mar.add_sincos_positions)
    sincos_encoder: float = 0.0
    sincos_decoder: float = 0.0
    # lower end of the t2i mask ratio in training; None = the model's (mar.mask_ratio_min, 0.7 in
    # MAR). A lower bound shows the generator more of each image, as the late sampling steps do.
    mask_ratio_min: float | None = None
    # spread of the mask ratio's truncated normal (mean 1); None = the model's (0.25 in MAR). The
    # late sampling steps, which see most of the image, are rare in MAR's draws; a large spread
    # (e.g. 10: nearly uniform on [mask_ratio_min, 1]) trains them as often as the early ones
    mask_ratio_std: float | None = None
    # probability that a t2i micro-batch masks every token (see MARConfig.full_mask_prob); None =
    # the model's (0: MAR's draws only)
    full_mask_prob: float | None = None
    # extra t2i loss weight of a token per unit of its foreground share (the share of its pixels
    # off the image's median colour); None = the model's (0: MAR's plain mean). On a flat
    # background most tokens are background texture, whose noise dominates the mean loss; a
    # weight of 3 counts an object's tokens four times
    foreground_weight: float | None = None
    # bound of the per-token std of Gaussian noise on the visible tokens of t2i samples (units of
    # the scaled latents); None = the model's (0: the encoder's exact latents, as in Harmon). The
    # generator samples from its own draws, which are never exact; see MARConfig.context_noise
    context_noise: float | None = None
    # gradient scale of the understanding loss into the visual path (MAR encoder, proj_in); None =
    # the model's (0.1 in Harmon, which protects pretrained MAR features; a model trained from
    # scratch may need its encoder to learn what the questions ask about)
    grad_scale: float | None = None
    # width of the MAR's optional local convolutions (harmon.models.mar.LocalConv; not Harmon's
    # architecture): a random start builds them, an init checkpoint without them gets them
    # zero-initialised (its outputs unchanged at step 0); 0 = whatever the model has
    local_conv: int = 0
    # decoder blocks appended to the init checkpoint's MAR decoder when the run starts, their
    # residual branches zero-initialised (harmon.models.mar.MAR.add_decoder_blocks; not Harmon's
    # architecture): more depth for the generator alone. 0 = none
    add_decoder_blocks: int = 0

    def __post_init__(self):
        for key in ("local_conv", "add_decoder_blocks"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"model.{key} must be an integer >= 0, got {value!r}")
        if self.grad_scale is not None and not 0.0 <= self.grad_scale <= 10.0:
            raise ValueError(f"model.grad_scale must lie in [0, 10], got {self.grad_scale}")
        if self.mask_ratio_min is not None and not 0.0 <= self.mask_ratio_min <= 1.0:
            raise ValueError(f"model.mask_ratio_min must lie in [0, 1], got {self.mask_ratio_min}")
        if self.mask_ratio_std is not None and not self.mask_ratio_std > 0.0:
            raise ValueError(f"model.mask_ratio_std must be > 0, got {self.mask_ratio_std}")
        if self.full_mask_prob is not None and not 0.0 <= self.full_mask_prob <= 1.0:
            raise ValueError(f"model.full_mask_prob must lie in [0, 1], got {self.full_mask_prob}")
        if self.context_noise is not None and not 0.0 <= self.context_noise <= 10.0:
            raise ValueError(f"model.context_noise must lie in [0, 10], got {self.context_noise}")
        if self.foreground_weight is not None and not 0.0 <= self.foreground_weight <= 100.0:
            raise ValueError(f"model.foreground_weight must lie in [0, 100], got "
                             f"{self.foreground_weight}")


@dataclass
class SourceConfig:
    """One data source. ``task`` says which micro-batches it feeds."""

    kind: str = "shapeworld"  # shapeworld | jsonl | llava | webdataset | text
    task: str = "t2i"  # t2i | i2t | text
    path: str = ""  # file, directory or glob (*.jsonl, *.json, *.tar); unused by shapeworld
    image_root: str = ""  # directory relative image paths start from ("" = the file's directory)
    weight: int = 1  # integer share among the sources of the same task (interleaved exactly)
    seed: int = 0  # shapeworld: world seed; disk sources: shuffling seed (added to run.seed)
    turns: int = 1  # shapeworld i2t: question-answer turns per conversation
    # shapeworld i2t: question-type probabilities, e.g. { pope = 2, count = 1 } (unset = the
    # stream's defaults, harmon.data.shapeworld.DEFAULT_QTYPE_WEIGHTS); a curriculum knob
    qtype_weights: dict[str, float] = field(default_factory=dict)
    # shapeworld: scene-kind probabilities, e.g. { single = 1, pair = 3 } (unset =
    # harmon.data.shapeworld.DEFAULT_KIND_WEIGHTS), and for t2i caption-style probabilities,
    # e.g. { short = 1, position_plain = 1 } (unset = DEFAULT_STYLE_WEIGHTS): the t2i mix knobs
    kind_weights: dict[str, float] = field(default_factory=dict)
    style_weights: dict[str, float] = field(default_factory=dict)
    # shapeworld: lay out every pair in a clear relation, the left or upper object named first
    # (harmon.data.shapeworld.ShapeWorld.pair_order): a curriculum knob
    pair_order: bool = False
    # shapeworld t2i: caption vertical pairs by their relation only, so "and" names side-by-side
    # pairs only (harmon.data.shapeworld.ShapeWorld.and_horizontal): a curriculum knob
    and_horizontal: bool = False
    # shapeworld i2t: ask half of the questions in other wordings
    # (harmon.data.shapeworld.ShapeWorld.paraphrase)
    paraphrase: bool = False
    # shapeworld i2t: the share of scenes with one object drawn wrong and left out of the answers
    # (harmon.data.shapeworld.ShapeWorld.flaw_prob): teaches the reader a draft's faults
    flaw_prob: float = 0.0

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data source kind {self.kind!r} is unknown; expected one of "
                             f"{list(SOURCE_KINDS)}")
        if self.task not in TASKS:
            raise ValueError(f"data source task {self.task!r} is unknown; expected one of "
                             f"{list(TASKS)}")
        if self.kind != "shapeworld" and not self.path:
            raise ValueError(f"a {self.kind} data source needs a path")
        if self.weight < 1:
            raise ValueError(f"data source weight must be a positive integer, got {self.weight}")
        from ..data import shapeworld as sw
        # (key, the task it needs or None for any, its allowed names, what they are)
        for key, task, allowed, what in (
                ("qtype_weights", "i2t", sw.DEFAULT_QTYPE_WEIGHTS, "question types"),
                ("kind_weights", None, sw.DEFAULT_KIND_WEIGHTS, "scene kinds"),
                ("style_weights", "t2i", sw.DEFAULT_STYLE_WEIGHTS, "caption styles")):
            if not getattr(self, key):
                continue
            if self.kind != "shapeworld" or task not in (None, self.task):
                where = f"shapeworld {task} sources" if task else "shapeworld sources"
                raise ValueError(f"{key} applies to {where} only, not to a {self.kind} "
                                 f"{self.task} source")
            setattr(self, key, sw._check_weights(getattr(self, key), list(allowed),
                                                 f"{what} in {key}"))
        if not isinstance(self.pair_order, bool):
            raise ValueError(f"pair_order must be true or false, got {self.pair_order!r}")
        if self.pair_order and self.kind != "shapeworld":
            raise ValueError(f"pair_order applies to shapeworld sources only, not to a "
                             f"{self.kind} source")
        if not isinstance(self.and_horizontal, bool):
            raise ValueError(f"and_horizontal must be true or false, got {self.and_horizontal!r}")
        if self.and_horizontal and (self.kind, self.task) != ("shapeworld", "t2i"):
            raise ValueError(f"and_horizontal applies to shapeworld t2i sources only (it chooses "
                             f"captions), not to a {self.kind} {self.task} source")
        if not isinstance(self.paraphrase, bool):
            raise ValueError(f"paraphrase must be true or false, got {self.paraphrase!r}")
        if self.paraphrase and (self.kind, self.task) != ("shapeworld", "i2t"):
            raise ValueError(f"paraphrase applies to shapeworld i2t sources only (it rewords "
                             f"questions), not to a {self.kind} {self.task} source")
        sw._check_flaw_prob(self.flaw_prob)
        if self.flaw_prob and (self.kind, self.task) != ("shapeworld", "i2t"):
            raise ValueError(f"flaw_prob applies to shapeworld i2t sources only (it draws the "
                             f"scenes questions are asked of), not to a {self.kind} {self.task} "
                             f"source")


@dataclass
class MicroBatchConfig:
    """Samples per micro-batch and device, per task (a micro-batch holds one task only)."""

    text: int = 8
    i2t: int = 8
    t2i: int = 8


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    ratio: list[int] = field(default_factory=lambda: [0, 1, 2])  # micro-batches text : i2t : t2i per cycle
    micro_batch: MicroBatchConfig = field(default_factory=MicroBatchConfig)
    image_size: int = 256  # training resolution (multiple of 16)
    caption_dropout: float = 0.1  # t2i prompts replaced by "Generate an image."
    max_prompt_tokens: int = 128  # t2i prompt ids are cut to this length
    max_length: int = 2048  # i2t / text sequences (image placeholders included) are cut to this
    min_image_side: int = 80  # disk i2t images with a shorter side are skipped
    max_aspect_ratio: float = 10.0  # disk images more elongated than this are skipped
    num_workers: int = 0  # DataLoader worker processes per rank (0 = load in the training process)

    def __post_init__(self):
        if len(self.ratio) != 3 or any(r < 0 for r in self.ratio) or sum(self.ratio) == 0:
            raise ValueError(f"data.ratio must be three non-negative integers (text : i2t : t2i "
                             f"micro-batches per cycle) with a positive sum, got {self.ratio}")
        if self.image_size <= 0 or self.image_size % 16:
            raise ValueError(f"data.image_size must be a positive multiple of 16, got "
                             f"{self.image_size}")
        if self.max_prompt_tokens < 1 or self.max_length < 2:
            raise ValueError("data.max_prompt_tokens must be >= 1 and data.max_length >= 2")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must lie in [0, 1], got {self.caption_dropout}")
        for task, n in zip(TASKS, self.ratio):
            if n and getattr(self.micro_batch, task) < 1:
                raise ValueError(f"data.micro_batch.{task} must be >= 1 when data.ratio gives "
                                 f"{task} micro-batches")
            if n and not any(s.task == task for s in self.sources):
                raise ValueError(f"data.ratio asks for {task} micro-batches but no data source "
                                 f"has task = {task!r}")


@dataclass
class OptimConfig:
    """AdamW with one learning rate per module group, linear warm-up then a decay schedule."""

    lr_mar_encoder: float = 1e-5
    lr_mar_decoder: float = 1e-4
    lr_head: float | None = None  # diffusion head; None = lr_mar_decoder
    lr_connectors: float | None = None  # proj_in / proj_out; None = lr_mar_decoder
    lr_llm: float = 1e-5
    frozen: list[str] = field(default_factory=list)  # groups that do not train (the VAE never does)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.02  # not on 1-D tensors, biases or the diffusion head
    warmup_steps: int = -1  # -1 = 1% of run.steps
    warmup_start: float = 1e-5  # LR factor at step 0 of the warm-up
    schedule: str = "cosine"  # cosine | linear | constant (after the warm-up)
    min_lr_ratio: float = 0.0  # the decay ends at this fraction of the peak
    clip_grad_norm: float = 1.0  # 0 = no clipping

    def __post_init__(self):
        bad = [g for g in self.frozen if g not in GROUPS]
        if bad:
            raise ValueError(f"optim.frozen names unknown group(s) {bad}; groups are {list(GROUPS)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule {self.schedule!r} is unknown; expected cosine, "
                             "linear or constant")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {self.betas}")

    def lr_of(self, group: str) -> float:
        """Peak learning rate of a module group."""
        lr = getattr(self, f"lr_{group}")
        return self.lr_mar_decoder if lr is None else lr


@dataclass
class RunConfig:
    steps: int = 1000  # optimiser steps
    grad_accum: int = 0  # micro-batches per device per step; 0 = sum(data.ratio)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    grad_checkpointing: bool = False  # LLM layers, MAR blocks and head blocks
    deterministic: bool = False  # deterministic kernels (bitwise-exact resume on GPUs; slower)
    ema: float = 0.0  # EMA decay of the trained weights (e.g. 0.9999); 0 = no EMA
    seed: int = 0  # all training randomness derives from it (data, masks, noise, dropout)
    out_dir: str = "runs/harmon"
    log_interval: int = 1  # steps between metric lines
    save_interval: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    sample_interval: int = 0  # steps between sample grids (+ ShapeWorld judge); 0 = never
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle",
                                                               "a blue square to the left of a "
                                                               "yellow star"])
    sample_steps: int = 16  # MAR steps of the periodic samples
    sample_cfg: float = 3.0
    judge_images: int = 0  # ShapeWorld scenes judged at each sample interval (0 = none)
    vqa_images: int = 0  # ShapeWorld scenes whose questions are answered and scored (0 = none)
    strategy: str = "auto"  # auto (ddp under torchrun, else none) | none | ddp | fsdp
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True  # tqdm bar on rank 0
    export_final: bool = True  # also write out_dir/final (loadable by Harmon.from_pretrained)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.steps}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"run.precision {self.precision!r} is unknown; expected auto, fp32 "
                             "or bf16")
        if self.strategy not in ("auto", "none", "ddp", "fsdp"):
            raise ValueError(f"run.strategy {self.strategy!r} is unknown; expected auto, none, ddp "
                             "or fsdp")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"run.ema must lie in [0, 1), got {self.ema}")
        for k in ("log_interval", "save_interval", "keep_checkpoints"):
            if getattr(self, k) < 1:
                raise ValueError(f"run.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class TrainConfig:
    stage: int = 1  # 1, 2 or 3: a label for logs and checkpoints
    name: str = ""  # run name (default: the config file's stem)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def grad_accum(self) -> int:
        return self.run.grad_accum or sum(self.data.ratio)

    def to_dict(self) -> dict[str, Any]:
        return _strip_none(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------
# building from dicts, with checks


def _strip_none(d):
    # TOML has no null: an unset optional key is simply absent
    if isinstance(d, dict):
        return {k: _strip_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_strip_none(v) for v in d]
    return d


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (and build nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ValueError:
                pass
        raise ValueError(f"config key {where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"config key {where}: expected a list, got {value!r}")
        return [_convert(v, item, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"config key {where}: expected a table such as {{ a = 1 }}, got {value!r}")
        return {_convert(k, key_tp, where): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config key {where}: unsupported annotation {tp}")  # a bug, not a user error


def build(cls, d: Any, where: str = ""):
    """Dataclass ``cls`` from a dict; unknown keys and wrong types are errors that name the key."""
    section = where or "top level"
    if not isinstance(d, dict):
        raise ValueError(f"config section [{section}] must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown config key {key!r}; valid keys in [{section}] are {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """A TOML literal (1e-4, true, [0, 1, 2], "x") or, failing that, the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(d: dict, override: str) -> None:
    """Set a dotted ``key=value`` in the nested dict ``d`` (list items by index)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {override!r} has an empty key part")
    node, cls = d, TrainConfig
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ValueError(f"override {key!r}: {path} is not an index of a list of "
                                 f"{len(node)} item(s)")
            idx = int(p)
            if last:
                node[idx] = _parse_value(text)
            else:
                node = node[idx]
            continue
        names = [f.name for f in dataclasses.fields(cls)] if cls is not None else None
        if names is not None and p not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ValueError(f"unknown config key {path!r}; valid keys in [{where}] are {names}")
        tp = typing.get_type_hints(cls)[p] if cls is not None else None
        if last:
            node[p] = _parse_value(text)
            break
        # descend: remember the dataclass (or the list's item dataclass) we are in
        if typing.get_origin(tp) is list:
            cls = typing.get_args(tp)[0] if dataclasses.is_dataclass(typing.get_args(tp)[0]) else None
            node = node.setdefault(p, [])
        else:
            cls = tp if dataclasses.is_dataclass(tp) else None
            node = node.setdefault(p, {})


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                base: dict | None = None) -> TrainConfig:
    """Read a TOML file (or start from ``base``), apply the overrides, check and build."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            d = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    else:
        d = {}
    if base is not None:
        d = {**base, **d} if path is not None else dict(base)
    for o in overrides:
        apply_override(d, o)
    cfg = build(TrainConfig, d)
    if not cfg.name:
        cfg.name = path.stem if path is not None else "harmon"
    return cfg


def dump_toml(cfg: TrainConfig) -> str:
    """The config as TOML text (round-trips through :func:`load_config`)."""
    d = cfg.to_dict()
    lines: list[str] = []

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # inline table: dict fields of array-of-table items
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }" if v else "{}"
        return repr(v)

    def table(prefix: str, t: dict):
        scalars = {k: v for k, v in t.items() if not isinstance(v, dict)
                   and not (isinstance(v, list) and v and isinstance(v[0], dict))}
        if prefix:
            lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    lines.append(f"\n[[{prefix}.{k}]]" if prefix else f"\n[[{k}]]")
                    lines.extend(f"{kk} = {value(vv)}" for kk, vv in item.items())

    table("", d)
    return "\n".join(lines) + "\n"
