"""``harmon train CONFIG [--resume] [key=value ...]`` (also ``python -m harmon.train``, which is
what ``torchrun --nproc_per_node N -m harmon.train CONFIG`` launches)."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  harmon train configs/shapeworld_stage1.toml
  harmon train configs/shapeworld_stage1.toml run.steps=200 run.out_dir=runs/try --resume
  torchrun --nproc_per_node 8 -m harmon.train configs/stage1_0.5b.toml model.llm_init=/models/Qwen2.5-0.5B-Instruct
  harmon train configs/stage2_0.5b.toml --print-config
"""


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a TOML training config (see configs/)")
    # REMAINDER: overrides and flags may come in any order after CONFIG (argparse's "*" would
    # reject `CONFIG --resume key=value`); cmd_train sorts the flags out
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="dotted overrides, e.g. run.steps=100 optim.lr_llm=2e-6 "
                        "data.sources.0.path=/data/train.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in run.out_dir (start fresh if none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit")


def add_train_command(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to an argparse subparsers object."""
    p = subparsers.add_parser("train", help="train Harmon (stages I-III, ShapeWorld or real data)",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=cmd_train)
    return p


FLAGS = ("--resume", "--print-config")


def cmd_train(args) -> int:
    from .config import dump_toml, load_config

    overrides = []
    for a in args.overrides:
        if a in FLAGS:
            setattr(args, a[2:].replace("-", "_"), True)
        elif a.startswith("-"):
            raise ValueError(f"unknown option {a!r}; options are {list(FLAGS)}")
        else:
            overrides.append(a)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_toml(cfg), end="")
        return 0
    from .engine import Trainer, TrainingError

    trainer = Trainer(cfg, resume=args.resume)
    try:
        trainer.train()
    except TrainingError as e:
        print(f"harmon train: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harmon.train", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return cmd_train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"harmon train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
