"""Typed configurations of the Harmon model and its presets.

A Harmon model is described by one :class:`HarmonConfig` holding three parts (the LLM, the MAR
encoder/decoder with its diffusion head, and the KL-16 VAE) plus two scalars. The dictionary layout
(``{"llm": ..., "mar": ..., "vae": ..., "vae_scale": ..., "grad_scale": ...}``) is the one of the
reference fixtures and of the project's own ``config.json``.

Presets are plain factory functions: :func:`tiny`, :func:`harmon_0_5b`, :func:`harmon_1_5b`;
:func:`preset` looks one up by name.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

# Keys of a Hugging Face Qwen2 config that do not change the network we build (bookkeeping,
# generation defaults, or options whose Qwen2.5 value we fix). They are accepted and dropped.
_IGNORED_QWEN2_KEYS = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "max_window_layers",
    "sliding_window", "rope_scaling", "_name_or_path", "_attn_implementation", "attn_implementation",
    "layer_types", "rope_parameters", "use_mrope", "_attn_implementation_autoset", "name_or_path",
}


def _generic_hf_keys(cls) -> set[str]:
    """Keys every ``transformers`` config carries (``return_dict``, ``id2label``, ...) that say
    nothing about the architecture: a ``Qwen2Config.to_dict()`` may be pasted as it is."""
    from transformers import PretrainedConfig

    return set(PretrainedConfig().to_dict()) - {f.name for f in dataclasses.fields(cls)}


def _from_dict(cls, d: dict[str, Any], where: str, ignore: set[str] = frozenset()):
    """Build dataclass ``cls`` from ``d``; unknown keys are an error that names them."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - set(ignore))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected a subset of {sorted(names)}")
    kwargs = {k: v for k, v in d.items() if k in names}
    for k in ("ch_mult", "encoder_attn_resolutions", "decoder_attn_resolutions"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    return cls(**kwargs)


@dataclass
class LLMConfig:
    """The Qwen2 decoder (transformers' ``Qwen2Config`` fields that matter)."""

    vocab_size: int = 151936
    hidden_size: int = 896  # H
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    use_sliding_window: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"llm.hidden_size={self.hidden_size} is not divisible by "
                f"llm.num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"llm.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"llm.num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMConfig":
        """Accepts both our layout and a full Hugging Face Qwen2 ``config.json``."""
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        return _from_dict(cls, d, "llm config", _IGNORED_QWEN2_KEYS | _generic_hf_keys(cls))

    def to_qwen2(self):
        """The equivalent ``transformers.Qwen2Config`` (sdpa attention, no sliding window)."""
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, hidden_act=self.hidden_act,
            attention_dropout=self.attention_dropout, use_sliding_window=False,
            use_cache=True, attn_implementation="sdpa",
        )
        return cfg


