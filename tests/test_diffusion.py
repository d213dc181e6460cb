"""Diffusion head network, loss and sampler against fixture cases 03, 04 and 04b."""

from pathlib import Path

import numpy as np
import pytest
import torch

from harmon.fixtures import FixtureCase
from harmon.models.diffusion import (DiffLoss, GaussianDiffusion, cosine_betas, create_diffusion,
                                     space_timesteps)
from harmon.models.head import SimpleMLPAdaLN
from harmon.rng import TorchDraws

ROOT = Path(__file__).parent / "fixtures/harmon_reference"

KEPT_100 = [
    0, 10, 20, 30, 40, 50, 61, 71, 81, 91, 101, 111, 121, 131, 141, 151, 161, 172, 182, 192, 202, 212,
    222, 232, 242, 252, 262, 272, 283, 293, 303, 313, 323, 333, 343, 353, 363, 373, 383, 394, 404, 414,
    424, 434, 444, 454, 464, 474, 484, 494, 505, 515, 525, 535, 545, 555, 565, 575, 585, 595, 605, 616,
    626, 636, 646, 656, 666, 676, 686, 696, 706, 716, 727, 737, 747, 757, 767, 777, 787, 797, 807, 817,
    827, 838, 848, 858, 868, 878, 888, 898, 908, 918, 928, 938, 949, 959, 969, 979, 989, 999,
]


def load(name):
    return FixtureCase.load(ROOT / name)


def build_diffloss(case):
    diffloss = DiffLoss(case.config().mar)
    diffloss.net.load_state_dict(case.weights("mar.diffloss.net."), strict=True)
    return diffloss.eval()


def assert_close(out, ref, name, rtol=1e-4):
    """Elementwise rule abs <= 1e-4 + rtol*|ref|."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs()
    assert not (err > 1e-4 + rtol * ref.abs()).any(), f"{name}: max abs error {err.max().item():.3g}"


@pytest.fixture(scope="module")
def case03():
    return load("03_diffloss_net")


@pytest.fixture(scope="module")
def diffloss(case03):
    return build_diffloss(case03)


# -- schedule and respacing --------------------------------------------------------------------


def test_schedule_tables(case03, diffloss):
    assert np.abs(cosine_betas(1000) - case03["out.train_betas"].numpy()).max() <= 1e-12
    assert cosine_betas(1000)[-1] == 0.999  # the cap
    gen = diffloss.gen_diffusion
    assert np.array_equal(gen.timestep_map, case03["out.gen_timestep_map"].numpy())
    assert np.abs(gen.betas - case03["out.gen_betas"].numpy()).max() <= 1e-12
    # respaced cumulative products equal the original ones at the kept steps
    train = diffloss.train_diffusion
    assert np.allclose(gen.alphas_cumprod, train.alphas_cumprod[gen.timestep_map], rtol=1e-9, atol=0)


def test_space_timesteps():
    assert space_timesteps(1000, "100") == KEPT_100
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert create_diffusion("100").timestep_map.tolist() == KEPT_100
    assert create_diffusion(None).num_timesteps == 1000
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim50")
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


# -- case 03: network and training loss --------------------------------------------------------


@torch.no_grad()
def test_net_out(case03, diffloss):
    out = diffloss.net(case03["in.x"], case03["in.t"], case03["in.c"])
    assert_close(out, case03["out.net_out"], "net_out")


@torch.no_grad()
def test_net_out_cfg(case03, diffloss):
    x = case03["in.x"]
    out = diffloss.net.forward_with_cfg(torch.cat([x[:4], x[:4]]), case03["in.t"], case03["in.c"], 3.0)
    assert_close(out, case03["out.net_out_cfg"], "net_out_cfg")


@torch.no_grad()
def test_training_losses(case03, diffloss):
    draws = case03.draws()
    loss = diffloss(case03["in.target"], case03["in.z"], None, draws)
    loss_masked = diffloss(case03["in.target"], case03["in.z"], case03["in.loss_mask"], draws)
    assert draws.exhausted
    assert_close(loss.reshape(1), case03["out.loss"], "loss", rtol=1e-3)
    assert_close(loss_masked.reshape(1), case03["out.loss_masked"], "loss_masked", rtol=1e-3)

    terms = diffloss.train_diffusion.training_losses(
        diffloss.net, case03["in.target"], case03["draw_0000"], case03["in.z"], case03["draw_0001"])
    assert_close(terms["loss"], case03["out.loss_per_token"], "loss_per_token", rtol=1e-3)
    assert_close(terms["vb"], case03["out.vb_per_token"], "vb_per_token", rtol=1e-3)
    assert_close(terms["mse"], case03["out.mse_per_token"], "mse_per_token")


def test_per_row_losses_are_the_fixture_tokens_losses(case03, diffloss):
    """per_row returns the (n,) losses of the same draws, which the masked mean weighs."""
    rows = diffloss(case03["in.target"], case03["in.z"], draws=case03.draws(), per_row=True)
    assert_close(rows, case03["out.loss_per_token"], "loss_per_token", rtol=1e-3)
    mask = case03["in.loss_mask"]
    masked = diffloss(case03["in.target"], case03["in.z"], mask, case03.draws())
    assert torch.equal((rows * mask).sum() / mask.sum(), masked)


def test_vb_trains_only_variance_channels():
    """The VLB sees eps detached: its gradient reaches channels 16..31 only, the MSE's 0..15 only."""
    diffusion = create_diffusion(None)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    t = torch.tensor([0, 1, 5, 300, 800, 999])
    net_out = torch.randn(6, 32, generator=g, requires_grad=True)
    net = lambda x, t_orig, z: net_out * 1.0

    terms = diffusion.training_losses(net, x0, t, None, noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), net_out, retain_graph=True)
    assert grad_vb[:, :16].abs().max() == 0 and grad_vb[:, 16:].abs().min() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), net_out)
    assert grad_mse[:, 16:].abs().max() == 0 and grad_mse[:, :16].abs().max() > 0


