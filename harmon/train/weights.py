"""Where a training run's weights come from (training.md §3 "Initialisation").

- ``model.init``: a whole Harmon checkpoint (our directory, a Hugging Face directory or a native
  ``harmon_*.pth`` + ``kl16.ckpt``): stages II and III start from the previous stage this way.
- otherwise the preset with random weights, then optionally
  ``model.llm_init`` (a Qwen2.5-Instruct Hugging Face directory) into ``llm.*`` and
  ``model.mar_init`` (a MAR-B / MAR-H ImageNet checkpoint, EMA weights preferred) into ``mar.*``,
  and ``model.vae`` (``kl16.ckpt``) into ``vae.*``. The connectors keep their fresh initialisation.

The VAE is frozen and never saved in training checkpoints; it is rebuilt from this same config on
resume, so the config is its record.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .. import checkpoints
from ..configs import preset
from ..models.harmon import HarmonModel
from ..models.llm import tie_output_embedding
from ..models.mar import Attention, add_sincos_positions
from ..pipeline import random_model
from ..tokenizer import HarmonTokenizer, byte_level_tokenizer
from .config import ModelConfig


def _load_part(module: nn.Module, sd: dict[str, torch.Tensor], what: str, source: str,
               optional: tuple[str, ...] = ()) -> None:
    """Copy ``sd`` into ``module``; every module weight must be there (except ``optional``)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.startswith(optional))
    unexpected = sorted(k for k in sd if k not in own)
    if missing:
        raise checkpoints.CheckpointError(f"{source} lacks {len(missing)} {what} weight(s), e.g. "
                                          f"{missing[:6]}")
    if unexpected:
        raise checkpoints.CheckpointError(f"{source} has {len(unexpected)} weight(s) the {what} "
                                          f"does not know, e.g. {unexpected[:6]}")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k, got, exp = bad[0]
        raise checkpoints.CheckpointError(f"{source} does not fit the {what}: {k} is {got}, "
                                          f"expected {exp}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))


def load_llm(model: HarmonModel, path: str) -> None:
    """Qwen2 weights (``model.*``, ``lm_head.weight``) from a Hugging Face directory or file."""
    sd = checkpoints.read_state_dict(path)
    sd = {k[len("llm."):] if k.startswith("llm.") else k: v for k, v in sd.items()}
    optional = ("lm_head.",) if model.cfg.llm.tie_word_embeddings else ()
    if model.cfg.llm.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    _load_part(model.llm, sd, "LLM", path, optional)
    tie_output_embedding(model.llm)


def load_mar(model: HarmonModel, path: str) -> None:
    """MAR encoder / decoder / head from a MAR checkpoint (``model_ema`` preferred over ``model``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"MAR checkpoint {p} does not exist")
    if p.suffix == ".safetensors" or p.is_dir():
        sd = checkpoints.read_state_dict(p)
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        for key in ("model_ema", "model", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd = {k.removeprefix("module.").removeprefix("mar."): v for k, v in sd.items()}
    # MAR checkpoints never hold the optional local convolutions: those keep their initialisation
    _load_part(model.mar, sd, "MAR", path, optional=("encoder_conv.", "decoder_conv."))


def load_vae(model: HarmonModel, path: str) -> None:
    """KL-16 weights (a ``kl16.ckpt`` with its ``model`` entry, or tensors under ``vae.``), or a
    directory written by ``harmon train-vae``, whose measured latent scale replaces the model's."""
    p = Path(path)
    if p.is_dir() and (p / "vae_config.json").is_file():
        from .vae import load_vae as load_trained_vae

        vae, vae_cfg, scale = load_trained_vae(p)
        if vae_cfg != model.cfg.vae:
            raise checkpoints.CheckpointError(f"the VAE in {p} ({vae_cfg}) is not the architecture "
                                              f"of the {model.cfg.name} preset ({model.cfg.vae})")
        _load_part(model.vae, vae.state_dict(), "VAE", path)
        model.cfg.vae_scale = scale
        return
    sd = checkpoints.read_state_dict(path)
    if any(k.startswith("vae.") for k in sd):
        sd = {k[len("vae."):]: v for k, v in sd.items() if k.startswith("vae.")}
    _load_part(model.vae, sd, "VAE", path)


def set_dropout(model: HarmonModel, p: float) -> None:
    """MAR attention and projection dropout (active in training only)."""
    for m in model.mar.modules():
        if isinstance(m, Attention):
            m.attn_drop = p
        elif isinstance(m, nn.Dropout):
            m.p = p


def build_model(mc: ModelConfig) -> tuple[HarmonModel, HarmonTokenizer, str]:
    """The model to train (float32, CPU) and its tokenizer; also a one-line description."""
    if mc.init:
        model = checkpoints.load_harmon(mc.init, vae=mc.vae or None)
        source = f"init={mc.init}"
        if mc.llm_init or mc.mar_init:
            raise ValueError("model.llm_init / model.mar_init only apply to a random start; with "
                             "model.init the whole model comes from that checkpoint")
    else:
        cfg = preset(mc.preset)
        if mc.local_conv:
            cfg.mar.local_conv = mc.local_conv
        model = random_model(cfg, seed=mc.seed)
        source = f"preset={mc.preset} (random, seed {mc.seed})"
        if mc.llm_init:
            load_llm(model, mc.llm_init)
            source += f", llm={mc.llm_init}"
        if mc.mar_init:
            load_mar(model, mc.mar_init)
            source += f", mar={mc.mar_init}"
        if mc.vae:
            load_vae(model, mc.vae)
    source += f", vae={mc.vae or ('from init' if mc.init else 'random')}"
    if mc.mask_ratio_min is not None:
        model.cfg.mar.mask_ratio_min = mc.mask_ratio_min
        source += f", mask ratio from {mc.mask_ratio_min:g}"
    if mc.mask_ratio_std is not None:
        model.cfg.mar.mask_ratio_std = mc.mask_ratio_std
        source += f", mask ratio spread {mc.mask_ratio_std:g}"
    if mc.full_mask_prob is not None:
        model.cfg.mar.full_mask_prob = mc.full_mask_prob
        source += f", every token masked in {mc.full_mask_prob:g} of t2i batches"
    if mc.foreground_weight is not None:
        model.cfg.mar.foreground_weight = mc.foreground_weight
        source += f", foreground loss weight +{mc.foreground_weight:g}"
    if mc.context_noise is not None:
        model.cfg.mar.context_noise = mc.context_noise
        source += f", noise up to {mc.context_noise:g} on visible t2i tokens"
    if mc.grad_scale is not None:
        model.cfg.grad_scale = mc.grad_scale
        source += f", understanding gradient x{mc.grad_scale:g} into the visual path"
    if mc.sincos_encoder or mc.sincos_decoder:
        add_sincos_positions(model.mar, mc.sincos_encoder, mc.sincos_decoder)
        source += f", sin-cos positions (row norms {mc.sincos_encoder:g} / {mc.sincos_decoder:g})"
    if mc.local_conv and model.cfg.mar.local_conv != mc.local_conv:
        if model.cfg.mar.local_conv:
            raise ValueError(f"model.local_conv={mc.local_conv} but {mc.init} already has local "
                             f"convolutions of width {model.cfg.mar.local_conv}")
        model.mar.add_local_conv(mc.local_conv)
        source += f", local convolutions of width {mc.local_conv} added (zero-initialised)"
    elif model.cfg.mar.local_conv:
        source += f", local convolutions of width {model.cfg.mar.local_conv}"
    if mc.add_decoder_blocks:
        if not mc.init:
            raise ValueError("model.add_decoder_blocks grows a trained model (model.init); a random "
                             "start sets the depth in its preset")
        depth = model.cfg.mar.decoder_depth
        model.mar.add_decoder_blocks(mc.add_decoder_blocks)
        source += (f", decoder {depth} -> {model.cfg.mar.decoder_depth} blocks (the new ones "
                   "zero-initialised)")
    set_dropout(model, mc.dropout)

    tok_dir = mc.tokenizer
    if not tok_dir:
        for cand in (mc.init, mc.llm_init):
            if cand:
                d = Path(cand) if Path(cand).is_dir() else Path(cand).parent
                if (d / "tokenizer.json").is_file():
                    tok_dir = str(d)
                    break
    tok = HarmonTokenizer.from_dir(tok_dir) if tok_dir else byte_level_tokenizer()
    if tok.vocab_size > model.cfg.llm.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's embedding table "
                         f"only {model.cfg.llm.vocab_size} rows")
    return model, tok, source
