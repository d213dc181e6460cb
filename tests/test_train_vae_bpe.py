"""The small-VAE trainer, the BPE trainer, shipping, and the model evaluation runner."""

import json

import pytest
import torch

from harmon.configs import VAEConfig
from harmon.tokenizer import IMAGE, IM_END, IM_START, chat
from harmon.train.bpe import shapeworld_texts, train_bpe
from harmon.train.vae import VAETrainConfig, load_vae, noisy_latents, random_crops, train_vae

SMALL_VAE = VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_resolutions=(),
                      resolution=64, groupnorm_groups=8)


def test_vae_training_runs_resumes_and_writes(tmp_path):
    cfg = VAETrainConfig(out_dir=str(tmp_path), size=64, vae=SMALL_VAE, steps=4, batch_size=2,
                         crop=32, log_every=2, save_every=2, stop_at=2, lr=1e-3, warmup=1)
    logs = []
    train_vae(cfg, log=logs.append)
    assert "step 2/2" in logs[0]
    cfg.stop_at = 0
    train_vae(cfg, resume=True, log=logs.append)
    assert any("resumed at step 2" in line for line in logs)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == [2, 4]
    model, vcfg, scale = load_vae(tmp_path)
    assert vcfg == SMALL_VAE and scale > 0
    assert model.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 32, 32)


def test_decoder_only_fine_tune_keeps_the_encoder_and_the_latent_scale(tmp_path):
    base = VAETrainConfig(out_dir=str(tmp_path / "base"), vae=SMALL_VAE, steps=2, batch_size=2,
                          crop=32, log_every=2, lr=1e-3, warmup=1)
    train_vae(base, log=lambda _: None)
    before, _, scale = load_vae(tmp_path / "base")
    ft = VAETrainConfig(out_dir=str(tmp_path / "dec"), vae=SMALL_VAE, steps=2, batch_size=2,
                        crop=0, log_every=2, lr=1e-2, warmup=1, init=str(tmp_path / "base"),
                        decoder_only=True, latent_noise=1.0)
    train_vae(ft, log=lambda _: None)
    after, _, scale_after = load_vae(tmp_path / "dec")
    assert scale_after == scale  # the latent space the generator knows is untouched
    old, new = before.state_dict(), after.state_dict()
    for k in old:
        same = torch.equal(old[k], new[k])
        assert same == k.startswith(("encoder.", "quant_conv.")), k
    with pytest.raises(ValueError, match="decoder_only needs init"):
        VAETrainConfig(decoder_only=True)
    with pytest.raises(ValueError, match="latent_noise needs init"):
        VAETrainConfig(latent_noise=0.5)
    with pytest.raises(ValueError, match="latent_noise must be"):
        VAETrainConfig(init="x", latent_noise=-1.0)
    with pytest.raises(ValueError, match="not the architecture"):
        train_vae(VAETrainConfig(out_dir=str(tmp_path / "x"), init=str(tmp_path / "base"),
                                 steps=1), log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="neither a harmon train-vae output"):
        train_vae(VAETrainConfig(out_dir=str(tmp_path / "y"), vae=SMALL_VAE, steps=1,
                                 init=str(tmp_path / "nothing")), log=lambda _: None)


def test_noisy_latents_draw_a_level_per_token_in_scaled_units():
    z = torch.zeros(16, 1024, 4, 4)  # many channels: each token's std is measured closely
    gen = torch.Generator().manual_seed(0)
    assert noisy_latents(z, 2.0, 0.0, gen) is z
    noise = noisy_latents(z, 2.0, 1.0, gen) * 2.0  # back in units of the scaled latents
    level = noise.std(dim=1)  # (16, 4, 4): each token its own level, uniform on [0, 1]
    assert level.max() < 1.1 and level.min() < 0.1
    assert abs(float(level.mean()) - 0.5) < 0.1 and float(level.std()) > 0.2


def test_random_crops_are_aligned():
    x = torch.arange(2 * 64 * 64, dtype=torch.float32).reshape(2, 1, 64, 64).expand(2, 3, 64, 64)
    c = random_crops(x, 24, 8, torch.Generator().manual_seed(0))
    assert c.shape == (2, 3, 24, 24)
    for b in range(2):
        y0, x0 = divmod(int(c[b, 0, 0, 0] - x[b, 0, 0, 0]), 64)
        assert y0 % 8 == 0 and x0 % 8 == 0
    assert random_crops(x, 0, 8, torch.Generator()) is x


def test_bpe_tokenizer_has_the_chat_tokens_and_round_trips(tmp_path):
    tok = train_bpe(shapeworld_texts(40), vocab_size=300)
    assert tok.vocab_size == 300
    assert (tok.im_start_id, tok.im_end_id, tok.image_id) == (1, 2, 3)
    text = chat("Generate an image: a red circle to the left of a blue square")
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id and tok.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text) // 2  # merges learnt from the captions
    assert tok.decode(tok.encode("naïve 東京")) == "naïve 東京"  # byte fallback
    tok.save(tmp_path)
    from harmon.tokenizer import HarmonTokenizer
    assert HarmonTokenizer.from_dir(tmp_path).encode(text) == ids
    assert IMAGE in tok.decode([tok.image_id], skip_special_tokens=False)
    assert IM_START in text and IM_END in text
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe(["a"], vocab_size=100)


def test_evaluation_runner_on_a_tiny_model(tiny_harmon, tmp_path):
    from harmon.eval.model_eval import (evaluate_generation, evaluate_reconstruction,
                                        evaluate_understanding)

    gen = evaluate_generation(tiny_harmon, samples=1, limit=3, out_dir=tmp_path, progress=False,
                              steps=4)
    assert 0.0 <= gen["overall"] <= 1.0
    assert len(list(tmp_path.glob("*/samples/*.png"))) == 3
    cats = gen["categories"]
    assert sum(c["prompts"] for c in cats.values()) == 3 == sum(c["images"] for c in cats.values())
    ceiling = evaluate_reconstruction(tiny_harmon, samples=2, limit=3)
    assert ceiling["images"] == 6 and 0.0 <= ceiling["overall"] <= 1.0
    vqa = evaluate_understanding(tiny_harmon, n_images=2, progress=False)
    assert set(vqa["per_type"]) >= {"pope", "count"} and 0.0 <= vqa["overall"] <= 1.0
