"""Training a small KL autoencoder on ShapeWorld (``harmon train-vae``).

The released Harmon uses MAR's frozen KL-16 tokenizer. The project's own small model needs a
tokenizer of the same family (LDM-style ``AutoencoderKL``) with smaller widths, trained here on
ShapeWorld images: an L1 + L2 reconstruction loss through a posterior sample plus a small KL term.
At the end the latent scale is measured (``vae_scale`` = 1 / std of the posterior means, the role
0.2325 plays for KL-16) and written next to the weights.

    harmon train-vae --out runs/vae --steps 3000 --size 64

Not in Harmon: ``--decoder-only --init MODEL --latent-noise S`` fine-tunes the decoder of a
trained model's VAE alone, on scaled latents with Gaussian noise of a per-token level drawn from
[0, S]. The encoder, and with it the latent space the generator and the understanding path were
trained on, stays as it is (so does the latent scale); the decoder learns to turn the slightly
wrong latents a generator draws into clean images.

    harmon train-vae --decoder-only --init harmon/assets/shapeworld --latent-noise 1.0 \
        --out runs/vae_decoder --steps 1500 --crop 0 --lr 2e-4
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..checkpoints import write_safetensors
from ..configs import VAEConfig
from ..models.vae import AutoencoderKL
from ..rng import TorchDraws


@dataclass
class VAETrainConfig:
    out_dir: str = "runs/vae"
    size: int = 64  # image side
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(
        ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, encoder_attn_resolutions=(8,), resolution=64))
    steps: int = 3000
    batch_size: int = 16
    crop: int = 32  # train on random crops (offsets on the latent grid); 0 = whole images
    lr: float = 3e-4
    warmup: int = 100
    kl_weight: float = 1e-6
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    seed: int = 0  # model init and posterior noise
    data_seed: int = 1  # ShapeWorld seed
    log_every: int = 50
    save_every: int = 500
    stop_at: int = 0  # stop (and export) at this step of the schedule; 0 = run all steps
    threads: int = 0  # torch threads (0: leave torch's default)
    init: str = ""  # start from this VAE: a train-vae output or a Harmon model directory
    decoder_only: bool = False  # train the decoder alone; the encoder and latent scale stay init's
    latent_noise: float = 0.0  # noise on the scaled latents: per-token std drawn from [0, this]

    def __post_init__(self):
        if self.decoder_only and not self.init:
            raise ValueError("decoder_only needs init (--decoder-only needs --init): the trained "
                             "VAE whose decoder to fine-tune")
        if not math.isfinite(self.latent_noise) or self.latent_noise < 0:
            raise ValueError(f"latent_noise must be a finite number >= 0, got {self.latent_noise}")
        if self.latent_noise and not self.init:
            raise ValueError("latent_noise needs init (--latent-noise needs --init): the noise is "
                             "in units of its latent scale")


def shapeworld_batch(world, start: int, batch: int) -> torch.Tensor:
    """Images ``start .. start+batch-1`` of a ShapeWorld as (B, 3, S, S) in [-1, 1]."""
    return scene_pixels([world.sample(start + i) for i in range(batch)])


def scene_pixels(scenes) -> torch.Tensor:
    """ShapeWorld scenes rendered as (B, 3, S, S) in [-1, 1]."""
    arr = np.stack([s.render_array().astype(np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def random_crops(x: torch.Tensor, crop: int, stride: int, gen: torch.Generator) -> torch.Tensor:
    """One crop x crop window per image, at offsets that are multiples of the VAE stride.

    The autoencoder is convolutional, so crops teach it the same local job at a fraction of the
    cost; aligned offsets keep the latent grid where it is at full size.
    """
    B, _, H, W = x.shape
    if not crop or crop >= min(H, W):
        return x
    n_y, n_x = (H - crop) // stride + 1, (W - crop) // stride + 1
    oy = torch.randint(0, n_y, (B,), generator=gen) * stride
    ox = torch.randint(0, n_x, (B,), generator=gen) * stride
    return torch.stack([x[b, :, oy[b]: oy[b] + crop, ox[b]: ox[b] + crop] for b in range(B)])


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = float(((x.clamp(-1, 1) - y) ** 2).mean()) / 4.0
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def noisy_latents(z: torch.Tensor, scale: float, max_std: float, gen: torch.Generator) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) with Gaussian noise whose std, in units of the scaled
    latents (unit variance), is drawn uniformly from [0, max_std] for every token."""
    if max_std <= 0:
        return z
    B, _, h, w = z.shape
    std = torch.rand(B, 1, h, w, generator=gen) * max_std
    return z + std * torch.randn(z.shape, generator=gen) / scale


