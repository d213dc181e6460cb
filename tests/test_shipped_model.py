"""The model shipped inside the package: it loads offline by default, fits the size budget, is
reproducible, and is good at its world (small samples of the model card's measurements)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from harmon import Harmon
from harmon.data import ShapeWorld
from harmon.data.shapes import NUMBER_WORDS, SHAPES, article
from harmon.eval.judge import detect, judge_image
from harmon.eval.prompts import eval_prompts, reference_images
from harmon.eval.vqa import build_vqa_eval_set, evaluate_vqa
from harmon.fast.step import FastStep
from harmon.generate import to_uint8, token_errors
from harmon.pipeline import SHIPPED_MODEL_DIR
from harmon.rng import TorchDraws
from harmon.understand import preprocess

LIMIT = 16 * 2 ** 20
# accuracy the shipped model must add to the majority answer of each question type, well below
# the margins stage VI has on these 30 scenes (count 0.48, colour 0.63, shape 0.84, POPE 0.39;
# its full scores are in docs/model_card.md). Position questions are at chance.
MARGINS = {"count": 0.3, "color": 0.4, "shape": 0.5, "pope": 0.25}


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
    # its own sampling defaults, measured (docs/model_card.md): head temperature 0.7, the
    # colours a prompt leaves free named, and each image the best of four draws by its answers
    # to the prompt's questions; the tests below that measure what the generator draws ask for
    # one draw of the prompt as given (candidates=1, name_colors=False), as they were calibrated
    assert shipped.sampling == {"cfg": 3.0, "temperature": 0.7, "candidates": 4,
                                "rerank": "questions", "name_colors": True}


def test_generation_is_seeded(shipped):
    images = shipped.generate(["a red circle", "two blue squares"], steps=8, seed=0)
    assert [im.size for im in images] == [(64, 64)] * 2
    again = shipped.generate(["a red circle", "two blue squares"], steps=8, seed=0, output="uint8")
    assert torch.equal(again[0], torch.from_numpy(np.array(images[0])))
    other = shipped.generate(["a red circle"], steps=8, seed=1, output="uint8")
    assert not torch.equal(other[0], again[0])


def test_generated_images_take_the_asked_colour(shipped):
    # The shipped model is weak at shapes and layouts (docs/model_card.md), but it follows the
    # prompt's colour: the asked colour must be detected far more often than other colours are.
    specs = [s for s in eval_prompts("test") if s.tag == "colors"]
    images = shipped.generate([s.prompt for s in specs], steps=16, seed=0, candidates=1,
                              name_colors=False)
    found = [{d.color for d in detect(im)} for im in images]
    asked = [s.include[0].color for s in specs]
    hit = np.mean([c in f for c, f in zip(asked, found)])
    other = np.mean([np.mean([c in f for c in set(asked) - {a}]) for a, f in zip(asked, found)])
    assert hit >= 0.35 and hit >= 1.5 * other, (hit, other)


# colour-shape pairs asked in the layout tests below
PAIRS = [("red", "circle", "blue", "square"), ("yellow", "triangle", "purple", "star"),
         ("white", "diamond", "orange", "semicircle"), ("green", "square", "red", "triangle"),
         ("blue", "star", "yellow", "circle"), ("purple", "triangle", "white", "square"),
         ("orange", "circle", "green", "star"), ("cyan", "square", "orange", "triangle")]


def test_a_pair_s_first_named_object_is_drawn_on_the_left_or_on_top(shipped):
    # Its last stages trained on pairs named in reading order (ShapeWorld.pair_order), so which
    # object goes where follows from the names; each pair is asked in both orders. Measured on
    # these 48 draws: 47 of the 47 images in which the judge finds both colours (X-A4, the
    # release before, 42 of 42; X-A2 38 of 38; X-W4 36 of 37; X-W2 28 of 28; X-U 20 of 21); X-C2,
    # before that training, 7 of 11. Since X-A1 "and" names side-by-side pairs only
    # (and_horizontal): 46 of the 47 are side by side (X-A4 41 of 42, X-A2 33 of 38, X-W4 14 of 37).
    named = [((c1, s1), (c2, s2)) for c1, s1, c2, s2 in PAIRS]
    named += [(b, a) for a, b in named]
    prompts = [" and ".join(f"{article(c)} {c} {s}" for c, s in pair) for pair in named]
    first = both = side = 0
    for seed in range(3):
        images = shipped.generate(prompts, seed=seed, candidates=1, name_colors=False)
        for ((c1, _), (c2, _)), image in zip(named, images):
            found = detect(image)
            a = [d for d in found if d.color == c1]
            b = [d for d in found if d.color == c2]
            if not a or not b:
                continue
            (ax, ay), (bx, by) = (max(g, key=lambda d: d.area).center for g in (a, b))
            both += 1
            side += abs(bx - ax) > abs(by - ay)
            first += (bx > ax) if abs(bx - ax) >= abs(by - ay) else (by > ay)
    assert both >= 15 and first >= 0.8 * both, (first, both)
    assert side >= 0.75 * both, (side, both)


def test_draws_the_asked_relation_in_position_prompts(shipped):
    # Stage X-W4 was the first to read the relation words (docs/shapeworld_log.md): where both
    # asked shapes are drawn, the relation now holds about twice as often as not; before, the
    # first-named object went on the left or on top whatever the relation said. Measured on these
    # 42 images: 13 right, 7 with the relation wrong; X-W3, the stage before (float32), 6 and 5;
    # X-W2, the release before, 3 and 6. X-B2 (this release): 30 right, none with it wrong.
    specs = [s for s in eval_prompts("test") if s.tag == "position"][::4]
    results = []
    for seed in range(2):
        images = shipped.generate([s.prompt for s in specs], seed=seed, candidates=1,
                                  name_colors=False)
        results += [judge_image(image, s) for s, image in zip(specs, images)]
    right = sum(r.correct for r in results)
    wrong_relation = sum(r.failure == "position" for r in results)
    assert right >= 10 and right >= 1.5 * wrong_relation, (right, wrong_relation)


def test_draws_a_relation_on_its_axis(shipped):
    # Stages X-A1 and X-A2 captioned vertical pairs by their relation only (and_horizontal), so
    # "above" and "below" alone ask for the vertical axis; X-W4 drew a third of its position
    # images holding both shapes on the wrong axis. Measured on these 64 draws, among the images
    # holding both colours: the asked relation on its axis in 59 of 60 (X-A4, the release before,
    # 55 of 56; X-A2 53 of 53); X-W4 20 of 40.
    relations = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (1, -1),
                 "below": (1, 1)}  # (axis: 0 = x, 1 = y; sign of first - second along it)
    asked = [(rel, c1, c2) for rel in relations for c1, _, c2, _ in PAIRS]
    prompts = [f"{article(c1)} {c1} {s1} {rel} {article(c2)} {c2} {s2}"
               for rel in relations for c1, s1, c2, s2 in PAIRS]
    right = both = 0
    for seed in range(2):
        images = shipped.generate(prompts, seed=seed, candidates=1, name_colors=False)
        for (rel, c1, c2), image in zip(asked, images):
            found = detect(image)
            a = [d for d in found if d.color == c1]
            b = [d for d in found if d.color == c2]
            if not a or not b:
                continue
            first, second = (max(g, key=lambda d: d.area).center for g in (a, b))
            both += 1
            axis, sign = relations[rel]
            gap = [first[k] - second[k] for k in (0, 1)]
            right += abs(gap[axis]) > abs(gap[1 - axis]) and gap[axis] * sign > 0
    assert both >= 30 and right >= 0.85 * both, (right, both)


def test_answers_questions_about_its_world(shipped):
    # better than always giving each question type's most frequent answer
    items = build_vqa_eval_set(30, size=64, seed=3, qtypes=list(MARGINS))
    preds = shipped.answer([it.scene.render() for it in items], [it.question for it in items],
                           max_new_tokens=6)
    per = evaluate_vqa(items, preds)["per_type"]
    for qtype, margin in MARGINS.items():
        answers = [it.answer for it in items if it.qtype == qtype]
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        assert per[qtype]["accuracy"] >= majority + margin, (qtype, per[qtype], majority)


def test_answers_open_and_reworded_questions(shipped):
    # Its last stages asked half of their questions in other wordings (ShapeWorld.paraphrase) and
    # single objects "What shape is in the image?". Measured here: 12 / 12 shapes, colours and
    # counts (X-W2 the same); X-U, before them, 4 / 12 shapes and 5 / 12 colours (it answered
    # the shape question with a colour or a number, the colour question with a shape), 12 / 12
    # counts.
    world = ShapeWorld(size=64, seed=11, kind_weights={"single": 1.0})
    scenes = [world.sample(i) for i in range(12)]
    images = [s.render() for s in scenes]
    for question, truth in (("What shape is in the image?", lambda o: o.shape),
                            ("What color is the object?", lambda o: o.color),
                            ("How many shapes can you see?", lambda o: "one")):
        answers = shipped.answer(images, [question] * len(images), max_new_tokens=6)
        right = sum(a == truth(s.objects[0]) for a, s in zip(answers, scenes))
        assert right >= 10, (question, answers)


def test_questions_get_the_answer_instruction_it_was_trained_with(shipped):
    from harmon.data.shapeworld import SHORT_ANSWER_PROMPT

    assert shipped.answer_instruction == SHORT_ANSWER_PROMPT
    image = ShapeWorld(size=64, seed=5).sample(1).render()
    q = "How many objects are there?"
    with_it = shipped.answer(image, f"{q}\n{SHORT_ANSWER_PROMPT}", max_new_tokens=24, instruction="")
    assert shipped.answer(image, q, max_new_tokens=24) == with_it  # appended by default
    assert shipped.answer(image, f"{q}\n{SHORT_ANSWER_PROMPT}", max_new_tokens=24) == with_it  # once
    bare = shipped.answer(image, q, max_new_tokens=24, instruction="")[0]
    assert len(with_it[0].split()) == 1 and len(bare.split()) > 1, (with_it, bare)  # a caption


def test_captions_name_what_is_there(shipped):
    scene = ShapeWorld(size=64, seed=5).sample(1)
    caption = shipped.caption(scene.render(), max_new_tokens=40)[0]
    assert any(o.shape in caption for o in scene.objects), (caption, scene.captions)


@pytest.mark.parametrize("method, share", [("yes", 0.75), ("caption", 0.9)])
def test_it_scores_its_world_s_captions_above_other_scenes(shipped, method, share):
    # what generate(candidates=...) relies on: its own reading prefers an image's caption (chance:
    # 0.5; the shipped model: 11 and 12 of 12; "yes" is asked "Is there a red circle and two blue
    # squares in the image?", a longer question than its training's)
    scenes = [ShapeWorld(size=64, seed=11).sample(i) for i in range(12)]
    images = [s.render() for s in scenes]
    captions = [s.captions["short"] for s in scenes]
    own = shipped.score(images, captions, method=method)
    other = shipped.score(images, captions[1:] + captions[:1], method=method)
    assert (own > other).float().mean() >= share, (own, other)


def test_token_errors_find_a_pasted_object_token(shipped):
    # a background token of each scene replaced by another scene's most object-like token: the
    # self-correction rounds must see it as the worst fit of its image (found first in 12 of 12
    # scenes, by a factor over 10, when this test was written)
    scenes = [ShapeWorld(size=64, seed=5).sample(i) for i in range(6)]
    pixels = torch.stack([preprocess(s.render(), 64) for s in scenes])
    with torch.no_grad():
        tokens = shipped.model.encode_images(pixels)  # (6, 64, 16)
    off_background = (tokens - tokens.median(dim=1, keepdim=True).values).norm(dim=-1)
    pasted = tokens.clone()
    where = off_background.argmin(dim=1)  # a background token of each scene
    for i in range(6):
        j = (i + 1) % 6
        pasted[i, where[i]] = tokens[j, off_background[j].argmax()]
    ids, mask = shipped._prompt_batch([s.caption("short") for s in scenes], True)
    step = FastStep(shipped.model, ids, mask, (8, 8), True)
    errors = token_errors(shipped.model, step, torch.cat([pasted, pasted]), 6,
                          TorchDraws(torch.Generator().manual_seed(0)))
    assert torch.equal(errors.argmax(dim=1), where)


def test_its_autoencoder_keeps_what_the_judge_reads(shipped):
    """The generation ceiling: true scenes for the evaluation prompts, through the shipped VAE and
    back, are judged right (a VAE that blurred shapes away would cap every generator below the
    issue's 0.80); a broken decoder is caught by the same measure."""
    from harmon.eval.model_eval import evaluate_reconstruction

    scene = ShapeWorld(size=64, seed=3).sample(0).render_array()
    back = np.asarray(shipped.reconstruct(scene)[0], dtype=np.float64)
    assert back.shape == (64, 64, 3)
    psnr = 10 * np.log10(255.0 ** 2 / np.mean((back - scene) ** 2))
    assert psnr > 28, psnr  # the model card: 31 dB
    with pytest.raises(ValueError, match="no image given"):
        shipped.reconstruct([])
    ceiling = evaluate_reconstruction(shipped, samples=1, limit=60)
    assert ceiling["images"] == 60 and ceiling["overall"] >= 0.95
    conv = shipped.model.vae.decoder.conv_out
    saved = conv.weight.detach().clone()
    try:
        with torch.no_grad():
            conv.weight.mul_(0.2)  # washed-out colours: objects fade into the background
        assert evaluate_reconstruction(shipped, samples=1, limit=60)["overall"] < 0.5
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved)


