"""Growing a trained model's MAR decoder (``MAR.add_decoder_blocks``, ``model.add_decoder_blocks``;
not Harmon's architecture) and training the generator alone: outputs unchanged at step 0, the new
blocks learn, the depth survives a checkpoint, and answers stay exactly those of the init."""

import pytest
import torch

from harmon import Harmon
from harmon.configs import preset
from harmon.pipeline import random_model
from harmon.train.engine import Trainer
from harmon.train.weights import build_model
from train_helpers import tiny_config


def _decode(mar, tokens, mask, grid=(4, 4)):
    with torch.no_grad():
        return mar.decode(mar.encode(tokens, mask, grid), mask, grid)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 16, 16, generator=g)
    mask = torch.zeros(2, 16)
    for b in range(2):
        mask[b, torch.randperm(16, generator=g)[:6]] = 1
    return tokens, mask


def _saved_tiny(path, seed=0):
    model = random_model(preset("tiny"), seed=seed)
    Harmon(model, Harmon.from_pretrained("tiny").tokenizer).save_pretrained(path)
    return model


def test_added_blocks_leave_the_outputs_unchanged_and_learn():
    model = random_model(preset("tiny"), seed=1)
    mar = model.mar
    depth = model.cfg.mar.decoder_depth
    tokens, mask = _inputs()
    before = _decode(mar, tokens, mask)
    mar.add_decoder_blocks(2)
    assert len(mar.decoder_blocks) == model.cfg.mar.decoder_depth == depth + 2
    assert torch.equal(_decode(mar, tokens, mask), before)

    mar.train()
    z = mar.decode(mar.encode(tokens, mask, (4, 4)), mask, (4, 4))
    z.square().sum().backward()
    for blk in mar.decoder_blocks[depth:]:  # the zero output layers get a gradient at once
        assert blk.attn.proj.weight.grad.abs().sum() > 0
        assert blk.mlp.fc2.weight.grad.abs().sum() > 0

    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="decoder blocks to add must be a positive integer"):
            mar.add_decoder_blocks(bad)


def test_grown_depth_survives_a_checkpoint(tmp_path):
    pipe = Harmon(random_model(preset("tiny"), seed=2), Harmon.from_pretrained("tiny").tokenizer)
    pipe.model.mar.add_decoder_blocks(1)
    assert not pipe.model.mar.decoder_blocks[-1].training  # an eval model stays in eval mode
    with torch.no_grad():  # make the new block matter, so a silent zero block would show
        for p in pipe.model.mar.decoder_blocks[-1].parameters():
            p.add_(0.05)
    back = Harmon.from_pretrained(pipe.save_pretrained(tmp_path / "m"), device="cpu")
    assert back.model.cfg.mar.decoder_depth == pipe.model.cfg.mar.decoder_depth
    tokens, mask = _inputs(1)
    assert torch.equal(_decode(back.model.mar, tokens, mask), _decode(pipe.model.mar, tokens, mask))


def test_training_config_grows_an_init_checkpoint(tmp_path):
    plain = _saved_tiny(tmp_path / "init")
    cfg = tiny_config(tmp_path, overrides=[f"model.init={tmp_path / 'init'}",
                                           "model.add_decoder_blocks=2"])
    grown, _, source = build_model(cfg.model)
    depth = plain.cfg.mar.decoder_depth
    assert grown.cfg.mar.decoder_depth == depth + 2
    assert f"decoder {depth} -> {depth + 2} blocks" in source
    tokens, mask = _inputs(2)
    assert torch.equal(_decode(grown.mar, tokens, mask), _decode(plain.mar, tokens, mask))

    with pytest.raises(ValueError, match="grows a trained model"):
        build_model(tiny_config(tmp_path, overrides=["model.add_decoder_blocks=1"]).model)
    with pytest.raises(ValueError, match="model.add_decoder_blocks must be an integer >= 0"):
        tiny_config(tmp_path, overrides=["model.add_decoder_blocks=-1"])


def test_generator_only_training_keeps_every_answer(tmp_path):
    """Frozen encoder, LLM and connectors, images to draw only, a grown decoder: the decoder and
    head change, and the understanding path (hence every answer's logits) is exactly the init's."""
    init = _saved_tiny(tmp_path / "init", seed=3)
    cfg = tiny_config(tmp_path / "run", ratio=(0, 0, 1), micro=2, steps=3,
                      overrides=[f"model.init={tmp_path / 'init'}", "model.add_decoder_blocks=1"],
                      optim={"frozen": ["mar_encoder", "llm", "connectors"]})
    tr = Trainer(cfg)
    tr.train()
    tr.dist.close()
    trained = tr.model
    init_sd = init.state_dict()
    for name, p in trained.state_dict().items():
        if name.startswith(("mar.encoder", "mar.z_proj", "mar.fake_latent", "llm.", "proj_in.",
                            "proj_out.", "vae.")):
            assert torch.equal(p, init_sd[name]), name
    assert not torch.equal(trained.state_dict()["mar.diffloss.net.input_proj.weight"],
                           init_sd["mar.diffloss.net.input_proj.weight"])

    tok = Harmon.from_pretrained("tiny").tokenizer
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (3, 64, 64, 3), generator=g, dtype=torch.uint8)
    texts = ["a red circle", "two blue squares", "a green star"]
    for method in ("yes", "caption"):
        before = Harmon(init, tok).score(images, texts, method=method)
        assert torch.equal(Harmon(trained.eval(), tok).score(images, texts, method=method), before)


def test_fast_generation_equals_reference_with_a_grown_decoder():
    pipe = Harmon(random_model(preset("tiny"), seed=5), Harmon.from_pretrained("tiny").tokenizer)
    pipe.model.mar.add_decoder_blocks(1)
    with torch.no_grad():
        for p in pipe.model.mar.decoder_blocks[-1].parameters():
            p.add_(0.05)
    kw = dict(steps=5, seed=2, cfg=3.0, output="uint8", size=64)
    ref = pipe.generate(["a red circle", "a blue star"], mode="reference", **kw)
    fast = pipe.generate(["a red circle", "a blue star"], mode="fast", **kw)
    assert (ref.int() - fast.int()).abs().max() <= 1
