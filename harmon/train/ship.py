"""Package a trained model for shipping: float16 weights, tokenizer and config in one folder.

    python -m harmon.train.ship runs/shapeworld_model_stage3/final harmon/assets/shapeworld
    python -m harmon.train.ship runs/NAME/final /tmp/small --int8   # weight matrices in int8

Loading converts the weights back to the dtype asked for (float32 on CPU by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..pipeline import Harmon

LIMIT_MIB = 16


def ship(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16,
         int8: bool = False) -> Path:
    """Write ``src`` (a model directory) to ``dst`` in ``dtype`` (``int8``: its weight matrices
    in int8 with per-row scales, the rest in ``dtype``), keeping its provenance note."""
    model = Harmon.from_pretrained(src, device="cpu", dtype=dtype)
    stored = str(dtype).replace('torch.', '') + (" (weight matrices int8)" if int8 else "")
    model.provenance = (f"{model.provenance}; " if model.provenance else "") + \
        f"shipped in {stored} by harmon.train.ship"
    out = model.save_pretrained(dst, int8=int8)
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    if size > LIMIT_MIB:
        raise ValueError(f"the shipped model would take {size:.1f} MiB, over the {LIMIT_MIB} MiB "
                         "limit")
    print(f"wrote {out} ({size:.1f} MiB)")
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--int8"]
    if len(args) != 2:
        sys.exit("usage: python -m harmon.train.ship SRC_MODEL_DIR DST_DIR [--int8]")
    ship(args[0], args[1], int8="--int8" in sys.argv[1:])
