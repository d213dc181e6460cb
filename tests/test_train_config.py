"""harmon.train: configs (files, overrides, errors), stage settings of Table 1, optimiser groups."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from harmon.configs import tiny
from harmon.models.harmon import HarmonModel
from harmon.train.config import OptimConfig, dump_toml, load_config
from harmon.train.optim import GROUPS, group_of, lr_factor, param_groups, set_trainable

CONFIGS = Path(__file__).parent.parent / "configs"
STAGES = {  # Table 1 (training.md §3): frozen groups, LR decoder / encoder / LLM, size, steps
    1: ({"llm"}, 1e-4, 1e-5, None, 256, 4096, (0, 1, 2)),
    2: (set(), 1e-4, 1e-5, 1e-5, 256, 4096, (1, 3, 8)),
    3: (set(), 2e-5, 2e-6, 2e-6, 512, 1024, (1, 3, 16)),
}


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_configs_follow_table_1(stage, size):
    cfg = load_config(CONFIGS / f"stage{stage}_{size}.toml")
    frozen, lr_dec, lr_enc, lr_llm, px, batch, ratio = STAGES[stage]
    assert cfg.stage == stage
    assert set(cfg.optim.frozen) == frozen
    assert cfg.optim.lr_of("mar_decoder") == lr_dec and cfg.optim.lr_of("head") == lr_dec
    assert cfg.optim.lr_of("connectors") == lr_dec
    assert cfg.optim.lr_of("mar_encoder") == lr_enc
    if lr_llm is not None:
        assert cfg.optim.lr_of("llm") == lr_llm
    assert cfg.data.image_size == px
    assert cfg.run.steps == 50_000 and cfg.optim.warmup_steps == 500
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.02
    assert cfg.optim.clip_grad_norm == 1.0 and cfg.optim.schedule == "cosine"
    assert cfg.run.grad_checkpointing and cfg.run.precision == "auto"
    # the global batch on the paper's 32 GPUs, and the sample ratio text : i2t : t2i
    per_task = [r * n for r, n in zip(cfg.data.ratio, (cfg.data.micro_batch.text,
                                                         cfg.data.micro_batch.i2t,
                                                         cfg.data.micro_batch.t2i))]
    cycles = cfg.grad_accum // sum(cfg.data.ratio)
    assert 32 * cycles * sum(per_task) == batch
    target = [r / sum(ratio) for r in ratio]
    got = [n / sum(per_task) for n in per_task]
    assert max(abs(a - b) for a, b in zip(got, target)) < 0.05
    assert cfg.data.max_length > (px // 16) ** 2 + 64 + 512
    if stage == 1:
        assert cfg.model.llm_init and cfg.model.mar_init and cfg.model.vae
        assert f"harmon-{size}" == cfg.model.preset
    else:
        assert cfg.model.init.endswith(f"stage{stage - 1}_{size}/final")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_config_round_trips_through_toml(path):
    cfg = load_config(path)
    again = load_config(None, base=tomllib.loads(dump_toml(cfg)))
    assert again == cfg


def test_shapeworld_configs_mirror_the_stages():
    cfgs = [load_config(CONFIGS / f"shapeworld_stage{s}.toml") for s in (1, 2, 3)]
    assert [c.stage for c in cfgs] == [1, 2, 3]
    assert cfgs[0].optim.frozen == ["llm"] and cfgs[1].optim.frozen == [] == cfgs[2].optim.frozen
    assert [c.data.image_size for c in cfgs] == [64, 64, 128]
    assert cfgs[1].model.init == cfgs[0].run.out_dir + "/final"
    assert cfgs[2].model.init == cfgs[1].run.out_dir + "/final"
    for c, ratio in zip(cfgs, [(0, 1, 2), (1, 3, 8), (1, 3, 16)]):
        mb = c.data.micro_batch
        samples = [r * n for r, n in zip(c.data.ratio, (mb.text, mb.i2t, mb.t2i))]
        assert [s / samples[2] for s in samples] == [r / ratio[2] for r in ratio]
        assert all(s.kind == "shapeworld" for s in c.data.sources)


def test_overrides_are_typed_and_reach_nested_keys(tmp_path):
    cfg = load_config(CONFIGS / "shapeworld_stage2.toml",
                      ["run.steps=7", "optim.lr_llm=2e-6", "optim.betas=[0.9, 0.99]",
                       "data.sources.1.turns=3", "model.preset=harmon-0.5b", "optim.lr_head=5e-5",
                       "run.grad_checkpointing=true", "data.micro_batch.t2i=3"])
    assert cfg.run.steps == 7 and cfg.optim.lr_llm == 2e-6 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.data.sources[1].turns == 3 and cfg.model.preset == "harmon-0.5b"
    assert cfg.optim.lr_of("head") == 5e-5 and cfg.optim.lr_of("connectors") == 1e-3
    assert cfg.run.grad_checkpointing is True and cfg.data.micro_batch.t2i == 3


@pytest.mark.parametrize("override, words", [
    ("run.stepz=3", ["'run.stepz'", "steps"]),
    ("optimizer.lr=1", ["'optimizer'", "optim"]),
    ("data.sources.9.path=x", ["data.sources.9", "list"]),
    ("run.steps=abc", ["run.steps", "integer"]),
    ("run.grad_checkpointing=1", ["run.grad_checkpointing", "true or false"]),
    ("optim.frozen=[\"vae\"]", ["vae", "groups"]),
    ("data.ratio=[0, 0, 0]", ["data.ratio"]),
    ("data.image_size=100", ["multiple of 16"]),
    ("run.strategy=zero3", ["run.strategy", "fsdp"]),
    ("steps", ["key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ValueError) as e:
        load_config(CONFIGS / "shapeworld_stage1.toml", [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_key_in_a_file_is_an_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text((CONFIGS / "shapeworld_stage1.toml").read_text() + "\n[extra]\nx = 1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'extra'.*valid keys"):
        load_config(f)
    f.write_text("[run]\nsteps = 3\nlog_every = 2\n")
    with pytest.raises(ValueError, match="'run.log_every'"):
        load_config(f)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    f.write_text("[run\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(f)


def test_ratio_without_a_source_is_an_error():
    with pytest.raises(ValueError, match="no data source has task = 'text'"):
        load_config(CONFIGS / "shapeworld_stage1.toml", ["data.ratio=[1, 1, 1]",
                                                          "data.micro_batch.text=2"])


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = OptimConfig()
    total = 1000
    assert lr_factor(0, total, cfg) == pytest.approx(1e-5)  # warm-up from 1e-5 x LR, 1% of steps
    assert lr_factor(5, total, cfg) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert lr_factor(10, total, cfg) == pytest.approx(1.0)
    mid = 10 + (total - 10) // 2
    assert lr_factor(mid, total, cfg) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(total, total, cfg) == pytest.approx(0.0, abs=1e-9)
    values = [lr_factor(s, total, cfg) for s in range(10, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_param_groups_decay_rule_and_module_groups():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = HarmonModel(tiny())
    names = dict(model.named_parameters())
    assert {group_of(n) for n in names} == {*GROUPS, None}
    assert group_of("vae.encoder.conv_in.weight") is None and group_of("mar.class_emb.weight") is None
    assert group_of("mar.diffloss.net.input_proj.weight") == "head"
    assert group_of("mar.mask_token") == "mar_decoder" and group_of("mar.fake_latent") == "mar_encoder"
    cfg = OptimConfig()
    counts = set_trainable(model, ["llm"])
    assert counts["llm"] == 0 and counts["head"] > 0
    assert not any(p.requires_grad for n, p in names.items() if n.startswith(("vae.", "llm.")))
    groups = param_groups(model, cfg)
    by_name = {g["name"]: g for g in groups}
    assert not any(n.startswith("llm") for n in by_name)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and "head" not in by_name
    assert by_name["mar_decoder"]["lr"] == 1e-4 and by_name["mar_encoder"]["lr"] == 1e-5
    assert by_name["connectors"]["lr"] == 1e-4
    ids = {id(p): n for n, p in names.items()}
    for g in groups:
        for p in g["params"]:
            n = ids[id(p)]
            decays = g["weight_decay"] > 0
            assert decays == (p.ndim >= 2 and not n.endswith(".bias") and "diffloss" not in n), n
    # position tables and mask_token decay (training.md §4 note)
    decayed = {ids[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "mar.encoder_pos_embed_learned" in decayed and "mar.mask_token" in decayed
    set_trainable(model, list(GROUPS))
    with pytest.raises(ValueError, match="nothing to train"):
        param_groups(model, cfg)


def test_sincos_positions_are_added_to_the_image_rows_only(tmp_path):
    """model.sincos_* add a 2-D sin-cos table of the asked row norm to the MAR position tables
    (buffer rows untouched); the table tells rows and columns apart and is 0 when not asked."""
    import torch

    from harmon.models.mar import sincos_2d
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    table = sincos_2d(4, 4, 8)
    assert table.shape == (16, 8)
    assert torch.allclose(table.norm(dim=1), torch.full((16,), 2.0))  # sqrt(8 / 2)
    assert torch.cdist(table, table).fill_diagonal_(1.0).min() > 0.1  # every position distinct
    plain, _, _ = build_model(tiny_config(tmp_path).model)
    cfg = tiny_config(tmp_path, overrides=["model.sincos_encoder=3.0", "model.sincos_decoder=8"])
    model, _, source = build_model(cfg.model)
    assert "sin-cos" in source
    nb, n = model.cfg.mar.buffer_size, model.cfg.mar.seq_h
    for name, norm in (("encoder_pos_embed_learned", 3.0), ("decoder_pos_embed_learned", 8.0)):
        delta = (getattr(model.mar, name) - getattr(plain.mar, name))[0]
        assert torch.equal(delta[:nb], torch.zeros_like(delta[:nb]))
        assert torch.allclose(delta[nb:].norm(dim=1), torch.full((n * n,), norm), atol=1e-4)
        assert torch.allclose(delta[nb:], sincos_2d(n, n, delta.shape[1]) * norm
                              / delta.shape[1] ** 0.5 * 2 ** 0.5, atol=1e-5)
    assert torch.equal(model.mar.diffusion_pos_embed_learned, plain.mar.diffusion_pos_embed_learned)
    with pytest.raises(ValueError, match="row norm must be >= 0"):
        build_model(tiny_config(tmp_path, overrides=["model.sincos_decoder=-1"]).model)


def test_mask_ratio_min_override_reaches_the_model(tmp_path):
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=["model.mask_ratio_min=0.3"]).model)
    assert model.cfg.mar.mask_ratio_min == 0.3 and "mask ratio from 0.3" in source
    default, _, _ = build_model(tiny_config(tmp_path).model)
    assert default.cfg.mar.mask_ratio_min == 0.7
    with pytest.raises(ValueError, match=r"mask_ratio_min must lie in \[0, 1\]"):
        tiny_config(tmp_path, overrides=["model.mask_ratio_min=1.5"])


def test_grad_scale_override_reaches_the_understanding_gradient(tmp_path):
    from harmon.models.harmon import scale_grad
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=["model.grad_scale=1.0"]).model)
    assert model.cfg.grad_scale == 1.0 and "understanding gradient x1" in source
    default, _, _ = build_model(tiny_config(tmp_path).model)
    assert default.cfg.grad_scale == 0.1  # Harmon's value, kept unless the run says otherwise
    x = torch.ones(3, requires_grad=True)
    scale_grad(x, model.cfg.grad_scale).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    with pytest.raises(ValueError, match=r"grad_scale must lie in \[0, 10\]"):
        tiny_config(tmp_path, overrides=["model.grad_scale=-1"])


def test_qtype_weights_shape_the_shapeworld_question_stream(tmp_path):
    from harmon.train.data import build_source

    f = tmp_path / "c.toml"
    f.write_text((CONFIGS / "shapeworld_stage2.toml").read_text().replace(
        'task = "i2t"', 'task = "i2t"\nqtype_weights = { pope = 3, count = 1 }', 1))
    cfg = load_config(f)
    sc = next(s for s in cfg.data.sources if s.task == "i2t")
    assert sc.qtype_weights == {"pope": 3.0, "count": 1.0}
    assert load_config(None, base=tomllib.loads(dump_toml(cfg))) == cfg  # inline table round trip
    src = build_source(sc, 64, 0)
    firsts = [src.item(i)["conversations"][0]["value"] for i in range(60)]
    pope = sum(q.startswith("<image>\nIs there") or q.startswith("Is there") for q in firsts)
    count = sum("How many" in q for q in firsts)
    assert pope + count == 60 and pope > 2 * count  # 3 : 1, and no other type
    with pytest.raises(ValueError, match=r"unknown question types in qtype_weights \['colour'\]"):
        load_config(f, ["data.sources.1.qtype_weights={colour = 1}"])
    with pytest.raises(ValueError, match="shapeworld i2t sources only"):
        load_config(f, ["data.sources.0.qtype_weights={pope = 1}"])
    with pytest.raises(ValueError, match="expected a table"):
        load_config(f, ["data.sources.1.qtype_weights=3"])


def test_kind_and_style_weights_shape_the_shapeworld_caption_stream(tmp_path):
    """A t2i source's scene kinds and caption styles follow kind_weights / style_weights; unset,
    the stream is the default one, item for item."""
    from harmon.train.data import build_source

    f = tmp_path / "c.toml"
    base = (CONFIGS / "shapeworld_stage2.toml").read_text()
    f.write_text(base.replace('task = "t2i"', 'task = "t2i"\nkind_weights = { pair = 1 }\n'
                              'style_weights = { position_plain = 1 }', 1))
    cfg = load_config(f)
    sc = next(s for s in cfg.data.sources if s.task == "t2i")
    assert sc.kind_weights == {"pair": 1.0} and sc.style_weights == {"position_plain": 1.0}
    assert load_config(None, base=tomllib.loads(dump_toml(cfg))) == cfg  # inline table round trip
    src = build_source(sc, 64, 0)
    caps = [src.item(i)["caption"] for i in range(40)]
    # pairs only; those without a clear relation fall back to the plain caption "a X and a Y"
    related = [c for c in caps if " of " in c or " above " in c or " below " in c]
    assert all(" and " in c for c in caps if c not in related)
    assert len(related) > 20 and not any(w in c for c in caps for w in ("red", "blue", "green"))
    from harmon.data.shapeworld import ShapeWorld
    plain = next(s for s in load_config(CONFIGS / "shapeworld_stage2.toml").data.sources
                 if s.task == "t2i")
    world = ShapeWorld(size=64, seed=plain.seed)
    assert [build_source(plain, 64, 0).item(i)["caption"] for i in range(20)] == \
        [world.t2i_item(i)["caption"] for i in range(20)]
    with pytest.raises(ValueError, match=r"unknown scene kinds in kind_weights \['pairs'\]"):
        load_config(f, ["data.sources.0.kind_weights={pairs = 1}"])
    with pytest.raises(ValueError, match="shapeworld t2i sources only"):
        load_config(f, ["data.sources.1.style_weights={short = 1}"])
    with pytest.raises(ValueError, match="weights must be >= 0 with a positive sum"):
        load_config(f, ["data.sources.0.style_weights={short = 0}"])


def test_pair_order_reaches_the_shapeworld_source(tmp_path):
    """data.sources.N.pair_order builds an ordered world (its pairs' short captions name the left or
    upper object first); it is refused where it cannot apply."""
    from harmon.data.shapes import clear_relation
    from harmon.train.data import build_source

    f = tmp_path / "c.toml"
    f.write_text((CONFIGS / "shapeworld_stage2.toml").read_text())
    cfg = load_config(f, ["data.sources.0.pair_order=true", "data.sources.0.kind_weights={pair = 1}"])
    sc = cfg.data.sources[0]
    assert sc.pair_order is True and load_config(None, base=tomllib.loads(dump_toml(cfg))) == cfg
    world = build_source(sc, 64, 0).world
    assert world.pair_order
    assert all(clear_relation(s.objects[0].bbox, s.objects[1].bbox) in ("left of", "above")
               for s in map(world.sample, range(40)))
    assert not build_source(load_config(f).data.sources[0], 64, 0).world.pair_order
    with pytest.raises(ValueError, match="pair_order: expected true or false, got 'yes'"):
        load_config(f, ['data.sources.0.pair_order="yes"'])
    with pytest.raises(ValueError, match="pair_order applies to shapeworld sources only"):
        load_config(f, ['data.sources.0.kind="jsonl"', 'data.sources.0.path="x.jsonl"',
                        "data.sources.0.pair_order=true"])


def test_and_horizontal_reaches_the_shapeworld_t2i_source(tmp_path):
    """data.sources.N.and_horizontal captions the t2i stream's vertical pairs by their relation;
    it is refused on an i2t source, whose captions it would not touch."""
    from harmon.train.data import build_source

    f = tmp_path / "c.toml"
    f.write_text((CONFIGS / "shapeworld_stage2.toml").read_text())
    tasks = [sc.task for sc in load_config(f).data.sources]
    t2i, i2t = tasks.index("t2i"), tasks.index("i2t")
    cfg = load_config(f, [f"data.sources.{t2i}.and_horizontal=true",
                          f"data.sources.{t2i}.pair_order=true",
                          f"data.sources.{t2i}.kind_weights={{pair = 1}}",
                          f"data.sources.{t2i}.style_weights={{short = 1}}"])
    assert load_config(None, base=tomllib.loads(dump_toml(cfg))) == cfg
    source = build_source(cfg.data.sources[t2i], 64, 0)
    assert source.world.and_horizontal
    caps = [source.item(i)["caption"] for i in range(40)]
    assert all((" and " in c) != (" above " in c or " below " in c) for c in caps), caps
    assert sum(" above " in c or " below " in c for c in caps) > 10
    with pytest.raises(ValueError, match="and_horizontal applies to shapeworld t2i sources only"):
        load_config(f, [f"data.sources.{i2t}.and_horizontal=true"])


def test_paraphrase_reaches_the_shapeworld_vqa_source(tmp_path):
    """data.sources.N.paraphrase builds a world that rewords its questions; it is refused on a
    t2i source, where there is no question to reword."""
    from harmon.train.data import build_source

    f = tmp_path / "c.toml"
    f.write_text((CONFIGS / "shapeworld_stage2.toml").read_text())
    cfg = load_config(f, ["data.sources.1.paraphrase=true"])
    sc = cfg.data.sources[1]
    assert sc.task == "i2t" and sc.paraphrase is True
    assert load_config(None, base=tomllib.loads(dump_toml(cfg))) == cfg
    assert build_source(sc, 64, 0).world.paraphrase
    assert not build_source(load_config(f).data.sources[1], 64, 0).world.paraphrase
    with pytest.raises(ValueError, match="paraphrase applies to shapeworld i2t sources only"):
        load_config(f, ["data.sources.0.paraphrase=true"])


def test_mask_ratio_std_override_spreads_the_t2i_masks(tmp_path):
    """model.mask_ratio_std widens MAR's truncated normal (mean 1): with a large spread the
    training masks hide about half the tokens on average instead of about four fifths."""
    from harmon.rng import TorchDraws
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=[
        "model.mask_ratio_min=0.05", "model.mask_ratio_std=10"]).model)
    assert model.cfg.mar.mask_ratio_std == 10.0 and "mask ratio spread 10" in source
    default, _, _ = build_model(tiny_config(tmp_path, overrides=["model.mask_ratio_min=0.05"]).model)
    assert default.cfg.mar.mask_ratio_std == 0.25  # MAR's value, kept unless the run says otherwise

    size = model.cfg.image_size
    pixels = torch.zeros(1, 3, size, size)
    ids, am = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)

    def masked_share(m):
        draws = TorchDraws(torch.Generator().manual_seed(0))
        with torch.no_grad():
            return sum(float(m.t2i_loss(pixels, ids, am, draws)["mask"].mean())
                       for _ in range(40)) / 40

    wide, narrow = masked_share(model.eval()), masked_share(default.eval())
    assert 0.4 < wide < 0.65 and narrow > 0.75, (wide, narrow)
    with pytest.raises(ValueError, match="mask_ratio_std must be > 0"):
        tiny_config(tmp_path, overrides=["model.mask_ratio_std=0"])


def test_foreground_weight_counts_the_tokens_off_the_background_more(tmp_path):
    """model.foreground_weight reaches the model and the run's source line; foreground_share
    finds an object's tokens; the weighted t2i loss equals the plain one on a flat image (no
    foreground) and differs from it where an object is, with the same draws."""
    from harmon.models.harmon import foreground_share
    from harmon.rng import TorchDraws
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=[
        "model.foreground_weight=3"]).model)
    assert model.cfg.mar.foreground_weight == 3.0 and "foreground loss weight +3" in source
    plain, _, _ = build_model(tiny_config(tmp_path).model)
    assert plain.cfg.mar.foreground_weight == 0.0  # MAR's plain mean unless the run says otherwise
    plain.load_state_dict(model.state_dict())

    size, s = model.cfg.image_size, model.cfg.mar.vae_stride
    flat = torch.full((1, 3, size, size), -0.5)
    obj = flat.clone()
    obj[:, 0, s:3 * s, s:2 * s + s // 2] = 0.9  # a red block: two tokens whole, two half covered
    share = foreground_share(obj, s).reshape(size // s, size // s)
    assert share[1:3, 1].tolist() == [1.0, 1.0] and share[1:3, 2].tolist() == [0.5, 0.5]
    assert float(share.sum()) == 3.0 and float(foreground_share(flat, s).sum()) == 0.0

    ids, am = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)

    def loss(m, pixels):
        with torch.no_grad():
            return float(m.eval().t2i_loss(pixels, ids, am,
                                           TorchDraws(torch.Generator().manual_seed(0)))["loss"])

    assert loss(model, flat) == loss(plain, flat)
    assert abs(loss(model, obj) - loss(plain, obj)) > 1e-6
    with pytest.raises(ValueError, match="foreground_weight must lie in"):
        tiny_config(tmp_path, overrides=["model.foreground_weight=-1"])


def test_context_noise_perturbs_only_the_visible_tokens_in_training(tmp_path, monkeypatch):
    """model.context_noise reaches the model and the run's source line; in training the
    generator reads its visible tokens with noise of a per-token std in [0, bound] while the
    masked tokens (the loss's targets) stay exact; in eval mode it reads them exact."""
    from harmon.models.harmon import noisy_context
    from harmon.rng import TorchDraws
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=[
        "model.context_noise=0.5", "model.dropout=0"]).model)
    assert model.cfg.mar.context_noise == 0.5 and "noise up to 0.5 on visible" in source

    tokens = torch.randn(64, 100, 16)
    mask = (torch.rand(64, 100, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    noisy = noisy_context(tokens, mask, 0.5, TorchDraws(torch.Generator().manual_seed(0)))
    delta = noisy - tokens
    assert torch.equal(delta[mask.bool()], torch.zeros_like(delta[mask.bool()]))
    per_token = delta[~mask.bool()].std(dim=-1)
    assert float(per_token.max()) < 0.5 * 1.8 and float(per_token.min()) < 0.05
    # std drawn uniformly from [0, b]: the mean square is b^2 / 3
    assert abs(float(delta[~mask.bool()].pow(2).mean()) - 0.25 / 3) < 0.006
    again = noisy_context(tokens, mask, 0.5, TorchDraws(torch.Generator().manual_seed(0)))
    assert torch.equal(noisy, again)

    seen = {}
    original = type(model).t2i_condition

    def spy(self, tokens, mask, *args):
        seen.update(tokens=tokens.clone(), mask=mask.clone())
        return original(self, tokens, mask, *args)

    monkeypatch.setattr(type(model), "t2i_condition", spy)
    size = model.cfg.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids, am = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        target = model.encode_images(pixels)
        for train in (True, False):
            model.train(train)
            model.t2i_loss(pixels, ids, am, TorchDraws(torch.Generator().manual_seed(0)))
            masked, visible = seen["mask"].bool(), ~seen["mask"].bool()
            assert torch.equal(seen["tokens"][masked], target[masked])
            moved = (seen["tokens"][visible] - target[visible]).abs().max()
            assert (float(moved) > 1e-3) if train else (float(moved) == 0.0)
    with pytest.raises(ValueError, match="context_noise must lie in"):
        tiny_config(tmp_path, overrides=["model.context_noise=-0.1"])


def test_full_mask_prob_masks_every_token_of_a_share_of_training_batches(tmp_path):
    """model.full_mask_prob reaches the model and the run's source line; in training that share
    of t2i batches masks every token (the caption alone decides the layout), the rest keep MAR's
    drawn ratio; in eval mode, or with 0, the mask and the loss are MAR's exactly (no extra
    draw)."""
    from harmon.configs import MARConfig
    from harmon.rng import TorchDraws
    from harmon.train.weights import build_model
    from train_helpers import tiny_config

    model, _, source = build_model(tiny_config(tmp_path, overrides=[
        "model.full_mask_prob=0.5", "model.dropout=0"]).model)
    assert model.cfg.mar.full_mask_prob == 0.5 and "every token masked in 0.5 of t2i" in source
    size = model.cfg.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids, am = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)

    def run(p: float, train: bool, seed: int = 0):
        model.cfg.mar.full_mask_prob = p
        model.train(train)
        with torch.no_grad():
            return model.t2i_loss(pixels, ids, am, TorchDraws(torch.Generator().manual_seed(seed)))

    n = pixels.shape[0] * model.grid_for(size)[0] * model.grid_for(size)[1]
    assert all(int(run(1.0, True, s)["mask"].sum()) == n for s in range(5))
    full = [int(run(0.5, True, s)["mask"].sum()) == n for s in range(40)]
    mar = [int(run(0.0, True, s)["mask"].sum()) == n for s in range(40)]
    assert 8 <= sum(full) - sum(mar) <= 32  # about half of the batches, beyond MAR's own
    base = run(0.0, True)
    for p, train in ((0.0, True), (1.0, False)):
        again = run(p, train)
        assert torch.equal(again["mask"], base["mask"]) and torch.equal(again["loss"], base["loss"])
    with pytest.raises(ValueError, match="full_mask_prob must lie in"):
        tiny_config(tmp_path, overrides=["model.full_mask_prob=1.5"])
    with pytest.raises(ValueError, match="full_mask_prob must lie in"):
        MARConfig(full_mask_prob=-0.1)


def test_flaw_prob_reaches_the_shapeworld_vqa_source(tmp_path):
    """data.sources.N.flaw_prob builds a world whose VQA scenes are flawed that often; it is
    refused on a t2i source and outside [0, 1]."""
    from harmon.train.data import build_source

    f = tmp_path / "c.toml"
    f.write_text((CONFIGS / "shapeworld_stage2.toml").read_text())
    cfg = load_config(f, ["data.sources.1.flaw_prob=0.5"])
    sc = cfg.data.sources[1]
    assert sc.task == "i2t" and sc.flaw_prob == 0.5
    assert load_config(None, base=tomllib.loads(dump_toml(cfg))) == cfg
    assert build_source(sc, 64, 0).world.flaw_prob == 0.5
    assert build_source(load_config(f).data.sources[1], 64, 0).world.flaw_prob == 0
    with pytest.raises(ValueError, match="flaw_prob applies to shapeworld i2t sources only"):
        load_config(f, ["data.sources.0.flaw_prob=0.5"])
    with pytest.raises(ValueError, match=r"flaw_prob must be a number in \[0, 1\]"):
        load_config(f, ["data.sources.1.flaw_prob=2"])
