"""Tiny CPU training configs shared by the tests of harmon.train."""

from __future__ import annotations

import copy

from harmon.train.config import TrainConfig, load_config


def tiny_dict(out_dir, ratio=(0, 1, 1), micro=2, steps=4, **sections) -> dict:
    """A config dict: tiny model, 64 px ShapeWorld, ``micro`` samples per micro-batch."""
    d = {
        "model": {"preset": "tiny", "seed": 0},
        "data": {"image_size": 64, "ratio": list(ratio), "max_prompt_tokens": 64,
                 "micro_batch": {"text": micro, "i2t": micro, "t2i": micro},
                 "sources": [{"kind": "shapeworld", "task": t} for t, r
                             in zip(("text", "i2t", "t2i"), ratio) if r]},
        "optim": {"lr_mar_decoder": 1e-3, "lr_mar_encoder": 1e-3, "lr_llm": 1e-3,
                  "warmup_steps": 1},
        "run": {"steps": steps, "out_dir": str(out_dir), "progress": False, "save_interval": 1000,
                "export_final": False, "log_interval": 1},
    }
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return d


def tiny_config(out_dir, ratio=(0, 1, 1), micro=2, steps=4, overrides=(), **sections) -> TrainConfig:
    return load_config(None, list(overrides),
                       base=copy.deepcopy(tiny_dict(out_dir, ratio, micro, steps, **sections)))
