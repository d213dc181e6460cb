"""harmon.train.engine on a tiny model, CPU: losses fall, freezing, exact resume (also after kill -9),
NaN handling, bad input, gradient checkpointing, bf16, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harmon.train.config import dump_toml, load_config
from harmon.train.engine import LossModule, Trainer, TrainingError
from harmon.train.optim import group_of
from train_helpers import tiny_config

CONFIGS = Path(__file__).parent.parent / "configs"
ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models run as fast on one thread, and a busy 2-core machine makes 2 OpenMP threads crawl
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def losses(out_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.mark.parametrize("task", ["t2i", "i2t", "text"])
def test_each_loss_falls_on_a_tiny_model(tmp_path, task):
    ratio = tuple(int(t == task) for t in ("text", "i2t", "t2i"))
    cfg = tiny_config(tmp_path, ratio=ratio, micro=4, steps=24, model={"dropout": 0.0},
                      optim={"schedule": "constant"})
    recs = Trainer(cfg).train()
    seq = [r[f"loss_{task}"] for r in recs]
    assert len(seq) == 24 and all(map(lambda v: v == v, seq))
    first, last = sorted(seq[:6])[3], sorted(seq[-6:])[3]  # medians: t2i losses are spiky
    assert last < 0.75 * first, (task, seq)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_reach_exactly_the_modules_a_stage_trains(tmp_path, stage):
    frozen = load_config(CONFIGS / f"shapeworld_stage{stage}.toml").optim.frozen
    cfg = tiny_config(tmp_path, ratio=(1, 1, 1), micro=1, steps=1, optim={"frozen": frozen})
    tr = Trainer(cfg)
    tr.model.train()
    with torch.no_grad():  # a fresh head's zero output layers would block gradients upstream
        for p in tr.model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    it = iter(tr.loader)
    for j in range(tr.accum):  # one text, one i2t, one t2i micro-batch
        tr.micro_step(next(it), j, last=j == tr.accum - 1)
    trained = {"mar_encoder", "mar_decoder", "head", "connectors", "llm"} - set(frozen)
    for n, p in tr.model.named_parameters():
        if group_of(n) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n
    tr.optimizer.step()
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, before[n]) == (group_of(n) not in trained), n
    tr.dist.close()


# which parts each task's loss must reach (everything trainable, stage II), by parameter prefix
REACHED = {
    "t2i": ("mar.z_proj_ln", "mar.encoder_", "mar.decoder_", "mar.mask_token", "mar.diffloss.",
            "proj_in.", "proj_out.", "llm.model."),
    "i2t": ("mar.z_proj", "mar.encoder_", "proj_in.", "llm.model."),
    "text": ("llm.model.",),
}


@pytest.mark.parametrize("task", ["text", "i2t", "t2i"])
def test_each_task_reaches_exactly_its_own_path(tmp_path, task):
    ratio = tuple(int(t == task) for t in ("text", "i2t", "t2i"))
    tr = Trainer(tiny_config(tmp_path, ratio=ratio, micro=2, steps=1))
    tr.model.train()
    with torch.no_grad():  # a fresh head's zero output layers would block gradients upstream
        for p in tr.model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    tr.micro_step(next(iter(tr.loader)), 0, last=True)
    for n, p in tr.model.named_parameters():
        if not p.requires_grad or n.startswith(("mar.fake_latent", "mar.z_proj.")) or "pos_embed" in n:
            continue  # reached by t2i only when the drawn mask leaves some token visible
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        expected = n.startswith(REACHED[task])
        assert reached == expected, (task, n, reached)
    tr.dist.close()


class CrashAfter(Trainer):
    """Dies (like a kill) right after writing the checkpoint of step ``crash_step``."""

    crash_step = 4

    def save(self):
        path = super().save()
        if self.step == self.crash_step:
            raise KeyboardInterrupt("simulated crash")
        return path


def test_resume_is_exact_with_ema(tmp_path):
    kw = dict(ratio=(1, 1, 1), micro=2, steps=6, run={"save_interval": 2, "ema": 0.9},
              model={"dropout": 0.1})
    ref = Trainer(tiny_config(tmp_path / "ref", **kw))
    ref.train()
    with pytest.raises(KeyboardInterrupt):
        CrashAfter(tiny_config(tmp_path / "crash", **kw)).train()
    assert sorted(p.name for p in (tmp_path / "crash/checkpoints").iterdir()) == [
        "step_0000002", "step_0000004"]
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_config(tmp_path / "crash", **kw))
    resumed = Trainer(tiny_config(tmp_path / "crash", **kw), resume=True)
    assert resumed.step == 4
    resumed.train()
    assert losses(tmp_path / "crash") == losses(tmp_path / "ref")
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / f"ref/checkpoints/step_0000006/{name}.safetensors"))
        b = load_file(str(tmp_path / f"crash/checkpoints/step_0000006/{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert not any(k.startswith("vae.") for k in a)  # the VAE is never in checkpoints
    state = json.loads((tmp_path / "crash/checkpoints/step_0000006/state.json").read_text())
    assert state["next_G"] == 6 * 3 and state["samples_seen"] == {"text": 12, "i2t": 12, "t2i": 12}


def test_kill_9_then_resume_replays_the_same_losses(tmp_path):
    kw = dict(ratio=(0, 1, 1), micro=2, steps=8, run={"save_interval": 2})
    Trainer(tiny_config(tmp_path / "ref", **kw)).train()
    cfg = tiny_config(tmp_path / "run", **kw)
    toml = tmp_path / "run.toml"
    toml.write_text(dump_toml(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harmon.train", str(toml)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    ckpt = tmp_path / "run/checkpoints/step_0000004"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode()
    assert ckpt.exists() and proc.returncode == -signal.SIGKILL, err
    done = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*"))
    assert done[-1] != "step_0000008", "the run finished before it could be killed"
    (tmp_path / "run/checkpoints/.tmp_step_0000006").mkdir()  # as a kill during a save leaves
    Trainer(cfg, resume=True).train()
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert not list((tmp_path / "run/checkpoints").glob(".tmp_*"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = LossModule.forward

    def poisoned(self, batch, draws):
        loss = forward(self, batch, draws)
        return loss * float("nan") if batch["G"] >= 6 else loss  # step 4 (2 micro-batches a step)

    monkeypatch.setattr(LossModule, "forward", poisoned)
    cfg = tiny_config(tmp_path, steps=6, run={"save_interval": 2})
    with pytest.raises(TrainingError, match=r"non-finite loss.*step 4.*step_0000002"):
        Trainer(cfg).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_bad_paths_fail_before_training(tmp_path):
    cfg = tiny_config(tmp_path, overrides=[
        "data.sources.0.kind=jsonl", f"data.sources.0.path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        Trainer(cfg)
    cfg = tiny_config(tmp_path, model={"init": str(tmp_path / "no_model")})
    with pytest.raises(FileNotFoundError, match="no_model"):
        Trainer(cfg)


def test_grad_checkpointing_changes_nothing_and_bf16_runs(tmp_path):
    kw = dict(ratio=(1, 1, 1), micro=2, steps=2)
    a = Trainer(tiny_config(tmp_path / "a", **kw)).train()
    b = Trainer(tiny_config(tmp_path / "b", run={"grad_checkpointing": True}, **kw)).train()
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    wa = load_file(str(tmp_path / "a/checkpoints/step_0000002/model.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/step_0000002/model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    kw["steps"] = 1  # bf16 autocast on CPU: slow, only checked to run and agree roughly
    c = Trainer(tiny_config(tmp_path / "c", run={"precision": "bf16"}, **kw)).train()
    assert abs(c[0]["loss"] - a[0]["loss"]) < 0.1 * a[0]["loss"]


def test_export_loads_with_harmon_and_samples_are_written(tmp_path):
    cfg = tiny_config(tmp_path, steps=1, run={"export_final": True, "sample_interval": 1,
                                              "sample_steps": 2, "sample_prompts": ["a red circle"],
                                              "judge_images": 2, "vqa_images": 1})
    Trainer(cfg).train()
    from harmon import Harmon
    from harmon.data.shapeworld import SHORT_ANSWER_PROMPT

    model = Harmon.from_pretrained(tmp_path / "final", device="cpu")
    assert model.provenance.startswith("harmon train (") and "step 1)" in model.provenance
    assert model.answer_instruction == SHORT_ANSWER_PROMPT  # it trained on ShapeWorld questions
    from harmon.checkpoints import read_notes  # what from_pretrained reads from a checkpoint too

    assert read_notes(tmp_path / "checkpoints" / "step_0000001") == {
        "trained_by": model.provenance, "answer_instruction": SHORT_ANSWER_PROMPT}
    img = model.generate("a red circle", steps=2, size=64, seed=0)[0]
    assert img.size == (64, 64)
    assert (tmp_path / "samples/step_0000001.png").is_file()
    judged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "judge_overall" in x]
    assert len(judged) == 1 and 0.0 <= judged[0]["judge_overall"] <= 1.0
    assert 0.0 <= judged[0]["vqa_overall"] <= 1.0 and "vqa_pope" in judged[0]
    # a generator-only continuation trains no questions: it answers as its init, so it keeps
    # the init's instruction (a shipped stage once lost it and answered with captions)
    cont = tiny_config(tmp_path / "gen", ratio=(0, 0, 1), steps=1,
                       model={"init": str(tmp_path / "final")}, run={"export_final": True})
    Trainer(cont).train()
    cont_model = Harmon.from_pretrained(tmp_path / "gen" / "final")
    assert cont_model.answer_instruction == SHORT_ANSWER_PROMPT
    # and its provenance names both runs, the init's story kept whole
    assert cont_model.provenance == f"harmon train ({cont.name}, step 1) from [{model.provenance}]"
    assert list(Trainer(tiny_config(tmp_path / "fresh", ratio=(0, 0, 1), steps=1)).notes()) == [
        "trained_by"]  # no init, no questions: no instruction


def test_ema_warms_up_and_samples_use_the_ema_weights(tmp_path):
    from harmon.train.engine import ema_decay

    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 10_000) == 0.999
    assert all(ema_decay(0.999, s) <= ema_decay(0.999, s + 1) for s in range(50))
    tr = Trainer(tiny_config(tmp_path / "run", steps=3, run={"ema": 0.99}))
    tr.train()
    trained = [p.detach().clone() for p in tr.params]
    assert not all(torch.equal(p, e) for p, e in zip(trained, tr.ema))
    with tr._inference():
        assert all(torch.equal(p.detach(), e) for p, e in zip(tr.params, tr.ema))
    assert all(torch.equal(p.detach(), t) for p, t in zip(tr.params, trained))
    assert tr.model.training


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    from harmon.train import engine

    class Writer:  # the part of SummaryWriter the engine uses
        def __init__(self):
            self.scalars, self.flushes = [], 0

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            self.flushes += 1

    writer = Writer()
    monkeypatch.setattr(engine, "_tensorboard", lambda path: writer)
    Trainer(tiny_config(tmp_path, steps=2)).train()
    losses_logged = [(v, s) for t, v, s in writer.scalars if t == "loss"]
    assert [s for _, s in losses_logged] == [1, 2] and writer.flushes == 2
    assert [v for v, _ in losses_logged] == list(losses(tmp_path).values())


def test_a_training_checkpoint_loads_as_its_ema_model_with_the_runs_vae(tmp_path):
    """Harmon.from_pretrained(runs/X/checkpoints/step_N): the EMA weights, the VAE from the run's
    init; clear errors when the VAE cannot be found."""
    from safetensors.torch import load_file

    from harmon import Harmon
    from harmon.checkpoints import CheckpointError

    Trainer(tiny_config(tmp_path / "first", steps=1)).train()  # random VAE: checkpoint has none
    first = next((tmp_path / "first" / "checkpoints").glob("step_*"))
    with pytest.raises(CheckpointError, match="random VAE; pass vae=PATH"):
        Harmon.from_pretrained(first)
    init = tmp_path / "init"
    Harmon.from_pretrained("tiny", seed=3).save_pretrained(init)
    Trainer(tiny_config(tmp_path / "run", steps=2, run={"ema": 0.9},
                        model={"init": str(init)})).train()
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    model = Harmon.from_pretrained(ckpt).model
    ema, raw = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "model.safetensors"))
    name = "mar.decoder_pos_embed_learned"
    assert not torch.equal(ema[name], raw[name])
    assert torch.equal(model.state_dict()[name], ema[name])
    vae = load_file(str(init / "model.safetensors"))
    assert torch.equal(model.state_dict()["vae.decoder.conv_out.weight"],
                       vae["vae.decoder.conv_out.weight"])
    init.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="does not exist from here"):
        Harmon.from_pretrained(ckpt)
