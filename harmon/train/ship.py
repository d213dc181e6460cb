"""Package a trained model for shipping: float16 weights, tokenizer and config in one folder.

    python -m harmon.train.ship runs/shapeworld_model_stage3/final harmon/assets/shapeworld

Loading converts the weights back to the dtype asked for (float32 on CPU by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..pipeline import Harmon

LIMIT_MIB = 16


def ship(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``src`` (a model directory) to ``dst`` in ``dtype``, keeping its provenance note."""
    model = Harmon.from_pretrained(src, device="cpu", dtype=dtype)
    model.provenance = (f"{model.provenance}; " if model.provenance else "") + \
        f"shipped in {str(dtype).replace('torch.', '')} by harmon.train.ship"
    out = model.save_pretrained(dst)
    size = sum(f.stat().st_size for f in Path(out).iterdir()) / 2 ** 20
    if size > LIMIT_MIB:
        raise ValueError(f"the shipped model would take {size:.1f} MiB, over the {LIMIT_MIB} MiB "
                         "limit")
    print(f"wrote {out} ({size:.1f} MiB)")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m harmon.train.ship SRC_MODEL_DIR DST_DIR")
    ship(sys.argv[1], sys.argv[2])