def test_its_decoder_tolerates_the_errors_of_drawn_latents(shipped):
    """Stage X-D fine-tuned the VAE decoder alone on noisy latents (``harmon train-vae
    --decoder-only --latent-noise 1``): true scenes' latents with noise of half their unit still
    decode to images the judge passes (103 of 120; the decoder before it: 63), while the encoder,
    and with it every answer, stayed."""
    from harmon.eval.judge import judge_image

    world = ShapeWorld(size=64, seed=0)
    specs = eval_prompts("all")[:120]
    pixels = torch.stack([preprocess(reference_images(world, spec, 1)[0], 64) for spec in specs])
    with torch.no_grad():
        tokens = shipped.model.encode_images(pixels.to(shipped.model.vae_dtype()))
        noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))
        images = to_uint8(shipped.model.decode_tokens(tokens + 0.5 * noise.to(tokens.dtype),
                                                      (8, 8)).float()).numpy()
    right = sum(judge_image(im, spec).correct for im, spec in zip(images, specs))
    assert right >= 90, right


def test_its_own_reading_tells_the_asked_count_from_one_more(shipped):
    # What generate(candidates=..., rerank="questions") picks by: of two true scenes, "three
    # circles" and four circles, the one whose count questions are answered as the prompt says
    # scores higher. "yes" ("Is there three circles in the image?") is read as "are there
    # circles" and tells them apart little better than a coin. Measured on these 28 pairs:
    # questions 28, yes 17 (caption 27).
    world = ShapeWorld(size=64, seed=3)
    counting = {s.prompt: s for s in eval_prompts("test") if s.tag == "counting"}
    pairs = [(s, counting[f"{NUMBER_WORDS[s.include[0].count + 1]} {SHAPES[s.include[0].shape]}"])
             for s in counting.values() if s.include[0].count < 4]
    images, texts = [], []
    for asked, more in pairs:
        for k in range(2):
            images += [world.scene_for_spec(asked, k).render(), world.scene_for_spec(more, k).render()]
            texts += [asked.prompt] * 2
    wins = {}
    for method in ("questions", "yes"):
        s = shipped.score(images, texts, method=method).view(-1, 2)
        wins[method] = int((s[:, 0] > s[:, 1]).sum())
    assert wins["questions"] >= 0.9 * len(images) // 2, wins
