"""Reading reference fixture directories.

A fixture directory holds ``weights/`` (one safetensors file + ``config.json``) and one folder per
case (``NN_name/config.json`` + ``NN_name/io.safetensors``). See ``tests/fixtures/harmon_reference/
README.md`` for the contract. Used by the parity checker (:mod:`harmon.reference`) and the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configs import HarmonConfig
from .rng import ReplayDraws


@dataclass
class FixtureCase:
    """One case: its name, parameters, model config, tensors and recorded draws."""

    path: Path
    name: str
    params: dict
    model_config: dict
    tensors: dict[str, torch.Tensor]
    draw_records: list[dict]
    weights_path: Path
    handed_out: list[ReplayDraws] = field(default_factory=list)  # every draws() given to a runner

    @classmethod
    def load(cls, path: str | Path) -> "FixtureCase":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: not a fixture case (no config.json)")
        cfg = json.loads(cfg_file.read_text())
        io_file = path / "io.safetensors"
        if not io_file.is_file():
            raise FileNotFoundError(f"{path}: fixture case without io.safetensors")
        weights = (path / cfg.get("weights", "../weights/harmon_tiny.safetensors")).resolve()
        return cls(path=path, name=cfg.get("case", path.name), params=cfg.get("params", {}),
                   model_config=cfg.get("model") or {}, tensors=load_file(str(io_file)),
                   draw_records=cfg.get("draws", []), weights_path=weights)

    def config(self) -> HarmonConfig:
        """The case's model config (falls back to the config.json beside the weights)."""
        d = self.model_config
        if not d:
            d = json.loads((self.weights_path.parent / "config.json").read_text())["model"]
        return HarmonConfig.from_dict(d)

    def weights(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """All weights as float32 (``prefix`` selects and strips a key prefix such as ``"vae."``)."""
        sd = load_file(str(self.weights_path))
        return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}

    def draws(self) -> ReplayDraws:
        replay = ReplayDraws(self.tensors, self.draw_records)
        self.handed_out.append(replay)
        return replay

    def unused_draws(self) -> str | None:
        """Why the recorded draws were not all replayed, or None when they were: a run that
        leaves draws over consumed fewer random numbers than the reference did."""
        if self.draw_records and not self.handed_out:
            return f"none of its {len(self.draw_records)} recorded draws was replayed"
        for r in self.handed_out:
            if not r.exhausted:
                return (f"replayed {r.position} of its {len(self.draw_records)} recorded draws "
                        f"(next: {self.draw_records[r.position].get('key')})")
        return None

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def outputs(self) -> dict[str, torch.Tensor]:
        return {k[4:]: v for k, v in self.tensors.items() if k.startswith("out.")}


def list_cases(root: str | Path) -> list[Path]:
    """Case folders of a fixture directory, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"fixture directory {root} does not exist")
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "io.safetensors").is_file())
