"""The MAR's optional local convolutions (``MARConfig.local_conv``, not Harmon's architecture)."""

import pytest
import torch

from harmon import Harmon
from harmon.configs import MARConfig, preset
from harmon.models.mar import LocalConv
from harmon.pipeline import random_model


def _conv_harmon(width: int = 8, seed: int = 0) -> Harmon:
    """A tiny random Harmon whose local convolutions have non-zero weights (zero-initialised ones
    would hide every path through them)."""
    cfg = preset("tiny")
    cfg.mar.local_conv = width
    model = random_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for conv in (model.mar.encoder_conv, model.mar.decoder_conv):
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return Harmon(model, Harmon.from_pretrained("tiny").tokenizer, trained=False)


def _mar_out(mar, tokens, mask, grid):
    with torch.no_grad():
        return mar.decode(mar.encode(tokens, mask, grid), mask, grid)


def _random_mask(B, N, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[:masked]] = 1
    return mask


def test_adding_local_convolutions_leaves_a_trained_model_unchanged():
    """add_local_conv on a model without them: zero-initialised, so every output is as before,
    and the config records the width (checkpoints rebuild them)."""
    model = random_model(preset("tiny"), seed=3)
    mar, grid = model.mar, (4, 4)
    tokens, mask = torch.randn(2, 16, 16), _random_mask(2, 16, 9)
    before = _mar_out(mar, tokens, mask, grid)
    mar.add_local_conv(8)
    assert model.cfg.mar.local_conv == 8 and mar.encoder_conv is not None
    assert torch.equal(_mar_out(mar, tokens, mask, grid), before)
    with pytest.raises(ValueError, match="already has local convolutions"):
        mar.add_local_conv(8)
    with pytest.raises(ValueError, match="positive integer"):
        random_model(preset("tiny")).mar.add_local_conv(0)


def test_masked_latents_never_reach_the_conditions():
    """The encoder's convolution reads only visible latents: any value at a masked position gives
    the same conditions everywhere (the training loss is on exactly those positions)."""
    mar, grid = _conv_harmon().model.mar, (4, 4)
    tokens, mask = torch.randn(2, 16, 16), _random_mask(2, 16, 7, seed=1)
    other = tokens.clone()
    other[mask.bool()] = 50.0
    assert torch.equal(_mar_out(mar, tokens, mask, grid), _mar_out(mar, other, mask, grid))
    # ...while a visible latent does change them: the convolution is in the path
    changed = tokens.clone()
    changed[~mask.bool()] += 1.0
    assert not torch.allclose(_mar_out(mar, tokens, mask, grid), _mar_out(mar, changed, mask, grid))


def test_local_convolution_sees_a_5x5_neighbourhood():
    """Two 3x3 layers: a change at one grid position moves the outputs within 2 rows and columns
    of it and nowhere else; a non-square grid keeps raster order."""
    conv = LocalConv(3, 4, 5)
    torch.nn.init.normal_(conv.conv2.weight)
    h, w = 6, 7
    x = torch.randn(1, h * w, 3)
    y = x.clone()
    y[0, 2 * w + 3] += 1.0  # row 2, column 3
    with torch.no_grad():
        diff = (conv(y, (h, w)) - conv(x, (h, w))).abs().sum(-1).reshape(h, w)
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    assert rows.min() == 0 and rows.max() == 4 and cols.min() == 1 and cols.max() == 5
    assert diff[2, 3] > 0


def test_local_conv_config_is_checked():
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="mar.local_conv"):
            MARConfig(local_conv=bad)


