"""Package a trained model for shipping: float16 weights, tokenizer and config in one folder.

    python -m harmon.train.ship runs/shapeworld_model_stage3/final harmon/assets/shapeworld
    python -m harmon.train.ship runs/NAME/final /tmp/small --int8   # weight matrices in int8
    python -m harmon.train.ship runs/NAME/final DST --decoder runs/vae_decoder

``--decoder`` takes the VAE decoder from a ``harmon train-vae --decoder-only`` run on the same
model (its encoder must be the model's: the generator and the understanding path were trained on
that encoder's latents).

Loading converts the weights back to the dtype asked for (float32 on CPU by default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import checkpoints
from ..checkpoints import CheckpointError
from ..models.harmon import HarmonModel
from ..pipeline import Harmon
from ..understand import SCORE_METHODS

LIMIT_MIB = 16


def replace_decoder(model: HarmonModel, vae_dir: str | Path) -> None:
    """Load the decoder (and post-quantisation conv) of a ``harmon train-vae --decoder-only``
    output into ``model``, after checking that its encoder and latent scale are the model's."""
    from .vae import load_vae

    if not (Path(vae_dir) / "vae_config.json").is_file():
        raise FileNotFoundError(f"{vae_dir} is not a harmon train-vae output (it has no "
                                "vae_config.json)")
    vae, vae_cfg, scale = load_vae(vae_dir)
    if vae_cfg != model.cfg.vae:
        raise CheckpointError(f"the VAE in {vae_dir} ({vae_cfg}) is not the model's architecture "
                              f"({model.cfg.vae})")
    own = model.vae.state_dict()
    new = vae.state_dict()
    encoder = [k for k in own if k.startswith(("encoder.", "quant_conv."))]
    changed = [k for k in encoder if not torch.equal(new[k].to(own[k].dtype), own[k])]
    if changed or abs(scale - model.cfg.vae_scale) > 1e-4 * model.cfg.vae_scale:
        raise CheckpointError(f"the VAE in {vae_dir} does not share this model's encoder "
                              f"({len(changed)} encoder weight(s) differ, latent scale {scale:g} "
                              f"against {model.cfg.vae_scale:g}): only a decoder fine-tuned with "
                              "harmon train-vae --decoder-only --init <this model> fits")
    model.vae.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in new.items()
                                         if k not in encoder}})


def ship(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
         int8: bool = False, decoder: str | Path | None = None,
         sampling: dict[str, float | int | str] | None = None) -> Path:
    """Write ``src`` (a model directory) to ``dst`` in ``dtype`` (``int8``: its weight matrices
    in int8 with per-row scales, the rest in ``dtype``), keeping its provenance note;
    ``decoder``: a ``harmon train-vae --decoder-only`` output whose decoder replaces the model's;
    ``sampling``: the cfg / temperature / candidates / rerank / name_colors ``generate`` uses by
    default with these weights (e.g. ``{"temperature": 0.8}``, as measured by
    ``benchmarks/guidance_sweep.py``, or ``{"candidates": 2}``, by
    ``benchmarks/self_rerank.py``)."""
    model = Harmon.from_pretrained(src, device="cpu", dtype=dtype)
    model.sampling.update(checkpoints.check_sampling(sampling or {}))
    notes = [model.provenance] if model.provenance else []
    if decoder is not None:
        replace_decoder(model.model, decoder)
        notes.append(f"VAE decoder from {Path(decoder).name} (harmon train-vae --decoder-only)")
    stored = str(dtype).replace('torch.', '') + (" (weight matrices int8)" if int8 else "")
    model.provenance = "; ".join(notes + [f"shipped in {stored} by harmon.train.ship"])
    out = model.save_pretrained(dst, int8=int8)
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    if size > LIMIT_MIB:
        raise ValueError(f"the shipped model would take {size:.1f} MiB, over the {LIMIT_MIB} MiB "
                         "limit")
    print(f"wrote {out} ({size:.1f} MiB)")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m harmon.train.ship",
                                     description="package a trained model for shipping")
    parser.add_argument("src", help="the trained model directory (e.g. runs/NAME/final)")
    parser.add_argument("dst", help="where to write the shipped model")
    parser.add_argument("--int8", action="store_true", help="weight matrices in int8")
    parser.add_argument("--decoder", help="a harmon train-vae --decoder-only output whose "
                        "decoder replaces the model's")
    parser.add_argument("--cfg", type=float, help="the guidance scale generate uses by default "
                        "with these weights (default: the source's, else the paper's 3)")
    parser.add_argument("--temperature", type=float, help="the head temperature generate uses by "
                        "default with these weights (default: the source's, else the paper's 1)")
    parser.add_argument("--candidates", type=int, help="images generate draws per image kept "
                        "by default with these weights, keeping the one the model reads as most "
                        "like the prompt (default: the source's, else 1)")
    parser.add_argument("--rerank", choices=SCORE_METHODS, help="how generate reads the "
                        "candidates by default (default: the source's, else yes)")
    parser.add_argument("--name-colors", action=argparse.BooleanOptionalAction, default=None,
                        help="whether generate names the colours a prompt leaves free by "
                        "default (default: the source's, else no)")
    args = parser.parse_args()
    try:
        ship(args.src, args.dst, int8=args.int8, decoder=args.decoder,
             sampling={k: v for k, v in (("cfg", args.cfg), ("temperature", args.temperature),
                                         ("candidates", args.candidates),
                                         ("rerank", args.rerank), ("name_colors", args.name_colors))
                       if v is not None})
    except (OSError, ValueError) as e:  # bad paths or a decoder that does not fit: say which
        parser.error(str(e))
