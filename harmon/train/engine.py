"""The training loop: one process, DDP or FSDP2; checkpoints; exact resume; metrics; samples.

One optimiser step = ``A`` micro-batches per process (gradient accumulation), each homogeneous
(text, i2t or t2i), each loss divided by A. Under DDP every process runs its own A micro-batches and
gradients are averaged on the last one; under FSDP2 (``fully_shard``) parameters, gradients and
optimiser state are sharded over the processes.

Determinism. Every random number of micro-batch G (the global micro-batch index) comes from
``mix_seed(run.seed, G, ...)``: the data (which items, crops, caption dropout, instructions), the
mask orders / ratio / diffusion timesteps / noise (a ``TorchDraws`` on a fresh ``torch.Generator``)
and dropout (the global torch RNG, re-seeded before each micro-batch). So the RNG state of a run is
its step counter: a resumed run replays exactly the losses of an uninterrupted one, and one process
with ``A' = W * A`` sees exactly the batches of W processes. On a CPU this holds bit for bit; CUDA
kernels may accumulate in a different order from run to run (atomics in some backward passes), so
on GPUs ``run.deterministic = true`` is needed for bitwise replay (at some cost in speed).

Checkpoints (``out_dir/checkpoints/step_NNNNNNN/``), written to a temporary directory and renamed
when complete, so a crash (even ``kill -9``) leaves the previous ones intact:

- ``model.safetensors``: every weight except the VAE (frozen; rebuilt from the config), float32
- ``config.json`` + ``tokenizer.json``: with ``vae=...`` the directory loads for inference
- ``optimizer.pt``: AdamW state keyed by parameter name (full tensors: any strategy can resume)
- ``ema.safetensors`` (with ``run.ema``), ``state.json``: step, data position, counters, config
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file

from .. import checkpoints
from ..data.shapeworld import SHORT_ANSWER_PROMPT
from ..generate import sample_tokens, to_uint8
from ..models.harmon import HarmonModel
from ..rng import TorchDraws
from ..tokenizer import pad_ids
from .config import TASKS, TrainConfig, dump_toml
from .data import IMAGE_TOKEN_ID, MicroBatches, RankSampler, identity, mix_seed
from .optim import build_optimizer, lr_factor, set_lr, set_trainable
from .weights import build_model


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient)."""


# ----------------------------------------------------------------------------------------------
# processes and devices


