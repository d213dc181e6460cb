"""KL-16 VAE against fixture case 01_vae (tolerance abs <= 1e-4 + 1e-4*|ref|)."""

from pathlib import Path

import pytest
import torch

from harmon.fixtures import FixtureCase
from harmon.models.vae import AutoencoderKL

CASE = Path(__file__).parent / "fixtures/harmon_reference/01_vae"
SCALE = 0.2325  # applied by the Harmon model, not by the VAE; the fixture includes it


@pytest.fixture(scope="module")
def case():
    return FixtureCase.load(CASE)


@pytest.fixture(scope="module")
def vae(case):
    model = AutoencoderKL(case.config().vae)
    model.load_state_dict(case.weights("vae."), strict=True)
    return model.eval()


def assert_close(out, ref, name):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs()
    bad = err > 1e-4 + 1e-4 * ref.abs()
    assert not bad.any(), f"{name}: max abs error {err.max().item():.3g}"


def to_tokens(latent):
    """(B, 16, h, w) -> channels last (B, h, w, 16)."""
    return latent.permute(0, 2, 3, 1)


@torch.no_grad()
def test_moments(case, vae):
    moments = vae.encode_moments(case["in.x64"])
    assert moments.shape == (2, 32, 4, 4)
    assert_close(moments, case["out.moments64"], "moments64")


@torch.no_grad()
@pytest.mark.parametrize("size", [64, 128])
def test_encode(case, vae, size):
    mean = vae.encode(case[f"in.x{size}"])
    assert mean.shape == (case[f"in.x{size}"].shape[0], 16, size // 16, size // 16)
    assert_close(to_tokens(mean * SCALE), case[f"out.z{size}"], f"z{size}")


@torch.no_grad()
def test_decode(case, vae):
    z = case["in.z_in"].permute(0, 3, 1, 2).contiguous() / SCALE
    x = vae.decode(z)
    assert x.shape == (2, 3, 64, 64)
    assert_close(x, case["out.x_dec"], "x_dec")


@torch.no_grad()
def test_decode_channels_last_view(case, vae):
    # the reference fed a non-contiguous channels-last view; both layouts must agree with it
    x = vae.decode((case["in.z_in"] / SCALE).permute(0, 3, 1, 2))
    assert_close(x, case["out.x_dec"], "x_dec (channels-last view)")


@torch.no_grad()
def test_decode_128(case, vae):
    x = vae.decode(case["out.z128"].permute(0, 3, 1, 2).contiguous() / SCALE)
    assert x.shape == (1, 3, 128, 128)
    assert_close(x, case["out.x_dec_from_z128"], "x_dec_from_z128")


def test_rejects_bad_sizes(vae):
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(torch.zeros(1, 3, 64, 72))
    with pytest.raises(ValueError, match="3, H, W"):
        vae.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="16, h, w"):
        vae.decode(torch.zeros(1, 8, 4, 4))


def test_keys_match_released_layout(case):
    # released tokenizer: ch=128, decoder without up-path attention (harmon.md §11.4)
    from harmon.configs import VAEConfig

    sd = AutoencoderKL(VAEConfig(ch=128)).state_dict()
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.down.4.attn.1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert not any(".attn." in k for k in sd if k.startswith("decoder.up."))
    assert not any("upsample" in k for k in sd if k.startswith("decoder.up.0."))
    assert not any("downsample" in k for k in sd if k.startswith("encoder.down.4."))
    assert set(case.weights("vae.")) == set(AutoencoderKL(case.config().vae).state_dict())


def test_posterior_helpers(vae):
    from harmon.rng import TorchDraws

    moments = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(0))
    moments[:, 16:] = 100.0  # clamped to 20
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1, s2 = vae.sample(moments, TorchDraws(g1)), vae.sample(moments, TorchDraws(g2))
    assert s1.shape == (2, 16, 2, 2) and torch.equal(s1, s2) and torch.isfinite(s1).all()
    zero = torch.zeros(3, 32, 2, 2)
    assert torch.allclose(vae.kl(zero), torch.zeros(3))
    assert (vae.kl(moments) > 0).all()
