"""The model shipped inside the package: it loads offline by default, fits the size budget, is
reproducible, and is good at its world (small samples of the model card's measurements)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from harmon import Harmon
from harmon.data import ShapeWorld
from harmon.eval.judge import judge_image
from harmon.eval.prompts import eval_prompts
from harmon.eval.vqa import build_vqa_eval_set, evaluate_vqa
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
    assert "harmon train" in shipped.provenance  # where the weights came from


def test_generation_is_seeded(shipped):
    images = shipped.generate(["a red circle", "two blue squares"], steps=8, seed=0)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = shipped.generate(["a red circle", "two blue squares"], steps=8, seed=0, output="uint8")
    assert torch.equal(again[0], torch.from_numpy(np.asarray(images[0])))
    other = shipped.generate(["a red circle"], steps=8, seed=1, output="uint8")
    assert not torch.equal(other[0], again[0])


def test_generates_what_it_is_asked_for(shipped):
    # one prompt of every colour and every shape, judged like the evaluation (default settings
    # but 16 steps, to keep the test short)
    specs = [s for s in eval_prompts("test") if s.tag in ("colors", "single_object")][::3]
    images = shipped.generate([s.prompt for s in specs], steps=16, seed=0)
    score = np.mean([judge_image(im, s).correct for im, s in zip(images, specs)])
    assert score >= 0.7, score


def test_answers_questions_about_its_world(shipped):
    items = build_vqa_eval_set(6, size=64, seed=3, qtypes=["pope", "count", "color"])
    preds = shipped.answer([it.scene.render() for it in items], [it.question for it in items],
                           max_new_tokens=6)
    scores = evaluate_vqa(items, preds)
    assert scores["overall"] >= 0.75, (scores["per_type"], preds[:8])


def test_captions_name_what_is_there(shipped):
    scene = ShapeWorld(size=64, seed=5).sample(1)
    caption = shipped.caption(scene.render(), max_new_tokens=40)[0]
    assert any(o.shape in caption for o in scene.objects), (caption, scene.captions)