@dataclass
class MARConfig:
    """MAR encoder, decoder and per-token diffusion head (``mar_base`` / ``mar_huge`` kwargs)."""

    img_size: int = 256  # nominal image size; position tables are learned for img_size/vae_stride
    vae_stride: int = 16
    patch_size: int = 1
    encoder_embed_dim: int = 768  # D
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    vae_embed_dim: int = 16  # token dimension
    mask_ratio_min: float = 0.7  # training: lower end of the truncated-normal mask ratio
    # training: spread of that truncated normal (its mean is 1, every token masked); a large
    # value makes the ratio nearly uniform on [mask_ratio_min, 1]
    mask_ratio_std: float = 0.25
    # training: probability that a t2i batch masks every token (ratio 1) instead of drawing its
    # ratio. Only with nothing visible does the caption alone decide where objects go (as at the
    # first sampling steps); MAR's draws give that to about 5% of batches, too rarely for a small
    # model to learn place and relation words (docs/shapeworld_log.md, stage X-O). 0 = MAR's draws
    full_mask_prob: float = 0.0
    # training: weight added to the diffusion loss of a masked token per unit of its foreground
    # share (harmon.models.harmon.foreground_share); 0 = MAR's plain mean over masked tokens
    foreground_weight: float = 0.0
    # training: bound of the std (in units of the scaled latents) of Gaussian noise added to the
    # *visible* tokens of a t2i sample, drawn per token from [0, bound]; the masked tokens' targets
    # stay clean. At sampling time the visible tokens are the generator's own draws, never the
    # encoder's exact latents; a generator trained on exact ones only reads them too literally.
    context_noise: float = 0.0
    label_drop_prob: float = 0.1  # training: caption dropout
    class_num: int = 1000  # size of the unused class table (kept for checkpoint compatibility)
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64
    diffloss_d: int = 6  # head depth
    diffloss_w: int = 1024  # head width
    num_sampling_steps: str = "100"
    # sampling: clamp the head's x0 prediction to [-x0_clip, x0_clip]; None = the reference (no
    # clamp). At the first reverse step x0 = 2e4 x (x_t - eps): an eps error of 1e-3 becomes 20,
    # which only a very well trained head avoids; a bound far outside the latents' range (their
    # largest |value| is ~8 for the project's VAE) removes that blow-up without touching real values.
    x0_clip: float | None = None
    diffusion_batch_mul: int = 4
    grad_checkpointing: bool = False
    # width of the optional local convolutions over the token grid (see harmon.models.mar.
    # LocalConv); 0 = none, Harmon's architecture and every released checkpoint. A deviation for
    # small models trained from little compute: attention learns a shape spread over neighbouring
    # tokens far more slowly than a 3x3 convolution does (benchmarks/shape_probe.py).
    local_conv: int = 0

    def __post_init__(self):
        if not 0.0 <= self.full_mask_prob <= 1.0:
            raise ValueError(f"mar.full_mask_prob must lie in [0, 1], got {self.full_mask_prob}")
        for name in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if dim % heads:
                raise ValueError(f"mar.{name}_embed_dim={dim} is not divisible by "
                                 f"mar.{name}_num_heads={heads}")
        if self.patch_size != 1:
            raise ValueError(f"mar.patch_size={self.patch_size}: only patch size 1 is supported "
                             "(every released Harmon model uses 1)")
        self.num_sampling_steps = str(self.num_sampling_steps)
        if (isinstance(self.local_conv, bool) or not isinstance(self.local_conv, int)
                or self.local_conv < 0):
            raise ValueError(f"mar.local_conv must be an integer >= 0 (0 = none), got "
                             f"{self.local_conv!r}")
        if self.x0_clip is not None and not self.x0_clip > 0:
            raise ValueError(f"mar.x0_clip must be a positive number or None, got {self.x0_clip!r}")

    @property
    def seq_h(self) -> int:
        """Side of the nominal token grid the position tables are learned for (16)."""
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MARConfig":
        """Accepts our layout and the Hugging Face ``mar`` section (``type`` = mar_base/mar_huge)."""
        d = dict(d)
        kind = d.pop("type", None) or d.pop("mar_type", None)
        if kind is not None:
            if kind not in _MAR_VARIANTS:
                raise ValueError(f"mar config: unknown MAR type {kind!r}; expected one of "
                                 f"{sorted(_MAR_VARIANTS)}")
            d = {**_MAR_VARIANTS[kind], **d}
        return _from_dict(cls, d, "mar config", {"vae_embed_dim_", "grad_ckpt"})


# Dimensions of the MAR factories of the reference (width, depth per side, heads).
_MAR_VARIANTS = {
    "mar_base": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12),
    "mar_large": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                      decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16),
    "mar_huge": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                     decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16),
}


@dataclass
class VAEConfig:
    """LDM-style KL autoencoder with stride 16 (MAR's KL-16 tokenizer when ``ch`` = 128)."""

    embed_dim: int = 16
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    ch: int = 128
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    use_variational: bool = True
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    double_z: bool = True
    in_channels: int = 3
    out_ch: int = 3
    groupnorm_groups: int = 32
    groupnorm_eps: float = 1e-6

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.encoder_attn_resolutions = tuple(self.encoder_attn_resolutions)
        self.decoder_attn_resolutions = tuple(self.decoder_attn_resolutions)
        for m in self.ch_mult:
            if (self.ch * m) % self.groupnorm_groups:
                raise ValueError(f"vae: width ch*mult={self.ch * m} is not divisible by "
                                 f"groupnorm_groups={self.groupnorm_groups}")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
        return _from_dict(cls, d, "vae config")