def init_vae(path: str | Path, vae_cfg: VAEConfig) -> tuple[AutoencoderKL, float]:
    """The VAE and latent scale of a ``harmon train-vae`` output or of a Harmon model directory,
    checked against the architecture ``vae_cfg``."""
    p = Path(path)
    if (p / "vae_config.json").is_file():
        model, got, scale = load_vae(p)
    elif p.is_dir() and (p / "config.json").is_file():
        from ..checkpoints import load_harmon

        harmon = load_harmon(p)
        model, got, scale = harmon.vae, harmon.cfg.vae, harmon.cfg.vae_scale
    else:
        raise FileNotFoundError(f"{p} is neither a harmon train-vae output (vae_config.json) nor "
                                "a Harmon model directory (config.json)")
    if got != vae_cfg:
        raise ValueError(f"the VAE in {p} ({got}) is not the architecture to train ({vae_cfg})")
    return model.float(), float(scale)


def _lr(cfg: VAETrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(cfg: VAETrainConfig, resume: bool = False, log=print) -> Path:
    """Train and write ``vae.safetensors`` + ``vae_config.json`` to ``cfg.out_dir``."""
    from ..data.shapeworld import ShapeWorld

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        model, scale = init_vae(cfg.init, cfg.vae)
    else:
        model, scale = AutoencoderKL(cfg.vae), 1.0
        model.initialize_weights()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.requires_grad_(True)
    if cfg.decoder_only:
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    state_file = out / "train_state.pt"
    if resume and state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start = int(state["step"])
        log(f"resumed at step {start}")
    world = ShapeWorld(size=cfg.size, seed=cfg.data_seed)
    draws = TorchDraws(gen)
    metrics = (out / "metrics.jsonl").open("a")
    t0 = time.perf_counter()
    model.train()
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    for step in range(start, end):
        x = shapeworld_batch(world, step * cfg.batch_size, cfg.batch_size)
        x = random_crops(x, cfg.crop, cfg.vae.stride, gen)
        if cfg.decoder_only:  # the frozen encoder's posterior mean, as Harmon reads it
            with torch.no_grad():
                z, kl = model.encode(x), torch.zeros(())
        else:
            moments = model.encode_moments(x)
            z, kl = model.sample(moments, draws), model.kl(moments).mean() / x[0].numel()
        recon = model.decode(noisy_latents(z, scale, cfg.latent_noise, gen))
        l1 = (recon - x).abs().mean()
        l2 = ((recon - x) ** 2).mean()
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"VAE loss became {float(loss)} at step {step}; the last "
                                     f"checkpoint in {out} is kept")
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            rec = {"step": step + 1, "loss": loss.item(), "l1": l1.item(), "kl": kl.item(),
                   "psnr": psnr(recon.detach(), x), "lr": _lr(cfg, step),
                   "s_per_step": (time.perf_counter() - t0) / (step + 1 - start)}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            log(f"step {rec['step']}/{end} loss {rec['loss']:.4f} psnr {rec['psnr']:.1f} dB "
                f"({rec['s_per_step']:.2f} s/step)")
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            tmp = out / "train_state.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "generator": gen.get_state(), "step": step + 1}, tmp)
            tmp.replace(state_file)
    metrics.close()
    model.eval()
    if not cfg.decoder_only:  # a frozen encoder keeps the latent space its generator knows
        scale = measure_scale(model, world, cfg)
    write_vae(model, cfg.vae, scale, out)
    log(f"wrote {out / 'vae.safetensors'} (latent scale {scale:.4f}, full-size PSNR "
        f"{evaluate_vae(model, world):.1f} dB)")
    return out


