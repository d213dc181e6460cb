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
    ids, mask = tiny_harmon._prompt_batch(["a green square"], 2, True)
    ref = sample_tokens(model, ids, mask, (4, 4), TorchDraws(torch.Generator().manual_seed(0)),
                        num_iter=5)
    fast = sample_tokens(model, ids, mask, (4, 4), TorchDraws(torch.Generator().manual_seed(0)),
                         num_iter=5, head_sampler=FastHeadSampler(model.mar.diffloss))
    assert _close(fast, ref)


def test_compiled_head_matches(tiny_harmon):
    head = tiny_harmon.model.mar.diffloss
    z = torch.randn(6, head.net.cond_embed.in_features, generator=torch.Generator().manual_seed(1))
    draws = lambda: TorchDraws(torch.Generator().manual_seed(2))
    eager = FastHeadSampler(head).sample(z, 1.0, 3.0, draws())
    compiled = FastHeadSampler(head, compile=True).sample(z, 1.0, 3.0, draws())
    assert _close(compiled, eager, rel=1e-4)


def test_bad_mode(tiny_harmon):
    with pytest.raises(ValueError, match="mode must be"):
        tiny_harmon.generate("a", mode="turbo")


def test_fewer_head_steps_is_an_option_of_the_fast_mode(tiny_harmon):
    a = tiny_harmon.generate("a", steps=3, seed=0, head_steps=25, output="uint8")
    assert a.shape == (1, 64, 64, 3)
    assert ("compile", 25) not in tiny_harmon._fast_heads and (False, 25) in tiny_harmon._fast_heads
    assert tiny_harmon._fast_heads[(False, 25)].diffusion.num_timesteps == 25
    with pytest.raises(ValueError, match="head_steps"):
        tiny_harmon.generate("a", head_steps=10, mode="reference")
    with pytest.raises(ValueError, match="head_steps"):
        tiny_harmon.generate("a", head_steps=0)
