"""Self-correction rounds after masked generation: which tokens are re-masked, and bad input."""

import pytest
import torch

from harmon.fast.step import FastStep
from harmon.generate import sample_tokens, token_errors
from harmon.rng import TorchDraws


def _prompt(tiny_harmon):
    """Two prompts, guided: (4, L) ids and padding mask, the conditional rows first."""
    return tiny_harmon._prompt_batch(["a red circle", "two blue squares"], True)


def test_a_round_resamples_exactly_the_worst_tokens(tiny_harmon):
    model = tiny_harmon.model
    ids, mask = _prompt(tiny_harmon)
    grid, P, m = (4, 4), 2, 5  # 16 tokens; refine_fraction 0.3 -> 5 re-masked
    gen = torch.Generator().manual_seed(7)
    before = sample_tokens(model, ids, mask, grid, TorchDraws(gen), num_iter=6, fast_step=True)
    # the same draws continue into the round: its errors are the ones computed here
    errors = token_errors(model, FastStep(model, ids, mask, grid, True), before, P,
                          TorchDraws(gen))
    after = sample_tokens(model, ids, mask, grid, TorchDraws(torch.Generator().manual_seed(7)),
                          num_iter=6, fast_step=True, refine=1, refine_fraction=0.3)
    changed = (after[:P] != before[:P]).any(dim=-1)  # (P, N)
    worst = torch.zeros_like(changed).scatter_(1, errors.argsort(dim=1, descending=True)[:, :m],
                                               True)
    assert torch.equal(changed, worst)
    assert torch.equal(after[P:], after[:P])  # the unconditional copies follow


def test_token_errors_cover_every_token_once(tiny_harmon):
    model = tiny_harmon.model
    ids, mask = _prompt(tiny_harmon)
    grid = (4, 4)
    tokens = torch.randn(4, 16, model.cfg.mar.token_dim)
    tokens[2:] = tokens[:2]
    calls = []
    step = FastStep(model, ids, mask, grid, True)

    def counting_step(t, msk, to_pred):
        calls.append(to_pred.clone())
        return step(t, msk, to_pred)

    errors = token_errors(model, counting_step, tokens, 2, TorchDraws(torch.Generator()), groups=3)
    assert errors.shape == (2, 16) and bool((errors > 0).all())
    assert len(calls) == 3
    assert torch.equal(torch.stack(calls).sum(0), torch.ones(4, 16, dtype=torch.long))


def test_refine_reports_its_steps_and_is_seeded(tiny_harmon):
    seen = []
    a = tiny_harmon.generate("a red circle", steps=5, seed=1, refine=2, refine_fraction=0.25,
                             refine_steps=3, output="uint8",
                             on_step=lambda info: seen.append((info.step, info.num_steps,
                                                               int(info.mask[0].sum()))))
    assert [s for s, _, _ in seen] == list(range(11)) and {n for _, n, _ in seen} == {11}
    assert [k for _, _, k in seen[5:]] == [3, 2, 0] * 2  # 4 tokens re-masked, 3 steps a round
    b = tiny_harmon.generate("a red circle", steps=5, seed=1, refine=2, refine_fraction=0.25,
                             refine_steps=3, output="uint8")
    plain = tiny_harmon.generate("a red circle", steps=5, seed=1, output="uint8")
    assert torch.equal(a, b) and not torch.equal(a, plain)
    # without guidance, and in the reference mode
    tiny_harmon.generate("a star", steps=4, cfg=1.0, seed=0, refine=1, output="uint8")
    tiny_harmon.generate("a star", steps=4, seed=0, refine=1, mode="reference", output="uint8")


@pytest.mark.parametrize("kwargs, match", [
    (dict(refine=-1), "refine must be an integer >= 0"),
    (dict(refine=1.5), "refine must be an integer >= 0"),
    (dict(refine=True), "refine must be an integer >= 0"),
    (dict(refine=1, refine_fraction=0.0), r"refine_fraction must lie in \(0, 1\]"),
    (dict(refine=1, refine_fraction=1.5), r"refine_fraction must lie in \(0, 1\]"),
    (dict(refine=1, refine_fraction="a"), r"refine_fraction must lie in \(0, 1\]"),
    (dict(refine=1, refine_steps=0), "refine_steps must be an integer >= 1"),
])
def test_bad_refine_settings_are_clear_errors(tiny_harmon, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_harmon.generate("a", steps=2, **kwargs)


def test_best_of_candidates_refines_every_candidate(tiny_harmon):
    kw = dict(steps=3, seed=4, refine=1, output="uint8")
    pool = tiny_harmon.generate("a red circle", num_images_per_prompt=3, **kw)
    best = tiny_harmon.generate("a red circle", candidates=3, **kw)
    scores = tiny_harmon.score(pool, ["a red circle"] * 3)
    assert torch.equal(best[0], pool[int(scores.argmax())])