# -- case 04: full sampling loops --------------------------------------------------------------


@torch.no_grad()
def test_sample_loops():
    case = load("04_diffusion_sample")
    diffloss = build_diffloss(case)
    draws = case.draws()
    for run in case.params["runs"]:
        out = diffloss.sample(case["in." + run["z"]], run["temperature"], run["cfg"], draws)
        ref = case["out.sample_" + run["name"]]
        assert out.shape == ref.shape
        err = (out - ref).abs().max() / ref.abs().max()
        assert err <= 1e-4, f"sample_{run['name']}: relative error {err.item():.3g}"
    assert draws.exhausted


# -- case 04b: single guided steps, elementwise -------------------------------------------------


@torch.no_grad()
def test_guided_steps():
    case = load("04b_diffusion_step")
    diffloss = build_diffloss(case)
    draws = case.draws()
    x, z = case["in.x"], case["in.z"]
    for k in case.params["ks"]:
        step = diffloss.gen_diffusion.guided_step(diffloss.net, x, k, z, case.params["cfg"],
                                                  case.params["temperature"], draws.randn_like(x))
        for name in ("eps", "log_variance", "mean", "x_next"):
            assert_close(step[name], case[f"out.{name}_k{k}"], f"{name}_k{k}")
    assert draws.exhausted


# -- reproducibility, devices, init --------------------------------------------------------------


def test_sample_reproducible_with_torch_draws(diffloss):
    z = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    a = diffloss.sample(z, 1.0, 2.0, TorchDraws(torch.Generator().manual_seed(7)))
    b = diffloss.sample(z, 1.0, 2.0, TorchDraws(torch.Generator().manual_seed(7)))
    c = diffloss.sample(z, 1.0, 2.0, TorchDraws(torch.Generator().manual_seed(8)))
    assert a.shape == (6, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="even batch"):
        diffloss.sample(z[:5], 1.0, 2.0, TorchDraws(torch.Generator().manual_seed(7)))


def test_fresh_head_predicts_zero():
    net = SimpleMLPAdaLN(in_channels=16, model_channels=32, out_channels=32, z_channels=8,
                         num_res_blocks=2)
    out = net(torch.randn(4, 16), torch.tensor([0, 10, 500, 999]), torch.randn(4, 8))
    assert out.shape == (4, 32) and out.abs().max() == 0
    assert net.time_embed.mlp[0].weight.std() < 0.05
    assert net.res_blocks[0].mlp[0].weight.abs().max() > 0


def test_grad_checkpointing_matches(case03):
    diffloss = build_diffloss(case03)
    args = (case03["in.x"], case03["in.t"], case03["in.c"])
    diffloss.train()
    ref = diffloss.net(*args)
    diffloss.net.grad_checkpointing = True
    out = diffloss.net(*args)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert diffloss.net.res_blocks[0].mlp[0].weight.grad is not None


def test_diffloss_needs_draws(diffloss, case03):
    with pytest.raises(ValueError, match="draws"):
        diffloss(case03["in.target"], case03["in.z"])
    assert isinstance(diffloss.gen_diffusion, GaussianDiffusion)