@torch.no_grad()
def measure_scale(model: AutoencoderKL, world, cfg: VAETrainConfig, n: int = 256) -> float:
    """1 / std of posterior means over held-back images, so scaled latents have unit variance."""
    x = shapeworld_batch(world, 10_000_000, n)
    return float(1.0 / model.encode(x).std())


@torch.no_grad()
def evaluate_vae(model: AutoencoderKL, world, n: int = 64) -> float:
    """PSNR (dB) of full-size reconstructions through the posterior mean, on held-back images."""
    x = shapeworld_batch(world, 20_000_000, n)
    return psnr(model.decode(model.encode(x)), x)


def write_vae(model: AutoencoderKL, vae_cfg: VAEConfig, scale: float, out: Path) -> None:
    write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()},
                      out / "vae.safetensors")
    d = asdict(vae_cfg)
    (out / "vae_config.json").write_text(json.dumps({"vae": d, "vae_scale": round(scale, 5)},
                                                    indent=1))


def load_vae(path: str | Path) -> tuple[AutoencoderKL, VAEConfig, float]:
    """Read what :func:`train_vae` wrote: (model, config, latent scale)."""
    path = Path(path)
    meta = json.loads((path / "vae_config.json").read_text())
    vcfg = VAEConfig.from_dict(meta["vae"])
    model = AutoencoderKL(vcfg)
    model.load_state_dict(load_file(str(path / "vae.safetensors")))
    return model.eval(), vcfg, float(meta["vae_scale"])


def add_train_vae_command(subparsers) -> None:
    from ..cli import examples

    p = subparsers.add_parser("train-vae", help="train a small KL autoencoder on ShapeWorld",
                              **examples("harmon train-vae --out runs/vae --steps 3000",
                                         "harmon train-vae --out runs/vae --steps 9000 --crop 0 "
                                         "--resume",
                                         "harmon train-vae --decoder-only --init "
                                         "harmon/assets/shapeworld --latent-noise 1.0 --out "
                                         "runs/vae_decoder --steps 1500 --crop 0 --lr 2e-4"))
    d = VAETrainConfig()
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--crop", type=int, default=d.crop, help="crop side (0: whole images)")
    p.add_argument("--stop-at", type=int, default=0, help="stop at this step of the schedule")
    p.add_argument("--preset", default="shapeworld", help="preset whose VAE architecture to train")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--init", default="", help="start from this VAE: a train-vae output or a "
                   "Harmon model directory")
    p.add_argument("--decoder-only", action="store_true", help="train the decoder alone; the "
                   "encoder and the latent scale stay those of --init")
    p.add_argument("--latent-noise", type=float, default=0.0, help="Gaussian noise on the scaled "
                   "latents, its per-token std drawn from [0, this] (needs --init)")
    p.set_defaults(func=_cmd_train_vae)


def _cmd_train_vae(args) -> int:
    from ..configs import preset

    vae = preset(args.preset).vae
    cfg = VAETrainConfig(out_dir=args.out, size=args.size, vae=vae, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         crop=args.crop, stop_at=args.stop_at, seed=args.seed,
                         data_seed=args.data_seed, init=args.init,
                         decoder_only=args.decoder_only, latent_noise=args.latent_noise)
    if not args.resume and (Path(args.out) / "train_state.pt").is_file():
        raise ValueError(f"{args.out} already holds a VAE run; pass --resume to continue it or "
                         "choose another --out")
    train_vae(cfg, resume=args.resume)
    return 0