class Dist:
    """This process's place: rank, world size, device and the parallel strategy."""

    def __init__(self, strategy: str, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise ValueError(f"run.device={device!r} but CUDA is not available here")
        if cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if strategy == "auto":
            strategy = "ddp" if self.world > 1 else "none"
        if strategy == "none" and self.world > 1:
            raise ValueError(f"run.strategy=none but {self.world} processes were launched; use "
                             "ddp or fsdp")
        if strategy == "ddp" and self.world == 1:
            strategy = "none"  # nothing to average
        self.strategy = strategy
        self.owns_group = False
        if (self.world > 1 or strategy == "fsdp") and not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            if self.world > 1:
                dist.init_process_group(backend)
            else:  # fully_shard needs a process group even for a single process
                store = tempfile.NamedTemporaryFile(prefix="harmon_pg_", delete=False).name
                dist.init_process_group(backend, init_method=f"file://{store}", rank=0,
                                        world_size=1)
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def close(self, sync: bool = False):
        """Destroy the process group this object made. ``sync``: after a barrier, so that no rank
        tears gloo down while another still talks to it (a rank that left early aborted at exit,
        "terminate called without an active exception"); never after an error, where the other
        ranks may not come."""
        if self.owns_group and dist.is_initialized():
            if sync:
                dist.barrier()
            dist.destroy_process_group()


class LossModule(nn.Module):
    """The one entry point DDP / FSDP hooks see: ``forward(batch, draws)`` -> scalar loss."""

    def __init__(self, model: HarmonModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, draws: TorchDraws) -> torch.Tensor:
        m, task = self.model, batch["task"]
        if task == "t2i":
            return m.t2i_loss(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                              draws)["loss"]
        if task == "i2t":
            return m.i2t_loss(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                              batch["labels"], image_token_id=IMAGE_TOKEN_ID)["loss"]
        return m.text_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])["loss"]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor on the CPU (a DTensor shard is gathered: all ranks must call)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param`` (sharded the same way when ``param`` is a DTensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,
                                 param.placements)
    return full.to(param.device)


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`train`.

    Args:
        cfg: the run.
        resume: continue from the newest checkpoint in ``run.out_dir`` (start fresh if none).
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        run = cfg.run
        self.dist = Dist(run.strategy, run.device)
        try:
            self._setup(resume)
        except BaseException:
            self.dist.close()
            raise

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self, resume: bool):
        cfg, run, d = self.cfg, self.cfg.run, self.dist
        self.out = Path(run.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is not None and not resume:
            raise ValueError(f"{self.ckpt_dir} already holds checkpoints (newest {latest.name}); "
                             "pass --resume to continue that run or choose another run.out_dir")
        cuda = d.device.type == "cuda"
        self.amp = (run.precision == "bf16") or (run.precision == "auto" and cuda)
        if cuda and not run.deterministic:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if run.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

        check_paths(cfg)  # fail now, not after minutes of model building
        model, self.tokenizer, self.model_source = build_model(cfg.model)
        # a run that trains no questions (the generator alone) answers as its init did
        self.init_notes = checkpoints.read_notes(cfg.model.init) if cfg.model.init else {}
        self.trainable_counts = set_trainable(model, cfg.optim.frozen)
        if run.grad_checkpointing:
            model.mar.grad_checkpointing = True
            model.mar.diffloss.net.grad_checkpointing = True
            model.llm.activation_checkpointing_enable({"use_reentrant": False})
        self.step, self.G0, self.step0 = 0, 0, 0  # G0: first global micro-batch of step step0
        self.skipped, self.samples_seen, self.elapsed = 0, {t: 0 for t in TASKS}, 0.0
        state = None
        if resume and latest is not None:
            state = json.loads((latest / "state.json").read_text())
            self.step = self.step0 = int(state["step"])
            self.G0 = int(state["next_G"])
            sd = load_file(str(latest / "model.safetensors"))
            load_training_weights(model, sd, str(latest))
        model.to(d.device)
        if self.amp and cuda:
            model.vae.to(torch.bfloat16)  # frozen, never saved: no need for float32 masters
        self.model = model

        # wrap for the strategy, then the optimiser on the (possibly sharded) parameters
        self.loss_module = LossModule(model)
        if d.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # buffers (rotary tables) are equal everywhere: no syncing before each forward
            self.wrapped = DDP(self.loss_module, device_ids=[d.local_rank] if cuda else None,
                               find_unused_parameters=self._may_skip_parameters(),
                               forward_sync_buffers=False)
        elif d.strategy == "fsdp":
            shard_model(self.loss_module, model, d)
            self.wrapped = self.loss_module
        else:
            self.wrapped = self.loss_module
        self.names = {id(p): n for n, p in model.named_parameters()}  # after fully_shard swaps them
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.ema = [p.detach().clone().float() for p in self.params] if run.ema > 0 else None

        if state is not None:
            self._load_state(latest, state)
            if d.main:
                print(f"resuming from {latest} (step {self.step})", file=sys.stderr)
                changed = _diff(state.get("config", {}), cfg.to_dict())
                if changed:
                    print(f"note: the config differs from the checkpoint's in {changed[:8]}; the "
                          "run will not replay an uninterrupted one exactly", file=sys.stderr)

        # data: the micro-batches this rank reads, from the current step on
        self.accum = cfg.grad_accum
        self.dataset = MicroBatches(cfg.data, self.tokenizer, run.seed,
                                    self.model.cfg.mar.vae_stride, self.model.cfg.mar.buffer_size)
        self.sampler = RankSampler(self.G0, max(0, run.steps - self.step), d.rank, d.world,
                                   self.accum)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=self.sampler, collate_fn=identity,
            num_workers=cfg.data.num_workers, pin_memory=cuda,
            persistent_workers=cfg.data.num_workers > 0)

        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(dump_toml(cfg))
            self.metrics_path = self.out / "metrics.jsonl"
            _truncate_metrics(self.metrics_path, self.step)
            self.tb = _tensorboard(self.out / "tb")

    def _may_skip_parameters(self) -> bool:
        """Whether a step can end with a micro-batch that leaves some trained parameter without a
        gradient (DDP must then look for unused parameters). A t2i micro-batch reaches every
        trainable parameter when the output embedding is tied (the input table)."""
        pattern = [t for t, r in zip(TASKS, self.cfg.data.ratio) for _ in range(r)]
        P, A, W = len(pattern), self.cfg.grad_accum, self.dist.world
        last = {pattern[(self.G0 + s * W * A + r * A + A - 1) % P] for s in range(P)
                for r in range(W)}
        return last != {"t2i"} or not self.model.cfg.llm.tie_word_embeddings

    # -- checkpoints ---------------------------------------------------------------------------

    def _load_state(self, path: Path, state: dict):
        self.skipped = int(state.get("skipped", 0))
        self.samples_seen = dict(state.get("samples_seen", self.samples_seen))
        self.elapsed = float(state.get("elapsed", 0.0))
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        load_optimizer_state(self.optimizer, saved, self.names)
        if self.ema is not None:
            f = path / "ema.safetensors"
            if f.is_file():
                sd = load_file(str(f))
                for e, p in zip(self.ema, self.params):
                    e.copy_(_like(sd[self.names[id(p)]].float(), e))
            elif self.dist.main:
                print(f"note: {path} has no EMA weights; the EMA restarts from the model",
                      file=sys.stderr)

    def save(self) -> Path | None:
        """Write a checkpoint for the current step (all ranks call; rank 0 writes)."""
        d = self.dist
        if d.strategy != "fsdp" and not d.main:
            # replicated weights: rank 0 has everything; gathering is only needed under FSDP
            d.barrier()
            return None
        sd = {}
        for k, v in self.model.state_dict().items():
            if k.startswith("vae.") or (k == "llm.lm_head.weight"
                                        and self.model.cfg.llm.tie_word_embeddings):
                continue
            sd[k] = _full(v).float().contiguous()
        osd = optimizer_state(self.optimizer, self.names)
        ema = ({self.names[id(p)]: _full(e).contiguous() for p, e in zip(self.params, self.ema)}
               if self.ema is not None else None)
        path = None
        if d.main:
            path = self.ckpt_dir / f"step_{self.step:07d}"
            tmp = self.ckpt_dir / f".tmp_step_{self.step:07d}"
            for stale in self.ckpt_dir.glob(".tmp_step_*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            checkpoints.write_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt"})
            torch.save(osd, tmp / "optimizer.pt")
            if ema is not None:
                checkpoints.write_safetensors(ema, tmp / "ema.safetensors", metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(
                {"format": "harmon", "model": self.model.cfg.to_dict(),
                 "vae_source": self.cfg.model.vae or self.model_source, **self.notes()}, indent=1))
            self.tokenizer.save(tmp)
            state = {"step": self.step, "next_G": self.next_G, "world_size": d.world,
                     "grad_accum": self.accum, "samples_seen": self.samples_seen,
                     "skipped": self.skipped, "elapsed": self.elapsed,
                     "rng": {"scheme": "mix_seed(run.seed, global micro-batch, k)",
                             "seed": self.cfg.run.seed},
                     "model_source": self.model_source, "config": self.cfg.to_dict()}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)  # the checkpoint exists only once complete
            for old in sorted(self.ckpt_dir.glob("step_*"))[: -self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        d.barrier()
        return path

    @property
    def next_G(self) -> int:
        return self.G0 + (self.step - self.step0) * self.dist.world * self.accum

    # -- one step ------------------------------------------------------------------------------

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)

    def _sync_context(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of a step."""
        if self.dist.strategy == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.dist.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def micro_step(self, batch: dict, G: int, last: bool) -> torch.Tensor:
        dev = self.dist.device
        torch.manual_seed(mix_seed(self.cfg.run.seed, G, 0))  # dropout (global RNG)
        draws = TorchDraws(torch.Generator(dev).manual_seed(mix_seed(self.cfg.run.seed, G, 1)))
        batch = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in batch.items()}
        with self._sync_context(last):
            with self._autocast():
                loss = self.wrapped(batch, draws)
            (loss / self.accum).backward()
        return loss.detach().float()

    def train(self) -> list[dict]:
        """Run to ``run.steps``; returns the metric records of this call."""
        try:
            records = self._train()
        except BaseException:
            self.dist.close()
            raise
        self.dist.close(sync=True)
        return records

    def _train(self) -> list[dict]:
        cfg, run, d = self.cfg, self.cfg.run, self.dist
        records: list[dict] = []
        if self.step >= run.steps:
            if d.main:
                print(f"nothing to do: the run is at step {self.step} of {run.steps}",
                      file=sys.stderr)
            return records
        self.model.train()
        bar = None
        if d.main and run.progress:
            from tqdm import tqdm

            bar = tqdm(total=run.steps, initial=self.step, desc=f"stage {cfg.stage}",
                       dynamic_ncols=True, file=sys.stderr)
        if d.main:
            n_train = sum(self.trainable_counts.values())
            print(f"training {cfg.name}: {self.model_source}; trainable {n_train / 1e6:.2f}M "
                  f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in self.trainable_counts.items() if v)}); "
                  f"{d.world} process(es), strategy {d.strategy}, device {d.device}, "
                  f"{'bf16 autocast' if self.amp else 'fp32'}; global batch "
                  f"{self.global_batch_desc()}", file=sys.stderr)
        it = iter(self.loader)
        last_save = None
        t_log, tokens_log, steps_log = time.time(), 0.0, 0
        while self.step < run.steps:
            step = self.step
            t0 = time.time()
            factor = lr_factor(step, run.steps, cfg.optim)
            set_lr(self.optimizer, factor)
            # per task: loss sum, micro-batch count; then tokens, skipped items, samples
            stats = torch.zeros(9, dtype=torch.float64, device=d.device)
            for j in range(self.accum):
                batch = next(it)
                G = self.next_G + d.rank * self.accum + j
                if batch["G"] != G:
                    raise RuntimeError(f"data out of step: expected micro-batch {G}, got "
                                       f"{batch['G']}")
                loss = self.micro_step(batch, G, last=j == self.accum - 1)
                k = TASKS.index(batch["task"])
                stats[2 * k] += loss.double()
                stats[2 * k + 1] += 1
                stats[6] += batch["tokens"]
                stats[7] += batch["skipped"]
                stats[8] += batch["input_ids"].shape[0]
            if d.world > 1:
                dist.all_reduce(stats)
            s = stats.tolist()
            n_micro = s[1] + s[3] + s[5]
            loss = (s[0] + s[2] + s[4]) / n_micro
            losses = {t: s[2 * k] / s[2 * k + 1] for k, t in enumerate(TASKS) if s[2 * k + 1]}
            if not math.isfinite(loss):
                self._fail(step, f"non-finite loss ({', '.join(f'{t} {v}' for t, v in losses.items())})")
            clip = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            gnorm = float(_full(gnorm)) if hasattr(gnorm, "full_tensor") else float(gnorm)
            if not math.isfinite(gnorm):
                self._fail(step, f"non-finite gradient norm ({gnorm}) with loss {loss:.4f}")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params],
                                     1.0 - ema_decay(run.ema, step))
            self.step = step + 1
            dt = time.time() - t0
            self.elapsed += dt
            self.skipped += int(s[7])
            for k, t in enumerate(TASKS):  # samples per task, from the micro-batch counts
                self.samples_seen[t] += int(s[2 * k + 1]) * getattr(cfg.data.micro_batch, t)
            tokens_log += s[6]
            steps_log += 1

            if self.step % run.log_interval == 0 or self.step == run.steps:
                now = time.time()
                rec = {"step": self.step, "loss": loss, **{f"loss_{t}": v for t, v in losses.items()},
                       "lr_factor": factor, "grad_norm": gnorm,
                       **{f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups
                          if not g["name"].endswith("_no_decay")},
                       "tokens_per_s": tokens_log / max(now - t_log, 1e-9),
                       "steps_per_s": steps_log / max(now - t_log, 1e-9),
                       "samples": int(s[8]), "skipped_items": self.skipped,
                       "elapsed_s": self.elapsed, "peak_mem_gb": peak_memory_gb(d.device)}
                t_log, tokens_log, steps_log = now, 0.0, 0
                records.append(rec)
                if d.main:
                    self._log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"loss": f"{loss:.4f}",
                                 **{t: f"{v:.3f}" for t, v in losses.items()},
                                 "lr": f"{self.optimizer.param_groups[0]['lr']:.1e}"},
                                refresh=False)
            if self.step % run.save_interval == 0 or self.step == run.steps:
                last_save = self.save()
            if run.sample_interval and self.step % run.sample_interval == 0:
                self.sample_and_judge()
        if bar is not None:
            bar.close()
        if run.export_final:
            self.export(self.out / "final")
        if d.main and last_save is not None:
            print(f"done: step {self.step}; checkpoint {last_save}", file=sys.stderr)
        return records

    def _fail(self, step: int, what: str):
        latest = latest_checkpoint(self.ckpt_dir)
        where = (f"the last good checkpoint is {latest} (step {latest.name.split('_')[-1].lstrip('0') or 0})"
                 if latest else "no checkpoint was saved yet")
        raise TrainingError(f"{what} at step {step + 1}: training stopped; {where}. Resume with "
                            "--resume (perhaps with a lower learning rate or optim.clip_grad_norm).")

    def global_batch_desc(self) -> str:
        pattern = self.dataset.schedule.pattern
        per = {t: 0 for t in TASKS}
        for j in range(self.accum):
            per[pattern[j % len(pattern)]] += getattr(self.cfg.data.micro_batch, pattern[j % len(pattern)])
        total = sum(per.values()) * self.dist.world
        return (f"~{total} samples/step ({', '.join(f'{t} {v * self.dist.world}' for t, v in per.items() if v)}; "
                f"{self.accum} micro-batches x {self.dist.world} process(es))")

    # -- logging, samples, export --------------------------------------------------------------

    def _log(self, rec: dict):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()
        if not self.cfg.run.progress and "loss" in rec:
            tasks = " ".join(f"{k[5:]} {v:.4f}" for k, v in rec.items() if k.startswith("loss_"))
            print(f"step {rec['step']}: loss {rec['loss']:.4f} ({tasks}) grad {rec['grad_norm']:.3f} "
                  f"{rec['tokens_per_s']:.0f} tok/s", file=sys.stderr)

    @contextlib.contextmanager
    def _inference(self):
        """Eval mode with whole parameters (FSDP: gathered on every rank for the duration), and
        the EMA weights in place of the trained ones when EMA is kept: samples and judge scores
        then show the weights that are exported."""
        from torch.distributed.fsdp import FSDPModule

        fsdp = [m for m in self.loss_module.modules() if isinstance(m, FSDPModule)]
        self.model.eval()
        backup = None
        if self.ema is not None:
            with torch.no_grad():
                backup = [p.detach().clone() for p in self.params]
                for p, e in zip(self.params, self.ema):
                    p.detach().copy_(e)
        for m in fsdp:
            m.unshard()
        try:
            with torch.no_grad(), self._autocast():
                yield
        finally:
            for m in fsdp:
                m.reshard()
            if backup is not None:
                with torch.no_grad():
                    for p, b in zip(self.params, backup):
                        p.detach().copy_(b)
            self.model.train()

    def generate(self, prompts: list[str], seed: int) -> list:
        """Images for ``prompts`` at the training size (every FSDP rank must call)."""
        from PIL import Image

        tok, dev, S = self.tokenizer, self.dist.device, self.cfg.data.image_size
        rows = [tok.generation_ids(p, self.cfg.data.max_prompt_tokens) for p in prompts]
        rows += [tok.unconditional_ids()] * len(rows)
        ids, mask = pad_ids(rows, tok.pad_id)
        grid = self.model.grid_for(S)
        draws = TorchDraws(torch.Generator(dev).manual_seed(seed))
        with self._inference():
            tokens = sample_tokens(self.model, ids.to(dev), mask.to(dev), grid, draws,
                                   num_iter=self.cfg.run.sample_steps, cfg=self.cfg.run.sample_cfg)
            images = to_uint8(self.model.decode_tokens(tokens[: len(prompts)], grid).float()).cpu()
        return [Image.fromarray(im.numpy()) for im in images]

    def sample_and_judge(self):
        """A grid of the sample prompts, and the ShapeWorld judge's score (``run.judge_images``)."""
        import warnings

        run, d = self.cfg.run, self.dist
        if d.strategy != "fsdp" and not d.main:
            d.barrier()
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long prompts are cut to the training length
            images = self.generate(list(run.sample_prompts), seed=run.seed) if run.sample_prompts else []
            rec = {"step": self.step}
            if run.judge_images:
                rec.update(self.judge(run.judge_images))
            if run.vqa_images:
                rec.update(self.vqa(run.vqa_images))
        if d.main:
            if images:
                path = self.out / "samples" / f"step_{self.step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image_grid(images).save(path)
            if len(rec) > 1:
                self._log(rec)
        if d.strategy != "fsdp":
            d.barrier()

    def judge(self, n: int) -> dict:
        """Generate n ShapeWorld prompts of held-out scenes and score them with the judge."""
        from ..data.shapeworld import ShapeWorld
        from ..eval.judge import judge_image, summarize

        world = ShapeWorld(size=self.cfg.data.image_size, seed=10_000 + self.cfg.run.seed)
        specs, i = [], 0
        while len(specs) < n:
            sp = world.sample(i).specs()
            if sp:
                specs.append(sp[i % len(sp)])
            i += 1
        results = []
        for b in range(0, n, 16):
            chunk = specs[b: b + 16]
            imgs = self.generate([s.prompt for s in chunk], seed=self.cfg.run.seed + b)
            results += [judge_image(im, s) for im, s in zip(imgs, chunk)]
        summary = summarize(results)
        out = {"judge_overall": summary["overall"]}
        out.update({f"judge_{t}": c["accuracy"] for t, c in summary["categories"].items()})
        return out

    def vqa(self, n: int) -> dict:
        """Greedy answers to the questions of n ShapeWorld evaluation scenes, scored per type."""
        from ..eval.vqa import build_vqa_eval_set, evaluate_vqa
        from ..pipeline import Harmon

        items = build_vqa_eval_set(n, size=self.cfg.data.image_size, seed=self.cfg.run.seed)
        harmon = Harmon(self.model, self.tokenizer, trained=True)
        preds = []
        with self._inference():
            for b in range(0, len(items), 32):
                chunk = items[b: b + 32]
                preds += harmon.answer([it.scene.render() for it in chunk],
                                       [it.question for it in chunk], max_new_tokens=8)
        scores = evaluate_vqa(items, preds)
        out = {f"vqa_{t}": v["accuracy"] for t, v in scores["per_type"].items()}
        out["vqa_overall"] = scores["overall"]
        return out

    def notes(self) -> dict[str, str]:
        """The notes (:data:`harmon.checkpoints.NOTE_KEYS`) of this run's checkpoints and export."""
        made = f"harmon train ({self.cfg.name}, step {self.step})"
        if self.init_notes.get("trained_by"):
            # a continuation keeps its init's story (e.g. "VAE decoder from ...") instead of
            # hiding it behind the last run's name
            made += f" from [{self.init_notes['trained_by']}]"
        notes = {"trained_by": made}
        if "answer_instruction" in self.init_notes:
            notes["answer_instruction"] = self.init_notes["answer_instruction"]
        if any(s.kind == "shapeworld" and s.task == "i2t" for s in self.cfg.data.sources):
            # its questions carry the short-answer line; answer() should add it too
            notes["answer_instruction"] = SHORT_ANSWER_PROMPT
        return notes

    def export(self, path: Path):
        """The whole model (VAE included; EMA weights when kept) as a directory
        :meth:`harmon.Harmon.from_pretrained` loads."""
        if self.dist.strategy != "fsdp" and not self.dist.main:
            self.dist.barrier()
            return
        sd = {k: _full(v) for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            for p, e in zip(self.params, self.ema):
                sd[self.names[id(p)]] = _full(e)
        if self.dist.main:
            m = checkpoints.empty_model(self.model.cfg)
            checkpoints.load_weights(m, sd, dtype=torch.float32, source="trained weights")
            checkpoints.save_pretrained(m, path, self.tokenizer, extra_config=self.notes())
        self.dist.barrier()


# ----------------------------------------------------------------------------------------------
# helpers


def ema_decay(decay: float, step: int) -> float:
    """EMA decay at optimiser step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``.

    The warm-up keeps the random initial weights from lingering in a short run's average (with a
    constant 0.999 they would still weigh 13% after 2000 steps); it depends on the step alone, so a
    resumed run averages exactly like an uninterrupted one.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def check_paths(cfg: TrainConfig) -> None:
    """Every file the config names must exist (data sources, weights, tokenizer)."""
    from .data import SOURCE_EXTS, _expand_paths

    for key in ("init", "llm_init", "mar_init", "vae", "tokenizer"):
        path = getattr(cfg.model, key)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"model.{key} = {path} does not exist")
    for i, sc in enumerate(cfg.data.sources):
        if sc.kind != "shapeworld":
            _expand_paths(sc.path, SOURCE_EXTS[sc.kind])
            if sc.image_root and not Path(sc.image_root).is_dir():
                raise FileNotFoundError(f"data.sources.{i}.image_root = {sc.image_root} is not a "
                                        "directory")


def shard_model(root: nn.Module, model: HarmonModel, d: Dist) -> None:
    """FSDP2: one unit per LLM layer, per MAR block and for the head; the rest in the root.

    The frozen VAE is left whole on every rank (``ignored_params``): it runs outside any forward
    hook (``encode_images`` is a method) and is small next to the rest.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in model.llm.model.layers:
        fully_shard(layer, mesh=mesh)
    for blk in [*model.mar.encoder_blocks, *model.mar.decoder_blocks]:
        fully_shard(blk, mesh=mesh)
    fully_shard(model.mar.diffloss.net, mesh=mesh)
    fully_shard(root, mesh=mesh, ignored_params=set(model.vae.parameters()))


def load_training_weights(model: HarmonModel, sd: dict[str, torch.Tensor], source: str) -> None:
    """A training checkpoint (no VAE, no tied output embedding) into a built model."""
    own = model.state_dict()
    tied = model.cfg.llm.tie_word_embeddings
    missing = [k for k in own if k not in sd and not k.startswith("vae.")
               and not (tied and k == "llm.lm_head.weight")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise checkpoints.CheckpointError(f"{source} does not match the model: missing "
                                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise checkpoints.CheckpointError(f"{source}: {k} is {tuple(v.shape)}, the model "
                                                  f"has {tuple(own[k].shape)}")
            own[k].copy_(v)


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """AdamW state keyed by parameter name, with whole tensors (all ranks call under FSDP)."""
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for i, st in sorted(sd["state"].items())}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [order[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, names: dict[int, str]) -> None:
    """Inverse of :func:`optimizer_state` (tensors re-sharded like their parameters)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {names[id(p)]: i for i, p in enumerate(params)}
    saved_names = [n for g in saved["param_groups"] for n in g["params"]]
    if sorted(saved_names) != sorted(index):
        extra, lack = set(saved_names) - set(index), set(index) - set(saved_names)
        raise checkpoints.CheckpointError(
            "the checkpoint's optimizer trains other parameters than this run (did optim.frozen "
            f"change?): only in the checkpoint {sorted(extra)[:4]}, only here {sorted(lack)[:4]}")
    state = {}
    for name, st in saved["state"].items():
        i = index[name]
        state[i] = {k: (v if k == "step" else _like(v, params[i])) if isinstance(v, torch.Tensor)
                    else v for k, v in st.items()}
    groups = []
    for g, sg in zip(optimizer.param_groups, saved["param_groups"]):
        groups.append({**{k: v for k, v in sg.items() if k != "params"},
                       "params": [index[n] for n in sg["params"]]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (incomplete ones are never renamed to ``step_*``)."""
    found = sorted(p for p in Path(ckpt_dir).glob("step_*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a line cut by a crash
    path.write_text("".join(k + "\n" for k in keep))


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:  # VmHWM: unlike ru_maxrss it is not inherited from a parent across fork + exec
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def image_grid(images: list, cols: int | None = None):
    from PIL import Image

    cols = cols or min(len(images), 8)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
