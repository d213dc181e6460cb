"""Weight formats: ours (round trip), native .pth + kl16.ckpt, Hugging Face sharded; bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from harmon import Harmon
from harmon.checkpoints import (CheckpointError, empty_model, expected_shapes, infer_config,
                                load_harmon, read_state_dict)
from harmon.configs import harmon_0_5b, tiny


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _native_files(model, tmp_path, drop_lm_head=False):
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("vae.")}
    if drop_lm_head:
        sd.pop("llm.lm_head.weight")
    torch.save(sd, tmp_path / "harmon_tiny.pth")
    torch.save({"model": {k[4:]: v.clone() for k, v in model.state_dict().items()
                          if k.startswith("vae.")}}, tmp_path / "kl16.ckpt")
    return tmp_path / "harmon_tiny.pth"


def test_save_and_load_round_trip(tiny_harmon, tmp_path):
    tiny_harmon.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors",
                                                            "tokenizer.json"}
    loaded = Harmon.from_pretrained(tmp_path / "m")
    assert _same_weights(loaded.model, tiny_harmon.model)
    assert loaded.model.llm.lm_head.weight is loaded.model.llm.model.embed_tokens.weight
    a = tiny_harmon.generate("a", steps=3, seed=0, output="uint8")
    assert torch.equal(a, loaded.generate("a", steps=3, seed=0, output="uint8"))
    # the weights get the permissions of any other new file (safetensors alone writes 0600)
    mode = lambda name: (tmp_path / "m" / name).stat().st_mode & 0o777
    assert mode("model.safetensors") == mode("config.json")


def test_written_safetensors_follow_the_umask(tmp_path):
    import os

    from harmon.checkpoints import write_safetensors

    old = os.umask(0o022)
    try:
        write_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("drop_lm_head", [False, True])
def test_native_pth_and_kl16(tiny_harmon, tmp_path, drop_lm_head):
    pth = _native_files(tiny_harmon.model, tmp_path, drop_lm_head)
    model = load_harmon(pth)  # config inferred from shapes, VAE found beside the .pth
    assert model.cfg.name == "tiny" and _same_weights(model, tiny_harmon.model)
    assert not any(p.is_meta for p in model.parameters())


def test_hf_sharded_directory(tiny_harmon, tmp_path):
    sd = {k: v.clone().contiguous() for k, v in tiny_harmon.model.state_dict().items()
          if k != "llm.lm_head.weight"}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    cfg = tiny()
    llm = {**cfg.to_dict()["llm"], "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
           "torch_dtype": "bfloat16", "bos_token_id": 151643, "sliding_window": 32768}
    mar = {k: v for k, v in cfg.to_dict()["mar"].items()}
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "harmon", "llm": llm, "mar": mar, "vae": cfg.to_dict()["vae"],
         "image_size": 64}))
    tiny_harmon.tokenizer.save(tmp_path)
    loaded = Harmon.from_pretrained(tmp_path)
    assert _same_weights(loaded.model, tiny_harmon.model)


def test_hf_mar_type_section():
    from harmon.configs import MARConfig

    m = MARConfig.from_dict({"type": "mar_huge", "diffloss_d": 12, "diffloss_w": 1536})
    assert (m.encoder_embed_dim, m.encoder_depth, m.decoder_num_heads) == (1280, 20, 16)
    with pytest.raises(ValueError, match="unknown MAR type"):
        MARConfig.from_dict({"type": "mar_giant"})


def test_wrong_preset_is_named(tiny_harmon, tmp_path):
    pth = _native_files(tiny_harmon.model, tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the harmon-0.5b model"):
        load_harmon(pth, config=harmon_0_5b())


def test_checkpoint_of_another_model(tmp_path):
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, tmp_path / "qwen.pth")
    with pytest.raises(CheckpointError, match="not a Harmon checkpoint.*bare Qwen2"):
        load_harmon(tmp_path / "qwen.pth", config=tiny())
    torch.save({"mar.z_proj.weight": torch.zeros(5, 16)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="matches no preset"):
        load_harmon(tmp_path / "other.pth")


def test_missing_files(tiny_harmon, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        Harmon.from_pretrained(tmp_path / "nowhere")
    pth = _native_files(tiny_harmon.model, tmp_path)
    (tmp_path / "kl16.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="kl16.ckpt"):
        load_harmon(pth)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_harmon(tmp_path / "empty")


def test_corrupt_and_unexpected(tiny_harmon, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch or safetensors checkpoint"):
        read_state_dict(bad)
    pth = _native_files(tiny_harmon.model, tmp_path)
    sd = torch.load(pth, weights_only=True)
    sd["mar.extra_thing"] = torch.zeros(2)
    torch.save(sd, pth)
    with pytest.raises(CheckpointError, match="does not know"):
        load_harmon(pth, config=tiny())
    with pytest.warns(UserWarning, match="ignored"):
        load_harmon(pth, config=tiny(), strict=False)
    del sd["mar.extra_thing"], sd["mar.z_proj.weight"]
    torch.save(sd, pth)
    with pytest.raises(CheckpointError, match="lacks 1 weight"):
        load_harmon(pth, config=tiny())


def test_unknown_preset_and_device():
    with pytest.raises(FileNotFoundError, match="preset name"):
        Harmon.from_pretrained("harmon-7b")
    with pytest.raises(ValueError, match="device"):
        Harmon.from_pretrained("tiny", device="tpu")


def test_official_shapes_of_05b():
    shapes = expected_shapes(harmon_0_5b())
    assert shapes["mar.encoder_pos_embed_learned"] == (1, 320, 768)
    assert shapes["mar.diffusion_pos_embed_learned"] == (1, 256, 768)
    assert shapes["llm.model.layers.0.self_attn.k_proj.weight"] == (128, 896)
    assert shapes["mar.diffloss.net.final_layer.linear.weight"] == (32, 1024)
    assert shapes["proj_in.0.weight"] == (896, 768) and shapes["proj_out.2.weight"] == (768, 896)
    assert shapes["vae.encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["vae.decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)


def test_infer_config_from_shapes():
    sd = {k: torch.empty(s, device="meta") for k, s in expected_shapes(harmon_0_5b()).items()
          if not k.startswith("vae.")}
    assert infer_config(sd).name == "harmon-0.5b"


def test_preset_parameter_counts():
    """The inferred counts of harmon.md §2 (MAR-B: enc 85.1M, dec 85.1M, head 35.7M)."""
    m = empty_model(harmon_0_5b())
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    head = count(m.mar.diffloss)
    assert abs(head / 1e6 - 35.7) < 0.1
    assert abs((count(m.mar) - head) / 1e6 - 2 * 85.1 - 0.8) < 1.5  # + class table, dec embed
    assert abs(count(m.proj_in) + count(m.proj_out) - 3.0e6) < 0.1e6


def test_provenance_is_kept_through_save_load_and_ship(tmp_path, tiny_harmon):
    from harmon.train.ship import ship

    src = Harmon(tiny_harmon.model, tiny_harmon.tokenizer, name="t",
                 provenance="harmon train (x, step 3)",
                 answer_instruction="Answer briefly.").save_pretrained(tmp_path / "a")
    loaded = Harmon.from_pretrained(src, device="cpu")
    assert loaded.provenance == "harmon train (x, step 3)" == loaded.info()["provenance"]
    shipped = Harmon.from_pretrained(ship(src, tmp_path / "b"), device="cpu")
    assert shipped.provenance == "harmon train (x, step 3); shipped in float16 by harmon.train.ship"
    assert loaded.answer_instruction == "Answer briefly." == shipped.answer_instruction
    small = Harmon.from_pretrained(ship(src, tmp_path / "c", int8=True), device="cpu")
    assert small.provenance.endswith("shipped in float16 (weight matrices int8) by harmon.train.ship")
    assert Harmon.from_pretrained("tiny").provenance == ""
    assert Harmon.from_pretrained("tiny").answer_instruction == ""


def test_sampling_defaults_are_kept_used_and_checked(tmp_path, tiny_harmon):
    """A model's own cfg / temperature / candidates (config.json "sampling") survive save, load
    and ship, are what generate uses when the call names none, and bad ones are refused by
    name."""
    import json

    from harmon.train.ship import ship

    paper = {"cfg": 3.0, "temperature": 1.0, "candidates": 1, "rerank": "yes", "name_colors": False}
    assert tiny_harmon.sampling == paper
    plain = tiny_harmon.save_pretrained(tmp_path / "plain")
    assert "sampling" not in json.loads((plain / "config.json").read_text())
    src = ship(plain, tmp_path / "own", sampling={"temperature": 0.8})
    model = Harmon.from_pretrained(src, device="cpu")
    assert model.sampling == {**paper, "temperature": 0.8} == model.info()["sampling"]
    assert json.loads((src / "config.json").read_text())["sampling"] == {"temperature": 0.8}
    again = Harmon.from_pretrained(ship(src, tmp_path / "again", sampling={"cfg": 2.0}))
    assert again.sampling == {**paper, "cfg": 2.0, "temperature": 0.8}
    best = Harmon.from_pretrained(ship(src, tmp_path / "best", sampling={"candidates": 2}))
    assert best.sampling == {**paper, "temperature": 0.8, "candidates": 2}
    assert json.loads((tmp_path / "best" / "config.json").read_text())["sampling"] == {
        "temperature": 0.8, "candidates": 2}
    asks = Harmon.from_pretrained(ship(src, tmp_path / "asks", sampling={"candidates": 2,
                                                                         "rerank": "questions"}))
    assert asks.sampling == {**paper, "temperature": 0.8, "candidates": 2, "rerank": "questions"}
    names = Harmon.from_pretrained(ship(src, tmp_path / "names", sampling={"name_colors": True}))
    assert names.sampling == {**paper, "temperature": 0.8, "name_colors": True}
    kw = dict(steps=4, seed=0, output="uint8")
    own = model.generate("a red circle", **kw)
    assert torch.equal(own, model.generate("a red circle", temperature=0.8, cfg=3.0, **kw))
    assert not torch.equal(own, model.generate("a red circle", temperature=1.0, **kw))
    # best of 2 by default: the pick of the same two draws as an explicit candidates=2 ...
    picked = best.generate("a red circle", **kw)
    assert torch.equal(picked, model.generate("a red circle", candidates=2, **kw))
    # ... which are the two images of one call with a single draw each
    pair = best.generate("a red circle", candidates=1, num_images_per_prompt=2, **kw)
    assert any(torch.equal(picked[0], im) for im in pair)
    assert torch.equal(own, best.generate("a red circle", candidates=1, **kw))
    assert torch.equal(asks.generate("a red circle", **kw),
                       model.generate("a red circle", candidates=2, rerank="questions", **kw))
    assert torch.equal(names.generate("a circle", **kw),
                       model.generate("a circle", name_colors=True, **kw))
    assert not torch.equal(names.generate("a circle", **kw), model.generate("a circle", **kw))
    for bad, match in (({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
                       ({"cfg": 0.5}, "cfg must be a finite number >= 1, got 0.5"),
                       ({"top_k": 5}, r"unknown keys \['top_k'\]"),
                       ({"candidates": 0}, "candidates must be an integer >= 1, got 0"),
                       ({"candidates": 1.5}, "candidates must be an integer >= 1, got 1.5"),
                       ({"candidates": True}, "candidates must be an integer >= 1, got True"),
                       ({"rerank": "clip"}, r"rerank must be one of \['yes', 'caption', "),
                       ({"name_colors": "yes"}, "name_colors must be true or false, got 'yes'"),
                       (0.8, "must be a mapping")):
        cfg = json.loads((src / "config.json").read_text())
        cfg["sampling"] = bad
        (src / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match) as e:
            Harmon.from_pretrained(src, device="cpu")
        assert "config.json" in str(e.value)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ship(plain, tmp_path / "x", sampling={"temperature": -1.0})


def test_ship_takes_a_fine_tuned_decoder_and_refuses_another_encoder(tmp_path, tiny_harmon):
    from harmon.train.ship import ship
    from harmon.train.vae import VAETrainConfig, load_vae, train_vae

    src = tiny_harmon.save_pretrained(tmp_path / "a")
    common = dict(vae=tiny_harmon.model.cfg.vae, size=64, steps=1, batch_size=1, crop=0,
                  warmup=1, lr=1e-2, init=str(src))
    train_vae(VAETrainConfig(out_dir=str(tmp_path / "dec"), decoder_only=True, latent_noise=1.0,
                             **common), log=lambda _: None)
    shipped = Harmon.from_pretrained(ship(src, tmp_path / "b", decoder=tmp_path / "dec"))
    assert "VAE decoder from dec" in shipped.provenance
    tuned = load_vae(tmp_path / "dec")[0].state_dict()
    old = tiny_harmon.model.vae.state_dict()
    for k, v in shipped.model.vae.state_dict().items():
        want = old[k] if k.startswith(("encoder.", "quant_conv.")) else tuned[k]
        assert torch.equal(v, want.half().float()), k
    assert not torch.equal(tuned["post_quant_conv.weight"], old["post_quant_conv.weight"])
    # a VAE whose encoder trained too reads other latents: the generator would not fit it
    train_vae(VAETrainConfig(out_dir=str(tmp_path / "full"), **common), log=lambda _: None)
    with pytest.raises(CheckpointError, match="does not share this model's encoder"):
        ship(src, tmp_path / "c", decoder=tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="not a harmon train-vae output"):
        ship(src, tmp_path / "c", decoder=tmp_path / "nothing")
    assert not (tmp_path / "c").exists()


def test_x0_clip_is_part_of_the_saved_config(tmp_path):
    from harmon.configs import HarmonConfig, MARConfig

    cfg = tiny()
    cfg.mar.x0_clip = 10.0
    assert HarmonConfig.from_dict(cfg.to_dict()).mar.x0_clip == 10.0
    assert HarmonConfig.from_dict(tiny().to_dict()).mar.x0_clip is None  # the reference: none
    with pytest.raises(ValueError, match="x0_clip"):
        MARConfig(x0_clip=0.0)


def test_a_checkpoint_with_extra_and_missing_keys_is_recognised_and_both_are_named(tiny_harmon,
                                                                                  tmp_path):
    sd = {k: v.clone() for k, v in tiny_harmon.model.state_dict().items() if not k.startswith("vae.")}
    sd["mar.extra_table"] = torch.zeros(3)
    torch.save(sd, tmp_path / "harmon_tiny.pth")
    torch.save({"model": {k[4:]: v.clone() for k, v in tiny_harmon.model.state_dict().items()
                          if k.startswith("vae.")}}, tmp_path / "kl16.ckpt")
    assert infer_config(sd).name == "tiny"  # one unknown key does not hide the preset
    with pytest.raises(CheckpointError, match=r"does not know.*mar\.extra_table.*strict=False"):
        load_harmon(tmp_path / "harmon_tiny.pth")
    with pytest.warns(UserWarning, match="ignored"):
        assert _same_weights(load_harmon(tmp_path / "harmon_tiny.pth", strict=False),
                             tiny_harmon.model)
    del sd["mar.mask_token"]
    torch.save(sd, tmp_path / "harmon_tiny.pth")
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*mar\.mask_token.*also has 1"):
        load_harmon(tmp_path / "harmon_tiny.pth")


def test_an_llm_section_written_by_transformers_is_accepted():
    from harmon.configs import LLMConfig

    qwen = tiny().llm.to_qwen2().to_dict()  # with return_dict, id2label, ... as transformers writes
    assert "id2label" in qwen or "return_dict" in qwen
    assert LLMConfig.from_dict(qwen) == tiny().llm


def test_unreadable_and_pickled_object_files_are_explained(tmp_path):
    import argparse

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth is not a readable PyTorch") as e:
        read_state_dict(junk)
    assert "mmap" not in str(e.value)
    pickled = tmp_path / "kl16.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, pickled)
    with pytest.raises(CheckpointError, match="Python objects besides tensors.*re-save"):
        read_state_dict(pickled)


def test_dtype_names_and_moving_a_loaded_model():
    from harmon.pipeline import resolve_dtype

    cpu = torch.device("cpu")
    for name, dt in [("half", torch.float16), ("torch.bfloat16", torch.bfloat16),
                     ("FP32", torch.float32), (None, torch.float32)]:
        assert resolve_dtype(name, cpu) == dt
    with pytest.raises(ValueError, match="unknown dtype 'float8'; expected one of"):
        resolve_dtype("float8", cpu)
    model = Harmon.from_pretrained("tiny", device="cpu")
    assert model.dtype == torch.float32
    assert model.to(dtype="bf16").dtype == torch.bfloat16 == next(model.model.parameters()).dtype
    assert model.to("cpu").dtype == torch.bfloat16  # a device alone keeps the dtype


def test_int8_weights_round_trip_within_half_a_step(tiny_harmon, tmp_path):
    """save_pretrained(int8=True): weight matrices stored as int8 with one scale per row (about
    half the bytes of float16), every other tensor as it was; loading gives each weight back
    within half its row's step, and the images within a few levels."""
    from safetensors import safe_open

    from harmon.checkpoints import INT8_SCALE

    path = tiny_harmon.save_pretrained(tmp_path / "q", int8=True)
    full = tiny_harmon.save_pretrained(tmp_path / "f")
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert stored["mar.z_proj.weight"].dtype == torch.int8
    assert stored["mar.z_proj.bias"].dtype == torch.float32  # biases stay as they were
    assert stored["mar.encoder_pos_embed_learned"].dtype == torch.float32
    loaded = Harmon.from_pretrained(path)
    sd, ref = loaded.model.state_dict(), tiny_harmon.model.state_dict()
    assert sd.keys() == ref.keys()
    for k, w in ref.items():
        key = "llm.model.embed_tokens.weight" if k == "llm.lm_head.weight" else k  # tied, once
        if INT8_SCALE + key in stored:
            half_step = stored[INT8_SCALE + key].float().view(-1, *[1] * (w.ndim - 1)) / 2
            assert ((sd[k] - w).abs() <= half_step * 1.01 + 1e-6).all(), k
        else:
            assert torch.equal(sd[k], w), k
    size = lambda d: (d / "model.safetensors").stat().st_size
    assert size(path) < 0.3 * size(full)  # int8 against float32 here
    a = tiny_harmon.generate("a red circle", steps=4, seed=0, output="uint8")
    b = loaded.generate("a red circle", steps=4, seed=0, output="uint8")
    assert (a.int() - b.int()).abs().float().mean() < 8


def test_int8_scales_that_match_no_weight_are_refused(tmp_path):
    from harmon.checkpoints import dequantize_int8, quantize_int8

    w = torch.randn(4, 3)
    w[1] = 0.0  # a zero-initialised row, and a tiny one, come back as they were
    w[2] = torch.tensor([1e-9, -2e-9, 0.0])
    sd = quantize_int8({"a.weight": w, "a.bias": torch.randn(4)})
    assert sd["a.weight"].dtype == torch.int8 and sd["a.bias"].dtype == torch.float32
    back = dequantize_int8(sd)["a.weight"]
    assert torch.equal(back[1], w[1]) and torch.allclose(back[2], w[2], rtol=1e-2, atol=0)
    with pytest.raises(CheckpointError, match="scales no int8 weight"):
        dequantize_int8({**sd, "a.weight": torch.randn(4, 3)})
    with pytest.raises(CheckpointError, match="scales no int8 weight"):
        dequantize_int8({"int8_scale.b.weight": torch.ones(2, dtype=torch.float16)})