@dataclass
class HarmonConfig:
    """The whole model: LLM + MAR (+ head) + VAE, the latent scale and the i2t gradient scale."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    mar: MARConfig = field(default_factory=MARConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_scale: float = 0.2325  # latent = posterior mean * vae_scale
    grad_scale: float = 0.1  # gradient of the understanding loss into the visual path
    image_size: int = 512  # default resolution for generation and understanding
    name: str = "custom"

    def __post_init__(self):
        if self.vae.embed_dim != self.mar.vae_embed_dim:
            raise ValueError(f"vae.embed_dim={self.vae.embed_dim} differs from "
                             f"mar.vae_embed_dim={self.mar.vae_embed_dim}")
        if self.vae.stride != self.mar.vae_stride:
            raise ValueError(f"the VAE downsamples by {self.vae.stride} but "
                             f"mar.vae_stride={self.mar.vae_stride}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HarmonConfig":
        """Build from the fixture / project layout or from a Hugging Face ``harmon`` config."""
        if not isinstance(d, dict):
            raise TypeError(f"Harmon config: expected a dict, got {type(d).__name__}")
        for part in ("llm", "mar"):
            if part not in d:
                raise ValueError(f"Harmon config: missing the {part!r} section "
                                 f"(found keys {sorted(d)})")
        top = {"llm", "mar", "vae", "vae_scale", "grad_scale", "image_size", "name", "seed", "model_type",
               "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version",
               "vae_config"}
        unknown = sorted(set(d) - top)
        if unknown:
            warnings.warn(f"Harmon config: ignoring unknown top-level key(s) {unknown}")
        vae = d.get("vae") or d.get("vae_config") or {}
        return cls(
            llm=LLMConfig.from_dict(d["llm"]), mar=MARConfig.from_dict(d["mar"]),
            vae=VAEConfig.from_dict(vae), vae_scale=float(d.get("vae_scale", 0.2325)),
            grad_scale=float(d.get("grad_scale", 0.1)), image_size=int(d.get("image_size", 512)),
            name=str(d.get("name", "custom")),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["vae"]["ch_mult"] = list(self.vae.ch_mult)
        out["vae"]["encoder_attn_resolutions"] = list(self.vae.encoder_attn_resolutions)
        out["vae"]["decoder_attn_resolutions"] = list(self.vae.decoder_attn_resolutions)
        return out


# ----------------------------------------------------------------------------------------------
# Presets


def tiny() -> HarmonConfig:
    """A few-MB random model for tests: the dimensions of the reference fixtures."""
    return HarmonConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        mar=MARConfig(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                      diffloss_d=2, diffloss_w=64),
        vae=VAEConfig(ch=32),
        image_size=64,
        name="tiny",
    )


def harmon_0_5b() -> HarmonConfig:
    """Harmon-0.5B: Qwen2.5-0.5B-Instruct + MAR-B + a 6 x 1024 head."""
    return HarmonConfig(
        llm=LLMConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2),
        mar=MARConfig(**_MAR_VARIANTS["mar_base"], diffloss_d=6, diffloss_w=1024),
        vae=VAEConfig(ch=128),
        name="harmon-0.5b",
    )


def harmon_1_5b() -> HarmonConfig:
    """Harmon-1.5B: Qwen2.5-1.5B-Instruct + MAR-H + a 12 x 1536 head."""
    return HarmonConfig(
        llm=LLMConfig(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2),
        mar=MARConfig(**_MAR_VARIANTS["mar_huge"], diffloss_d=12, diffloss_w=1536),
        vae=VAEConfig(ch=128),
        name="harmon-1.5b",
    )


def shapeworld() -> HarmonConfig:
    """The project's own small model (ShapeWorld, 64 px): a stride-8 VAE (8x8 = 64 tokens), a
    4-layer LLM over a 512-id BPE vocabulary, 3 + 3 MAR blocks and a 3 x 256 head (~7M
    parameters, shipped in float16). ``vae_scale`` is measured when the VAE is trained.

    16 buffer slots instead of 64: with 64 image tokens, 64 buffers would double every sequence
    (training runs 1.7x faster with 16); the buffers' role (a scratch space every position sees)
    does not need more slots than the image has tokens. ``x0_clip`` = 10 (see MARConfig) keeps a
    head trained for hours, not weeks, from blowing up at the first reverse step."""
    return HarmonConfig(
        llm=LLMConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024),
        mar=MARConfig(img_size=64, vae_stride=8, encoder_embed_dim=192, encoder_depth=3,
                      encoder_num_heads=6, decoder_embed_dim=192, decoder_depth=3,
                      decoder_num_heads=6, diffloss_d=3, diffloss_w=256, class_num=1,
                      buffer_size=16, x0_clip=10.0),
        vae=VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, encoder_attn_resolutions=(8,),
                      resolution=64, groupnorm_groups=8),
        image_size=64,
        name="shapeworld",
    )


PRESETS = {"tiny": tiny, "harmon-0.5b": harmon_0_5b, "harmon-1.5b": harmon_1_5b,
           "shapeworld": shapeworld}


def preset(name: str) -> HarmonConfig:
    """The preset called ``name`` (``tiny``, ``harmon-0.5b``, ``harmon-1.5b`` or ``shapeworld``)."""
    key = name.lower().replace("_", "-")
    if key in ("0.5b", "1.5b"):
        key = "harmon-" + key
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]()
