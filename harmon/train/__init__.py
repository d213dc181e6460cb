"""Training Harmon: the three stages of the paper, on CPU, one GPU or many.

    harmon train configs/shapeworld_stage1.toml [--resume] [key=value ...]
    torchrun --nproc_per_node 8 -m harmon.train configs/stage1_0.5b.toml

- :mod:`.config`: the typed TOML config (:class:`TrainConfig`) and ``key=value`` overrides
- :mod:`.data`: sources (ShapeWorld, JSONL, LLaVA JSON, webdataset tars), mixing, collation
- :mod:`.optim`: module groups, freezing, AdamW groups, warm-up + cosine schedule
- :mod:`.weights`: where the weights come from (preset, init checkpoint, Qwen / MAR / VAE files)
- :mod:`.engine`: the loop (accumulation, bf16 autocast, DDP / FSDP2, EMA), checkpoints, resume
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "Trainer", "TrainingError", "train"]


def __getattr__(name):
    # the engine imports torch.distributed and the model; load it only when asked for
    if name in ("Trainer", "TrainingError"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)


def train(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    """Run a training config to the end; returns the metric records."""
    from .engine import Trainer

    return Trainer(cfg, resume=resume).train()