def test_checkpoint_round_trip_keeps_the_local_convolutions(tmp_path):
    """save_pretrained records the width; from_pretrained rebuilds and fills them, so outputs
    match; weights that lack them are refused, not silently zero."""
    from safetensors.torch import load_file, save_file

    from harmon.checkpoints import CheckpointError

    pipe = _conv_harmon()
    path = pipe.save_pretrained(tmp_path / "m")
    back = Harmon.from_pretrained(path, device="cpu")
    assert back.model.cfg.mar.local_conv == 8
    tokens, mask = torch.randn(1, 16, 16), _random_mask(1, 16, 5)
    assert torch.equal(_mar_out(back.model.mar, tokens, mask, (4, 4)),
                       _mar_out(pipe.model.mar, tokens, mask, (4, 4)))
    sd = load_file(path / "model.safetensors")
    assert any(k.startswith("mar.encoder_conv.") for k in sd)
    save_file({k: v for k, v in sd.items() if "_conv." not in k}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder_conv"):
        Harmon.from_pretrained(path, device="cpu")


def test_fast_generation_equals_reference_with_local_convolutions():
    """The fast engine goes through the same encoder and decoder input, so it still matches."""
    pipe = _conv_harmon()
    kw = dict(steps=5, seed=2, cfg=3.0, output="uint8", size=64)
    ref = pipe.generate(["a red circle", "a blue star"], mode="reference", **kw)
    fast = pipe.generate(["a red circle", "a blue star"], mode="fast", **kw)
    assert (ref.int() - fast.int()).abs().max() <= 1
    plain = Harmon(random_model(preset("tiny"), seed=0), pipe.tokenizer, trained=False)
    assert not torch.equal(plain.generate(["a red circle"], mode="reference", **kw), ref[:1])


def test_training_config_adds_or_builds_local_convolutions(tmp_path):
    """model.local_conv: a random start builds them; an init without them gets them added
    (zero-initialised, outputs unchanged); a conflicting width fails; they train (the zero layer
    gets a gradient at once) in the MAR's groups."""
    from harmon.train.optim import group_of
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=["model.local_conv=8"]).model)
    assert model.cfg.mar.local_conv == 8 and "local convolutions of width 8" in source
    assert {group_of(n) for n, _ in model.named_parameters()
            if n.startswith(("mar.encoder_conv.", "mar.decoder_conv."))} == {
        "mar_encoder", "mar_decoder"}

    plain = random_model(preset("tiny"), seed=0)
    Harmon(plain, Harmon.from_pretrained("tiny").tokenizer).save_pretrained(tmp_path / "init")
    cfg = tiny_config(tmp_path, overrides=[f"model.init={tmp_path / 'init'}", "model.local_conv=8"])
    added, _, source = build_model(cfg.model)
    assert "added (zero-initialised)" in source
    tokens, mask = torch.randn(2, 16, 16), _random_mask(2, 16, 6)
    assert torch.equal(_mar_out(added.mar, tokens, mask, (4, 4)),
                       _mar_out(plain.mar, tokens, mask, (4, 4)))

    added.train()
    z = added.mar.decode(added.mar.encode(tokens, mask, (4, 4)), mask, (4, 4))
    z.square().sum().backward()
    for conv in (added.mar.encoder_conv, added.mar.decoder_conv):
        assert conv.conv2.weight.grad.abs().sum() > 0

    _conv_harmon(width=4).save_pretrained(tmp_path / "conv4")
    cfg = tiny_config(tmp_path, overrides=[f"model.init={tmp_path / 'conv4'}", "model.local_conv=8"])
    with pytest.raises(ValueError, match="already has local convolutions of width 4"):
        build_model(cfg.model)
    with pytest.raises(ValueError, match="model.local_conv"):
        tiny_config(tmp_path, overrides=["model.local_conv=-2"])


def test_info_names_the_local_convolutions(tmp_path, capsys):
    """harmon info says when a model has them (a deviation a user should see)."""
    from harmon.cli import main

    path = _conv_harmon().save_pretrained(tmp_path / "m")
    assert main(["info", "--checkpoint", str(path)]) == 0
    assert "local convolutions of width 8" in capsys.readouterr().out
    assert Harmon.from_pretrained("tiny").info()["local_conv"] == 0


def test_a_mar_checkpoint_loads_into_a_model_with_local_convolutions(tmp_path):
    """model.mar_init (a MAR .pth, which never holds them) with model.local_conv: every MAR
    weight comes from the file, the convolutions keep their initialisation (last layer zero);
    a file that lacks a real MAR weight is still refused."""
    from harmon.checkpoints import CheckpointError
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    mar_sd = random_model(preset("tiny"), seed=7).mar.state_dict()
    torch.save({"model_ema": mar_sd}, tmp_path / "mar.pth")
    cfg = tiny_config(tmp_path, overrides=[f"model.mar_init={tmp_path / 'mar.pth'}",
                                           "model.local_conv=8"])
    model, _, _ = build_model(cfg.model)
    own = model.mar.state_dict()
    assert all(torch.equal(own[k], v) for k, v in mar_sd.items())
    assert torch.equal(model.mar.encoder_conv.conv2.weight,
                       torch.zeros_like(model.mar.encoder_conv.conv2.weight))
    torch.save({"model_ema": {k: v for k, v in mar_sd.items() if k != "z_proj.weight"}},
               tmp_path / "mar.pth")
    with pytest.raises(CheckpointError, match="z_proj.weight"):
        build_model(cfg.model)
