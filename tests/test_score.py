"""Self-scoring (``Harmon.score``) and best-of-N generation (``generate(candidates=...)``)."""

import numpy as np
import pytest
import torch

from harmon.tokenizer import BRIEF_CAPTION_QUESTION
from harmon.understand import image_embeddings, preprocess


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def _log_likelihood_by_hand(model, image, question, answer, end=True):
    """One unpadded row, every position's log-softmax: the score's definition, computed plainly."""
    tok = model.tokenizer
    img = image_embeddings(model.model, preprocess(image, 64)[None])
    q = tok.question_ids(question, img.shape[1])
    a = tok.encode(answer) + ([tok.im_end_id] if end else [])
    ids = torch.tensor([q + a])
    embeds = model.model.splice_images(ids, img, tok.image_id)
    with torch.no_grad():
        hidden = model.model.llm.model(inputs_embeds=embeds).last_hidden_state
        logp = torch.log_softmax(model.model.logits(hidden)[0].float(), dim=-1)
    return sum(float(logp[len(q) + i - 1, t]) for i, t in enumerate(a))


def test_score_is_the_answer_log_likelihood(tiny_harmon):
    im = _images(1)[0]
    got = tiny_harmon.score([im], "a red circle", method="caption")
    want = _log_likelihood_by_hand(tiny_harmon, im, BRIEF_CAPTION_QUESTION, "a red circle")
    assert got.shape == (1,) and got.dtype == torch.float32
    assert got.item() == pytest.approx(want, abs=1e-4)
    yes = tiny_harmon.score([im], "a red circle")  # the default: p(the answer starts yes or Yes)
    q = "Is there a red circle in the image?"
    want = np.logaddexp(*[_log_likelihood_by_hand(tiny_harmon, im, q, word, end=False)
                          for word in ("yes", "Yes")])
    assert yes.item() == pytest.approx(want, abs=1e-4)


def test_questions_score_sums_the_answers_of_the_prompt_s_questions(tiny_harmon):
    """method="questions": the answers of ShapeWorld's questions for the text, summed; a text
    outside the grammar is scored as by "yes"."""
    im = _images(1, seed=2)[0]
    got = tiny_harmon.score([im, im], ["two red squares", "a photo of a cat"], method="questions")
    want = sum(_log_likelihood_by_hand(tiny_harmon, im, q, a, end=False) for q, a in (
        ("How many squares are there in the image?", "two"),
        ("Is there a red square in the image?", "yes")))
    assert got[0].item() == pytest.approx(want, abs=1e-4)
    assert got[1].item() == pytest.approx(
        tiny_harmon.score([im], "a photo of a cat", method="yes").item(), abs=1e-5)


def test_batched_right_padded_scores_equal_one_by_one(tiny_harmon):
    ims = _images(3, seed=1)
    texts = ["a circle", "two blue squares and a very long list of other things", "a star"]
    for method in ("caption", "yes", "questions"):
        batched = tiny_harmon.score(ims, texts, method=method, batch_size=2)
        single = torch.cat([tiny_harmon.score([im], t, method=method) for im, t in zip(ims, texts)])
        assert torch.allclose(batched, single, atol=1e-4), method
    # a uint8 batch (tensor or array) reads the same as the list of arrays
    want = tiny_harmon.score(ims, texts)
    for batch in (np.stack(ims), torch.from_numpy(np.stack(ims))):
        assert torch.allclose(tiny_harmon.score(batch, texts), want, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_images_per_prompt=2, rerank="caption")])
def test_candidates_keep_the_best_scored_draw(tiny_harmon, kwargs):
    prompts, C = ["a red circle", "two squares"], 3
    n = kwargs.get("num_images_per_prompt", 1)
    method = kwargs.get("rerank", "yes")
    pool = tiny_harmon.generate(prompts, num_images_per_prompt=n * C, seed=4, output="uint8")
    best = tiny_harmon.generate(prompts, candidates=C, seed=4, output="uint8", **kwargs)
    assert best.shape == (len(prompts) * n, 64, 64, 3)
    texts = [p for p in prompts for _ in range(n * C)]
    scores = tiny_harmon.score(pool, texts, method=method).view(-1, C)
    want = pool.view(-1, C, 64, 64, 3)[torch.arange(len(scores)), scores.argmax(1)]
    assert torch.equal(best, want)
    # the scores differ between draws, so the pick is not trivially the first one
    assert scores.std(dim=1).min() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(candidates=0), "candidates must be an integer >= 1"),
    (dict(candidates=2.0), "candidates must be an integer >= 1"),
    (dict(candidates=2, rerank="clip"), "rerank must be one of"),
])
def test_bad_candidates_are_clear_errors(tiny_harmon, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_harmon.generate("a", steps=2, **kwargs)


@pytest.mark.parametrize("images, texts, kwargs, match", [
    (2, ["a", "b", "c"], {}, "one text per image"),
    (1, ["  "], {}, "non-empty string"),
    (1, "a", dict(method="clip"), "unknown scoring method"),
])
def test_bad_score_input_is_a_clear_error(tiny_harmon, images, texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_harmon.score(_images(images), texts, **kwargs)


def test_complete_draws_each_image_from_its_own_completed_prompt(tiny_harmon):
    """name_colors=True names the free colours per drawn image (seeded), draws the image from that
    text (info["prompt"]) and reads each candidate against its own text; prompts outside the
    grammar, or naming every colour, are drawn exactly as without it."""
    from harmon.data.shapeworld import parse_prompt

    kw = dict(steps=2, seed=5)
    out = tiny_harmon.generate(["three circles", "a square"], num_images_per_prompt=3,
                               name_colors=True, **kw)
    texts = [im.info["prompt"] for im in out]
    assert [parse_prompt(t)[0][0][0] for t in texts] == ["circle"] * 3 + ["square"] * 3
    assert all(parse_prompt(t)[0][0][1] is not None for t in texts)
    assert len(set(texts)) > 2  # drawn per image, not once per prompt
    # the same seed, the same texts and images; each image is what its text draws
    again = tiny_harmon.generate(["three circles", "a square"], num_images_per_prompt=3,
                                 name_colors=True, **kw)
    assert [im.info["prompt"] for im in again] == texts
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out, again))
    plain = tiny_harmon.generate(texts, **kw)
    assert plain[0].info["prompt"] == texts[0]
    for text in ("a red circle", "a photo of a cat"):
        a = tiny_harmon.generate(text, name_colors=True, output="uint8", **kw)
        assert torch.equal(a, tiny_harmon.generate(text, output="uint8", **kw)), text
    # best of C: the candidates are the draws of num_images_per_prompt=C, each read against
    # the text it was drawn from
    best = tiny_harmon.generate("two stars", candidates=3, name_colors=True, **kw)
    pool = tiny_harmon.generate("two stars", num_images_per_prompt=3, name_colors=True, **kw)
    scores = tiny_harmon.score(pool, [im.info["prompt"] for im in pool])
    pick = pool[int(scores.argmax())]
    assert best[0].tobytes() == pick.tobytes() and best[0].info["prompt"] == pick.info["prompt"]
    with pytest.raises(ValueError, match="name_colors must be True or False"):
        tiny_harmon.generate("a circle", name_colors="yes", **kw)
