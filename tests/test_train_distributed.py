"""harmon.train under torchrun on CPU (gloo): DDP with 2 processes matches one process on the same
global batch; FSDP2 (fully_shard) resumes a one-process checkpoint and matches it too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harmon.train.config import dump_toml
from harmon.train.engine import Trainer
from train_helpers import tiny_config

ROOT = Path(__file__).parent.parent
KW = dict(ratio=(0, 1, 1), micro=2, steps=4, run={"save_interval": 2}, model={"dropout": 0.1})


def torchrun(tmp_path, cfg, *args):
    toml = tmp_path / f"{Path(cfg.run.out_dir).name}.toml"
    toml.write_text(dump_toml(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "harmon.train", str(toml), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(out_dir) -> dict[int, float]:
    recs = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def weights(out_dir, step):
    return load_file(str(Path(out_dir) / f"checkpoints/step_{step:07d}/model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 4 micro-batches per step: the global batch of 2 processes x 2."""
    out = tmp_path_factory.mktemp("ref") / "ref"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(tiny_config(out, overrides=["run.grad_accum=4"], **KW)).train()
    finally:
        torch.set_num_threads(n)
    return out


def assert_same(out, ref, steps):
    a, b = losses(out), losses(ref)
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a, b)
    wa, wb = weights(out, 4), weights(ref, 4)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


def test_ddp_two_processes_match_one(tmp_path, reference):
    cfg = tiny_config(tmp_path / "ddp", **KW)
    r = torchrun(tmp_path, cfg)
    assert "2 process(es), strategy ddp" in r.stderr
    assert_same(tmp_path / "ddp", reference, steps=[1, 2, 3, 4])


def test_fsdp_resumes_a_one_process_checkpoint_and_matches(tmp_path, reference):
    out = tmp_path / "fsdp"
    shutil.copytree(reference / "checkpoints/step_0000002", out / "checkpoints/step_0000002")
    cfg = tiny_config(out, overrides=["run.strategy=fsdp", "run.sample_interval=4",
                                      "run.sample_steps=2", 'run.sample_prompts=["a red circle"]'],
                      **KW)
    r = torchrun(tmp_path, cfg, "--resume")
    assert "strategy fsdp" in r.stderr and "resuming from" in r.stderr
    assert_same(out, reference, steps=[3, 4])
    assert (out / "samples/step_0000004.png").is_file()
    state = json.loads((out / "checkpoints/step_0000004/state.json").read_text())
    assert state["world_size"] == 2 and state["next_G"] == 4 * 4


def test_fsdp_samples_with_the_ema_weights_and_exports_them(tmp_path):
    out = tmp_path / "fsdp_ema"
    cfg = tiny_config(out, overrides=["run.strategy=fsdp", "run.ema=0.9", "run.sample_interval=2",
                                      "run.sample_steps=2", 'run.sample_prompts=["a red circle"]',
                                      "run.export_final=true"],
                      ratio=(0, 1, 1), micro=2, steps=2, run={"save_interval": 2})
    torchrun(tmp_path, cfg)
    assert (out / "samples/step_0000002.png").is_file()
    ema = load_file(str(out / "checkpoints/step_0000002/ema.safetensors"))
    final = load_file(str(out / "final/model.safetensors"))
    model = weights(out, 2)
    assert ema.keys() <= final.keys()
    assert all(torch.equal(final[k], ema[k]) for k in ema)  # the export holds the EMA weights
    assert any(not torch.equal(model[k], ema[k]) for k in ema)  # ... which differ from the model's
