"""The fast sampling engine gives the reference's tokens (up to float rounding) for a seed."""

import pytest
import torch

from harmon.fast import FastHeadSampler
from harmon.fixtures import FixtureCase
from harmon.generate import sample_tokens
from harmon.reference import _model
from harmon.rng import TorchDraws


def _close(a, b, rel=1e-4):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize("run", [0, 1, 2])
def test_fast_head_matches_reference_on_fixture_draws(fixtures_dir, run):
    case = FixtureCase.load(fixtures_dir / "04_diffusion_sample")
    model = _model(case)
    spec = case.params["runs"][run]
    draws_ref, draws_fast = case.draws(), case.draws()
    for r in case.params["runs"][:run]:  # skip the draws of earlier runs
        for d in (draws_ref, draws_fast):
            model.mar.diffloss.sample(case[f"in.{r['z']}"], r["temperature"], r["cfg"], d)
    z = case[f"in.{spec['z']}"]
    ref = model.mar.diffloss.sample(z, spec["temperature"], spec["cfg"], draws_ref)
    fast = FastHeadSampler(model.mar.diffloss).sample(z, spec["temperature"], spec["cfg"],
                                                       draws_fast)
    M = fast.shape[0]
    assert M == (z.shape[0] // 2 if spec["cfg"] != 1 else z.shape[0])
    assert _close(fast, ref[:M]) and _close(fast, case[f"out.sample_{spec['name']}"][:M])
    assert draws_fast.position == draws_ref.position  # same draws consumed


@pytest.mark.parametrize("cfg, schedule, temperature", [(3.0, "constant", 1.0),
                                                        (2.0, "linear", 0.8), (1.0, "constant", 1.0)])
def test_fast_generation_equals_reference(tiny_harmon, cfg, schedule, temperature):
    kw = dict(steps=6, seed=5, cfg=cfg, cfg_schedule=schedule, temperature=temperature,
              output="uint8", size=64)
    ref = tiny_harmon.generate(["a red circle", "a blue star"], mode="reference", **kw)
    fast = tiny_harmon.generate(["a red circle", "a blue star"], mode="fast", **kw)
    assert (ref.int() - fast.int()).abs().max() <= 1


def test_fast_tokens_close_to_reference(tiny_harmon):
    model = tiny_harmon.model
    ids, mask = tiny_harmon._prompt_batch(["a green square"] * 2, True)
    ref = sample_tokens(model, ids, mask, (4, 4), TorchDraws(torch.Generator().manual_seed(0)),
                        num_iter=5)
    fast = sample_tokens(model, ids, mask, (4, 4), TorchDraws(torch.Generator().manual_seed(0)),
                         num_iter=5, head_sampler=FastHeadSampler(model.mar.diffloss))
    assert _close(fast, ref)


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_compiled_head_matches_eager_for_any_number_of_tokens(tiny_harmon, cfg):
    """One compiled graph per guidance kind serves every row count (one row is padded to two),
    consumes the same draws and gives the eager sampler's tokens; the temperature and scale are
    inputs, not constants of the graph."""
    head = tiny_harmon.model.mar.diffloss
    compiled = FastHeadSampler(head, compile=True)
    groups = 2 if cfg != 1.0 else 1
    for M, temperature in ((3, 1.0), (1, 0.8), (5, 1.1)):
        z = torch.randn(groups * M, head.net.cond_embed.in_features,
                        generator=torch.Generator().manual_seed(M))
        scale = cfg + 0.5 if cfg != 1.0 and M == 5 else cfg  # a new scale: no recompile
        d_eager, d_comp = (TorchDraws(torch.Generator().manual_seed(2)) for _ in range(2))
        eager = FastHeadSampler(head).sample(z, temperature, scale, d_eager)
        # after the first call, no row count, temperature or scale may recompile the graph
        with torch._dynamo.config.patch(error_on_recompile=M != 3):
            out = compiled.sample(z, temperature, scale, d_comp)
        assert out.shape == (M, 16) and _close(out, eager, rel=1e-4)
        assert torch.equal(d_comp.generator.get_state(), d_eager.generator.get_state())


def test_chunk_length_divides_the_steps():
    from harmon.fast.head import _chunk_length

    assert [_chunk_length(T) for T in (100, 50, 25, 7, 1, 12)] == [5, 5, 5, 1, 1, 4]


@pytest.mark.parametrize("guided", [True, False])
def test_fast_step_gives_the_reference_conditions(tiny_harmon, guided):
    """FastStep (encoder once per guided pair, static prompt cache, last decoder block on the
    revealed rows only) = mar_step(...).z[to_pred], with prompts of different lengths."""
    from harmon.fast.step import FastStep
    from harmon.models.llm import PromptCache

    model = tiny_harmon.model
    ids, am = tiny_harmon._prompt_batch(["a red circle", "two big blue stars on the left"],
                                        guided)
    assert len(set(am.sum(1).tolist())) > 1  # right padding is exercised
    R, grid, N = ids.shape[0], (4, 4), 16
    g = torch.Generator().manual_seed(0)
    step = FastStep(model, ids, am, grid, guided)
    prompt = PromptCache(model.llm, model.embed_text(ids))
    tokens = torch.randn(R, N, 16, generator=g)
    if guided:
        tokens[R // 2:] = tokens[:R // 2]
    order = torch.randperm(N, generator=g)
    for masked, revealed in ((16, 1), (10, 3), (3, 3)):  # the same buffers serve every step
        mask = torch.zeros(R, N)
        mask[:, order[:masked]] = 1
        to_pred = torch.zeros(R, N, dtype=torch.bool)
        to_pred[:, order[:revealed]] = True
        with torch.no_grad():
            ref = model.mar_step(tokens, mask, grid, prompt, am).z[to_pred]
            fast = step(tokens, mask, to_pred)
        assert fast.shape == ref.shape == (R * revealed, model.cfg.mar.decoder_embed_dim)
        assert _close(fast, ref, rel=1e-5)


def test_fast_step_in_bfloat16_gives_the_reference_conditions():
    """The GPU default dtype: rotary tables, RMSNorm casts and the mask work in bfloat16."""
    from harmon import Harmon
    from harmon.fast.step import FastStep
    from harmon.models.llm import PromptCache

    h = Harmon.from_pretrained("tiny", dtype="bfloat16", seed=0)
    model = h.model
    ids, am = h._prompt_batch(["a red circle", "two big blue stars on the left"], True)
    R, grid, N = ids.shape[0], (4, 4), 16
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(R, N, 16, generator=g).bfloat16()
    tokens[R // 2:] = tokens[:R // 2]
    order = torch.randperm(N, generator=g)
    mask = torch.zeros(R, N, dtype=torch.bfloat16)
    mask[:, order[:10]] = 1
    to_pred = torch.zeros(R, N, dtype=torch.bool)
    to_pred[:, order[:3]] = True
    with torch.no_grad():
        prompt = PromptCache(model.llm, model.embed_text(ids))
        ref = model.mar_step(tokens, mask, grid, prompt, am).z[to_pred]
        fast = FastStep(model, ids, am, grid, True)(tokens, mask, to_pred)
    assert fast.dtype == torch.bfloat16 and _close(fast.float(), ref.float(), rel=1e-2)


def test_fast_generation_equals_reference_with_a_batch_of_prompts(tiny_harmon):
    kw = dict(steps=8, seed=3, output="uint8", size=64, num_images_per_prompt=2)
    prompts = ["a red circle", "three small green triangles at the top"]
    ref = tiny_harmon.generate(prompts, mode="reference", **kw)
    fast = tiny_harmon.generate(prompts, mode="fast", **kw)
    assert ref.shape == (4, 64, 64, 3) and (ref.int() - fast.int()).abs().max() <= 1


def test_bad_mode(tiny_harmon):
    with pytest.raises(ValueError, match="mode must be"):
        tiny_harmon.generate("a", mode="turbo")


def test_fewer_head_steps_is_an_option_of_the_fast_mode(tiny_harmon):
    a = tiny_harmon.generate("a", steps=3, seed=0, head_steps=25, output="uint8")
    assert a.shape == (1, 64, 64, 3)
    assert tiny_harmon._fast_heads[(False, 25, "ddpm", 0.0)].diffusion.num_timesteps == 25
    with pytest.raises(ValueError, match="head_steps"):
        tiny_harmon.generate("a", head_steps=10, mode="reference")
    with pytest.raises(ValueError, match="head_steps"):
        tiny_harmon.generate("a", head_steps=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_update_samples_the_distribution_its_noise_prediction_knows(tiny_harmon, eta):
    """With the exact noise prediction of Gaussian data N(0, s^2), DDIM's coefficients carry
    N(0, 1) noise to N(0, s^2) (up to the discretisation error of 250 steps, which vanishes as
    the steps grow: it is 6% of s at 25 steps); for a point mass they land on the point exactly."""
    from harmon.fast.head import ddim_update

    sampler = FastHeadSampler(tiny_harmon.model.mar.diffloss, num_steps=250, sampler="ddim",
                              eta=eta)
    coefs = sampler.tables(torch.device("cpu"), torch.float64)["coefs"]
    g = torch.Generator().manual_seed(0)
    for s, target in ((0.5, None), (0.0, 0.3)):
        x = torch.randn(20000, 4, generator=g, dtype=torch.float64)
        for k in reversed(range(len(coefs))):
            ab = 1.0 / coefs[k][0] ** 2
            mean = (ab ** 0.5) * (target or 0.0)
            # exact eps of N(mean, ab s^2 + 1 - ab) given x_t
            eps = (x - mean) * (1 - ab) ** 0.5 / (ab * s * s + 1 - ab)
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = ddim_update(x, eps, coefs[k], noise, 1.0, k > 0)
        if target is None:
            assert abs(float(x.std()) - s) < 0.012 and abs(float(x.mean())) < 0.02
        else:
            # (the schedule's coefficients are float32 values, as the reference applies them)
            assert torch.allclose(x, torch.full_like(x, target), atol=1e-4)


def test_ddim_head_sampler_runs_through_generate(tiny_harmon):
    a = tiny_harmon.generate("a red circle", steps=4, seed=0, size=64, output="uint8",
                             head_steps=10, head_sampler="ddim")
    b = tiny_harmon.generate("a red circle", steps=4, seed=0, size=64, output="uint8",
                             head_steps=10, head_sampler="ddim")
    assert torch.equal(a, b) and a.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="ddpm' or 'ddim"):
        tiny_harmon.generate("a red circle", steps=2, size=64, head_sampler="euler")
    with pytest.raises(ValueError, match="mode='fast'"):
        tiny_harmon.generate("a red circle", steps=2, size=64, head_sampler="ddim",
                             mode="reference")


def test_x0_clip_bounds_the_tokens_and_the_fast_head_matches_it():
    from harmon.configs import tiny
    from harmon.pipeline import random_model

    cfg = tiny()
    cfg.mar.x0_clip = 0.5
    # float64: with predictions this large the trajectory amplifies float32 rounding, which
    # varies between processes (kernel choice depends on memory alignment) up to ~1e-4
    head = random_model(cfg, seed=0).mar.diffloss.double()
    with torch.no_grad():  # make the random network's predictions large, so the clamp binds
        head.net.final_layer.linear.weight.normal_(0, 1.0)
    z = torch.randn(2 * 12, cfg.mar.decoder_embed_dim, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    ref = head.sample(z, 1.0, 3.0, TorchDraws(torch.Generator().manual_seed(1)))
    fast = FastHeadSampler(head).sample(z, 1.0, 3.0, TorchDraws(torch.Generator().manual_seed(1)))
    assert float(ref[:12].abs().max()) <= 0.5 + 1e-6  # the last step returns the clamped x0
    assert _close(fast, ref[:12])
    head.x0_clip = None  # unclamped, the same network's tokens are far outside that range
    loose = head.sample(z, 1.0, 3.0, TorchDraws(torch.Generator().manual_seed(1)))
    assert float(loose[:12].abs().max()) > 5.0


def test_compile_is_an_option_of_the_fast_mode_and_of_the_commands(tiny_harmon):
    from harmon.cli import build_parser

    with pytest.raises(ValueError, match="compile=True needs mode='fast'"):
        tiny_harmon.generate("a", steps=2, mode="reference", compile=True)
    assert build_parser().parse_args(["generate", "a", "--compile"]).compile
    assert build_parser().parse_args(["serve", "--compile"]).compile
    assert not build_parser().parse_args(["generate", "a"]).compile
