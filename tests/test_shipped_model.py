"""The model shipped inside the package: it loads offline by default, fits the size budget,
generates and answers."""

from pathlib import Path

import pytest
import torch

from harmon import Harmon
from harmon.pipeline import SHIPPED_MODEL_DIR

LIMIT = 16 * 2 ** 20


@pytest.fixture(scope="module")
def shipped():
    return Harmon.from_pretrained(device="cpu")


def test_shipped_files_fit_the_budget():
    files = {p.name: p.stat().st_size for p in Path(SHIPPED_MODEL_DIR).iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert sum(files.values()) <= LIMIT


def test_loads_by_default_as_a_trained_float32_model(shipped):
    info = shipped.info()
    assert info["trained"] and info["dtype"] == "float32" and info["image_size"] == 64
    assert shipped.cfg.name == "shapeworld" and shipped.cfg.mar.vae_stride == 8
    assert shipped.tokenizer.vocab_size <= shipped.cfg.llm.vocab_size


def test_generates_and_answers(shipped):
    images = shipped.generate(["a red circle", "two blue squares"], steps=8, seed=0)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = shipped.generate(["a red circle", "two blue squares"], steps=8, seed=0, output="uint8")
    assert torch.equal(again[0], torch.from_numpy(__import__("numpy").asarray(images[0])))
    answer = shipped.answer(images[0], "How many circles are there?", max_new_tokens=8)
    assert isinstance(answer[0], str) and answer[0]  # a trained model says something
