"""Image to text: preprocessing, prompt layout, batching, sampling and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.understand import decode, image_embeddings, preprocess


def test_preprocess_pads_with_gray_and_scales():
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    x = preprocess(im, 64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    gray = 2 * 127 / 255 - 1
    assert torch.allclose(x[:, 2, 32], torch.full((3,), gray), atol=1e-6)  # top band
    assert torch.allclose(x[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)


def test_question_prompt_layout(tiny_harmon):
    tok = tiny_harmon.tokenizer
    ids = tok.question_ids("What is it?", 80)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n<image>")
    assert text.endswith("\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(tok.image_id) == 80
    assert ids.index(tok.image_id) == len(tok.encode("<|im_start|>user\n"))


def _greedy_ids(model, image, question, n=6):
    pixels = preprocess(image, 64)[None]
    img = image_embeddings(model.model, pixels)
    ids = torch.tensor([model.tokenizer.question_ids(question, img.shape[1])])
    embeds = model.model.splice_images(ids, img, model.tokenizer.image_id)
    return decode(model.model, embeds, torch.ones_like(ids), eos_id=-1, max_new_tokens=n)[0]


def test_batched_left_padded_equals_one_by_one(tiny_harmon):
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    qs = ["What?", "How many red shapes are in the picture?"]
    single = [_greedy_ids(tiny_harmon, im, q) for im, q in zip(ims, qs)]
    model = tiny_harmon.model
    pixels = torch.stack([preprocess(im, 64) for im in ims])
    img = image_embeddings(model, pixels)
    rows = [tiny_harmon.tokenizer.question_ids(q, img.shape[1]) for q in qs]
    L = max(map(len, rows))
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    embeds = model.splice_images(ids, img, tiny_harmon.tokenizer.image_id)
    assert decode(model, embeds, mask, eos_id=-1, max_new_tokens=6) == single


def test_answer_api(tiny_harmon, tmp_path):
    im = Image.new("RGB", (40, 70), (0, 0, 255))
    path = tmp_path / "blue.png"
    im.save(path)
    out = tiny_harmon.answer([im, path, np.asarray(im)], "What colour?", max_new_tokens=4)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    assert out[0] == out[1] == out[2]  # same image three ways
    assert len(tiny_harmon.caption(im, max_new_tokens=3)) == 1


def test_sampling_is_seeded(tiny_harmon):
    im = Image.new("RGB", (64, 64), (0, 200, 0))
    kw = dict(do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=8)
    assert tiny_harmon.answer(im, "q", seed=1, **kw) == tiny_harmon.answer(im, "q", seed=1, **kw)


@pytest.mark.parametrize("images, questions, exc, match", [
    (["/no/such/file.png"], "q", FileNotFoundError, "does not exist"),
    ([], "q", ValueError, "no image"),
    ([Image.new("RGB", (8, 8))] * 2, ["a", "b", "c"], ValueError, "one question per image"),
    ([Image.new("RGB", (8, 8))], "", ValueError, "empty question"),
    ([np.zeros((4, 4), dtype=np.uint8)], "q", ValueError, "uint8"),
])
def test_bad_input(tiny_harmon, images, questions, exc, match):
    with pytest.raises(exc, match=match):
        tiny_harmon.answer(images, questions)


def test_non_image_file(tiny_harmon, tmp_path):
    f = tmp_path / "notes.png"
    f.write_text("this is not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        tiny_harmon.answer(f, "q")


def test_bad_size_and_tokens(tiny_harmon):
    im = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_harmon.answer(im, "q", size=50)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_harmon.answer(im, "q", max_new_tokens=0)


def test_decoding_stops_at_the_end_token_per_row(tiny_harmon):
    # greedy ids without a stop, then the same decoding told that one of them ends the turn:
    # each row must end just before that id's first occurrence, the other row unaffected by it
    rng = np.random.default_rng(1)
    ims = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    model = tiny_harmon.model
    pixels = torch.stack([preprocess(im, 64) for im in ims])
    img = image_embeddings(model, pixels)
    rows = [tiny_harmon.tokenizer.question_ids(q, img.shape[1]) for q in ("What?", "What?")]  # two images
    ids, mask = torch.tensor(rows), torch.ones(2, len(rows[0]), dtype=torch.long)
    assert len(rows[0]) == len(rows[1])
    embeds = model.splice_images(ids, img, tiny_harmon.tokenizer.image_id)
    free = decode(model, embeds, mask, eos_id=-1, max_new_tokens=8)
    eos = free[0][3]
    stopped = decode(model, embeds, mask, eos_id=eos, max_new_tokens=8)
    for full, got in zip(free, stopped):
        assert got == (full[:full.index(eos)] if eos in full else full)
    assert len(stopped[0]) <= 3
