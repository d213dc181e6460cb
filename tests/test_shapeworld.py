"""ShapeWorld: determinism, geometry, vocabulary, held-out split, captions, questions, streams, export."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import re
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.data import (COLOR_NAMES, HELDOUT_PAIRS, MAX_OBJECTS, SHAPE_NAMES, ObjectReq, PromptSpec,
                         ShapeWorld, ShapeWorldT2I, ShapeWorldVQA)
from harmon.data.export import add_export_command
from harmon.data.shapes import (COLORS, NUMBER_WORDS, RELATIONS, SHAPES, article, circumradius,
                               clear_relation)
from harmon.data.shapeworld import (FLAW_KINDS, SHORT_ANSWER_PROMPT, QA, Flaw, Scene, ShapeObject,
                                    noun_phrase, question_wordings)


@pytest.fixture(scope="module")
def scenes():
    world = ShapeWorld(size=64, seed=0)
    return [world.sample(i) for i in range(600)]


# ----------------------------------------------------------------------------------------------------
# Determinism and images


def test_deterministic_per_seed_and_index():
    a, b = ShapeWorld(size=96, seed=3), ShapeWorld(size=96, seed=3)
    for i in (0, 1, 17, 12345):
        sa, sb = a.sample(i), b.sample(i)
        assert sa == sb
        assert np.array_equal(sa.render_array(), sb.render_array())
        assert sa.captions == sb.captions and sa.questions() == sb.questions()
    # Order of access does not matter (no hidden generator state).
    assert np.array_equal(a.sample(5).render_array(), ShapeWorld(size=96, seed=3)[5].render_array())
    other = ShapeWorld(size=96, seed=4)
    assert any(not np.array_equal(a.sample(i).render_array(), other.sample(i).render_array())
               for i in range(4))


@pytest.mark.parametrize("size", [64, 100, 128, 256, 512])
def test_render_sizes(size):
    scene = ShapeWorld(size=size, seed=1).sample(2)
    arr = scene.render_array()
    assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
    im = scene.render()
    assert isinstance(im, Image.Image) and im.size == (size, size) and im.mode == "RGB"


@pytest.mark.parametrize("bad", [63, 513, 0, 128.0, "128", True])
def test_bad_size(bad):
    with pytest.raises(ValueError, match="size"):
        ShapeWorld(size=bad)


def test_objects_visible_inside_and_apart(scenes):
    for s in scenes:
        assert 1 <= len(s.objects) <= MAX_OBJECTS
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
            assert o.diameter * 64 >= 11  # classifiable at 64 px
        for a, b in itertools.combinations(s.objects, 2):
            gap = math.hypot(a.x - b.x, a.y - b.y) - circumradius(a.shape) * a.diameter / 2 \
                - circumradius(b.shape) * b.diameter / 2
            assert gap > 0.04, "objects must not overlap or touch"


def test_objects_are_drawn_in_their_colour():
    scene = ShapeWorld(size=128, seed=2).sample(3)
    arr = scene.render_array().astype(int)
    for o in scene.objects:
        px = arr[int(o.y * 128), int(o.x * 128)]  # bbox centre; inside every shape but the star's notch
        if o.shape not in ("star", "semicircle", "triangle"):
            assert np.abs(px - np.asarray(o.rgb)).max() <= 1


def test_vocabulary_and_kinds_covered(scenes):
    assert len(SHAPE_NAMES) >= 6 and len(COLOR_NAMES) == 8
    objs = [o for s in scenes for o in s.objects]
    assert set(o.shape for o in objs) == set(SHAPE_NAMES)
    assert set(o.color for o in objs) == set(COLOR_NAMES)
    assert set(s.kind for s in scenes) == {"single", "pair", "count", "multi"}
    assert set(len(s.objects) for s in scenes) == {1, 2, 3, 4}
    assert {s.texture > 0 for s in scenes} == {True, False}
    assert len({s.background for s in scenes}) >= 4
    rels = Counter(s.relation[1] for s in scenes if s.relation)
    assert set(rels) == set(RELATIONS)


def test_heldout_pairs_never_in_training_stream():
    world = ShapeWorld(size=64, seed=11)
    seen = {(o.color, o.shape) for i in range(1500) for o in world.sample(i).objects}
    assert not seen & set(HELDOUT_PAIRS)
    # Every other pair does occur, and every held-out colour and shape occurs in other pairs.
    assert len(seen) == len(COLOR_NAMES) * len(SHAPE_NAMES) - len(HELDOUT_PAIRS)
    free = ShapeWorld(size=64, seed=11, holdout=False)
    seen_free = {(o.color, o.shape) for i in range(1500) for o in free.sample(i).objects}
    assert set(HELDOUT_PAIRS) <= seen_free


# ----------------------------------------------------------------------------------------------------
# Text


def _scene(objs, relation=None, kind="pair"):
    o = [ShapeObject(s, c, x, y, 0.3, (0, 0, 0)) for s, c, x, y in objs]
    return Scene(64, tuple(o), "black", (18, 18, 20), 0.0, 1, kind, relation)


def test_caption_styles():
    s = _scene([("circle", "red", 0.25, 0.5), ("square", "blue", 0.75, 0.5)], (0, "left of", 1))
    assert s.captions["short"] == "a red circle and a blue square"
    assert s.captions["plain"] == "a circle and a square"
    assert s.captions["position"] == "a red circle to the left of a blue square"
    assert s.captions["position_plain"] == "a circle to the left of a square"
    assert s.captions["detailed"] == ("a red circle on the left and a blue square on the right "
                                      "on a plain black background")
    three = _scene([("star", "orange", 0.2, 0.2), ("star", "orange", 0.5, 0.5), ("star", "orange", 0.8, 0.8)])
    assert three.captions["short"] == "three orange stars"
    assert three.captions["plain"] == "three stars"
    mixed = _scene([("cross", "white", 0.2, 0.2), ("cross", "orange", 0.8, 0.8)])
    assert mixed.captions["short"] == "a white cross and an orange cross"
    assert mixed.captions["plain"] == "two crosses"
    assert s.caption("position") == s.captions["position"]
    assert three.caption("position") == "three orange stars"
    with pytest.raises(ValueError, match="caption style"):
        s.caption("poem")


def test_captions_match_objects(scenes):
    word = {2: "two", 3: "three", 4: "four"}
    for s in scenes:
        caps = s.captions
        for o in s.objects:
            assert o.color in caps["short"] and o.shape in caps["short"] + caps["plain"]
            assert o.color in caps["detailed"]
        if s.kind == "count":
            shape = s.objects[0].shape
            assert caps["plain"] == f"{word[len(s.objects)]} {shape}{'es' if shape == 'cross' else 's'}"
        if s.relation:
            i, rel, j = s.relation
            assert clear_relation(s.objects[i].bbox, s.objects[j].bbox) == rel
            assert RELATIONS[rel] in caps["position"]
        for c in caps.values():
            assert not re.search(r"\ba [aeio]", c), c  # "an orange", never "a orange"


def test_questions_answers_are_true(scenes):
    for s in scenes[:200]:
        qa = s.questions()
        pope = [q for q in qa if q.qtype == "pope"]
        for split in ("random", "popular", "adversarial"):
            answers = Counter(q.answer for q in pope if q.split == split)
            assert answers["yes"] == answers["no"], "POPE questions are balanced"
        pairs = {(o.color, o.shape) for o in s.objects}
        for q in pope:
            m = re.match(r"Is there an? (?:(\w+) )?(\w+) in the image\?", q.question)
            color, shape = (m.group(1), m.group(2)) if m.group(1) else (None, m.group(2))
            truth = any(o.shape == shape and (color is None or o.color == color) for o in s.objects)
            assert q.answer == ("yes" if truth else "no"), q
            if q.split == "adversarial" and q.answer == "no":
                assert shape in {o.shape for o in s.objects}  # a present shape, wrong colour
            if q.split != "random":
                assert color is not None and (q.answer == "yes") == ((color, shape) in pairs)
        for q in qa:
            if q.qtype == "count" and "objects" in q.question:
                assert q.answer == ["zero", "one", "two", "three", "four"][len(s.objects)]
            if q.qtype == "color":
                shape = re.match(r"What color is the (\w+)\?", q.question).group(1)
                assert q.answer == next(o.color for o in s.objects if o.shape == shape)
            if q.qtype != "caption":
                assert q.question.endswith(SHORT_ANSWER_PROMPT)
        assert {"pope", "count", "caption"} <= {q.qtype for q in qa}


def test_conversation_format():
    q = QA("Is there a star in the image?", "no", "pope", "random")
    assert q.conversation() == [{"from": "human", "value": "<image>\nIs there a star in the image?"},
                                {"from": "gpt", "value": "no"}]
    world = ShapeWorld(size=64, seed=0)
    item = world.vqa_item(3, turns=3)
    conv = item["conversations"]
    assert len(conv) == 6 and [t["from"] for t in conv] == ["human", "gpt"] * 3
    assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
    assert len(item["qtypes"]) == 3


# ----------------------------------------------------------------------------------------------------
# Specs


def test_spec_roundtrip_and_scene_for_spec():
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}],
            "prompt": "a circle to the left of a square"}
    spec = PromptSpec.from_metadata(meta)
    assert spec.to_metadata() == {**meta, "split": "test"}
    world = ShapeWorld(size=64, seed=0)
    for j in range(20):
        scene = world.scene_for_spec(spec, j)
        (sq,), (ci,) = ([o for o in scene.objects if o.shape == k] for k in ("square", "circle"))
        assert clear_relation(ci.bbox, sq.bbox) == "left of"
    count = PromptSpec("counting", "four stars", (ObjectReq("star", 4),), (ObjectReq("star", 5),))
    assert [o.shape for o in world.scene_for_spec(count).objects] == ["star"] * 4
    # Colours given by the spec, held-out ones included (reference images are not training data).
    held = PromptSpec("colors", "a purple circle", (ObjectReq("circle", 1, "purple"),), split="heldout")
    assert world.scene_for_spec(held).objects[0].color == "purple"
    assert world.scene_for_spec(spec, 3) == world.scene_for_spec(spec, 3)


@pytest.mark.parametrize("meta, match", [
    ({"tag": "colors", "include": [{"class": "circle", "color": "pink"}], "prompt": "x"},
     "unknown colour 'pink'"),
    ({"tag": "colors", "include": [{"class": "dog"}], "prompt": "x"}, "unknown shape 'dog'"),
    ({"tag": "colours", "include": [{"class": "circle"}], "prompt": "x"}, "unknown tag 'colours'"),
    ({"tag": "position", "include": [{"class": "circle", "position": ["near", 0]}], "prompt": "x"},
     "unknown relation 'near'"),
    ({"tag": "position", "include": [{"class": "circle", "position": ["above", 0]}], "prompt": "x"},
     "position index"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 0}], "prompt": "x"}, "count"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 2}]}, "lacks the key 'prompt'"),
    ({"tag": "counting", "include": [{"class": "circle", "size": 2}], "prompt": "x"}, "unknown key"),
])
def test_bad_specs(meta, match):
    with pytest.raises(ValueError, match=match):
        PromptSpec.from_metadata(meta)


def test_impossible_specs():
    world = ShapeWorld(size=64)
    five = {"tag": "counting", "include": [{"class": "circle", "count": 5}], "prompt": "five circles"}
    with pytest.raises(ValueError, match="at most 4"):
        world.scene_for_spec(five)
    many = {"tag": "two_object", "include": [{"class": "circle", "count": 3}, {"class": "star", "count": 2}],
            "prompt": "three circles and two stars"}
    with pytest.raises(ValueError, match="5 objects"):
        world.scene_for_spec(many)
    contra = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
              "exclude": [{"class": "circle", "count": 2}], "prompt": "two circles"}
    with pytest.raises(ValueError, match="contradictory"):
        world.scene_for_spec(contra)


def test_bad_world_arguments():
    with pytest.raises(ValueError, match="scene kind"):
        ShapeWorld(kind_weights={"single": 1.0, "crowd": 1.0})
    with pytest.raises(ValueError, match="caption style"):
        ShapeWorld().t2i_item(0, style_weights={"haiku": 1.0})
    with pytest.raises(ValueError, match="index"):
        ShapeWorld().sample(-1)
    with pytest.raises(ValueError, match="rank"):
        ShapeWorldT2I(rank=2, world_size=2)
    with pytest.raises(ValueError, match="pair_order must be true or false"):
        ShapeWorld(pair_order="yes")
    with pytest.raises(ValueError, match="paraphrase must be true or false"):
        ShapeWorld(paraphrase=1)
    with pytest.raises(ValueError, match="and_horizontal must be true or false"):
        ShapeWorld(and_horizontal="no")


def test_pair_order_names_the_left_or_upper_object_first():
    """With pair_order every pair is clearly related and listed along the relation's axis, so the
    short caption names the left (or upper) object first; the position caption stays true; the
    other kinds and the default world's scenes are untouched."""
    ordered = ShapeWorld(size=64, seed=5, pair_order=True)
    default = ShapeWorld(size=64, seed=5)
    axes, shown = Counter(), Counter()
    for i in range(300):
        s, d = ordered.sample(i), default.sample(i)
        if s.kind != "pair":
            assert s.to_dict() == d.to_dict()
            continue
        first, second = s.objects
        rel = clear_relation(first.bbox, second.bbox)
        assert rel in ("left of", "above"), (i, rel)
        axes[rel] += 1
        assert s.caption("short").startswith(f"{article(first.color)} {first.name} and ")
        assert s.caption("plain").startswith(f"{article(first.shape)} {first.shape} and ")
        i_, named, j_ = s.relation
        assert clear_relation(s.objects[i_].bbox, s.objects[j_].bbox) == named
        shown[named] += 1
    assert min(axes.values()) > 30 and set(shown) == set(RELATIONS)  # both axes, all four captions
    unordered = [default.sample(i) for i in range(300)]
    pairs = [s for s in unordered if s.kind == "pair"]
    # without it, a pair's first-named object is on the right or below about as often as not
    late = sum(clear_relation(s.objects[0].bbox, s.objects[1].bbox) in ("right of", "below")
               for s in pairs)
    assert 0.2 < late / len(pairs) < 0.6


def test_and_horizontal_names_vertical_pairs_by_their_relation_only():
    """With and_horizontal a pair one above the other is captioned "X above/below Y" whatever
    style is drawn, so every "and" caption of a pair names a side-by-side pair; side-by-side
    pairs, the other kinds and every scene keep the default world's captions and pixels."""
    weights = {"short": 1, "plain": 1, "detailed": 1, "position": 1, "position_plain": 1}
    knob = ShapeWorld(size=64, seed=5, pair_order=True, and_horizontal=True)
    base = ShapeWorld(size=64, seed=5, pair_order=True)
    moved = Counter()
    for i in range(300):
        s = knob.sample(i)
        assert s.to_dict() == base.sample(i).to_dict()
        (cap, style), (cap0, style0) = knob.caption_for(i, s, weights), base.caption_for(i, s, weights)
        vertical = s.kind == "pair" and s.relation[1] in ("above", "below")
        if not vertical:
            assert (cap, style) == (cap0, style0)
            continue
        assert style.startswith("position") and (" above " in cap or " below " in cap), cap
        assert " and " not in cap
        assert style == ("position_plain" if style0 in ("plain", "position_plain") else "position")
        if not style0.startswith("position"):
            moved[style0] += 1
    assert set(moved) == {"short", "plain", "detailed"} and min(moved.values()) > 5


CONTENT_WORDS = {*COLOR_NAMES, *SHAPE_NAMES, *SHAPES.values(), "left", "right", "above", "below"}


def test_every_question_has_other_wordings_with_the_same_content():
    """Each question a scene asks has at least two other wordings; each keeps the short-answer
    instruction and the words that carry the answer's content (shape, colour, relation)."""
    world = ShapeWorld(size=64, seed=3)
    seen = Counter()
    for i in range(60):
        for q in world.sample(i).questions():
            others = question_wordings(q.question)
            assert len(others) >= 2 and q.question not in others, q.question
            head, _, tail = q.question.partition("\n")
            for o in others:
                assert o.partition("\n")[2] == tail
                content = set(re.findall(r"\w+", head)) & CONTENT_WORDS
                assert content <= set(re.findall(r"\w+", o)), (q.question, o)
            seen[q.qtype] += 1
    assert set(seen) == {"pope", "count", "color", "shape", "position", "caption"}
    assert question_wordings("What is the meaning of life?") == []
    assert question_wordings("Is the red circle above the star?") == [
        "Is the red circle above the star in the image?", "Is the red circle placed above the star?"]


def test_paraphrase_rewords_questions_and_keeps_their_answers():
    """With paraphrase, about half the questions come in another wording with the same answer; a
    multi-object scene draws the same questions as without it; a single-object scene can be asked
    "What shape is in the image?"."""
    plain = ShapeWorld(size=64, seed=4)
    worded = ShapeWorld(size=64, seed=4, paraphrase=True)
    reworded = total = 0
    open_questions = Counter()
    for i in range(200):
        scene = plain.sample(i)
        conv_w, types_w = worded.conversation_for(i, turns=2)
        if len(scene.objects) == 1:
            for h, g in zip(conv_w[::2], conv_w[1::2]):
                q = h["value"].removeprefix("<image>\n").partition("\n")[0]
                if q == "What shape is in the image?":
                    assert g["value"] == scene.objects[0].shape
                    open_questions[q] += 1
                elif q == "What color is the object?":
                    assert g["value"] == scene.objects[0].color
                    open_questions[q] += 1
            continue
        conv_p, types_p = plain.conversation_for(i, turns=2)
        assert types_w == types_p
        for hp, hw, gp, gw in zip(conv_p[::2], conv_w[::2], conv_p[1::2], conv_w[1::2]):
            assert gw == gp
            total += 1
            if hw != hp:
                reworded += 1
                assert hw["value"].removeprefix("<image>\n") in question_wordings(
                    hp["value"].removeprefix("<image>\n"))
    assert 0.35 < reworded / total < 0.65
    assert min(open_questions.values()) >= 3 and len(open_questions) == 2
    # the scenes and captions are those of the plain world
    assert worded.t2i_item(7)["caption"] == plain.t2i_item(7)["caption"]


# ----------------------------------------------------------------------------------------------------
# Streams


def test_t2i_stream_items():
    ds = ShapeWorldT2I(size=64, seed=2, length=20)
    items = list(ds)
    assert [it["index"] for it in items] == list(range(20))
    world = ShapeWorld(size=64, seed=2)
    for it in items[:5]:
        ref = world.t2i_item(it["index"])
        assert it["caption"] == ref["caption"]
        assert np.array_equal(np.asarray(it["image"]), np.asarray(ref["image"]))
        assert isinstance(it["image"], Image.Image)
    assert len({it["style"] for it in items}) >= 3
    arr = next(iter(ShapeWorldT2I(size=64, seed=2, length=1, as_numpy=True)))["image"]
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8


def test_streams_are_sharded_by_rank():
    seen = []
    for rank in range(3):
        ds = ShapeWorldVQA(size=64, rank=rank, world_size=3, start=10, length=30)
        seen.append([it["index"] for it in ds])
    flat = sorted(itertools.chain(*seen))
    assert flat == list(range(10, 40))
    assert seen[1][:3] == [11, 14, 17]
    # Infinite by default.
    it = iter(ShapeWorldT2I(size=64, rank=1, world_size=2))
    assert [next(it)["index"] for _ in range(3)] == [1, 3, 5]


def test_streams_are_sharded_by_worker():
    ds = ShapeWorldVQA(size=64, seed=1, rank=1, world_size=2, length=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                         collate_fn=lambda x: x)
    items = list(loader)
    assert sorted(it["index"] for it in items) == list(range(1, 16, 2))
    world = ShapeWorld(size=64, seed=1)
    for it in items[:3]:
        assert it["conversations"] == world.vqa_item(it["index"])["conversations"]


# ----------------------------------------------------------------------------------------------------
# Export CLI


def _export_parser():
    parser = argparse.ArgumentParser(prog="harmon data")
    add_export_command(parser.add_subparsers(dest="cmd", required=True))
    return parser


def test_export_cli(tmp_path, capsys):
    out = tmp_path / "export"
    args = _export_parser().parse_args(["export", "--out", str(out), "-n", "5", "--size", "64", "--seed", "7",
                                        "--shard-size", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "exported 5" in capsys.readouterr().out
    world = ShapeWorld(size=64, seed=7)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:08d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(pngs[3])), world.sample(3).render_array())
    t2i = [json.loads(line) for line in (out / "t2i.jsonl").read_text().splitlines()]
    assert len(t2i) == 5 and t2i[2]["caption"] == world.t2i_item(2)["caption"]
    assert t2i[2]["image"] == "images/00000002.png"
    assert set(t2i[2]["captions"]) >= {"short", "plain", "detailed"}
    llava = json.loads((out / "llava.json").read_text())
    assert len(llava) == 5 and llava[0]["conversations"][0]["value"].startswith("<image>\n")
    assert llava[4]["conversations"] == world.vqa_item(4)["conversations"]
    assert len((out / "vqa.jsonl").read_text().splitlines()) == 5
    shards = sorted((out / "shards").glob("*.tar"))
    assert [s.name for s in shards] == [f"shapeworld-{k:06d}.tar" for k in range(3)]
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names == ["00000002.png", "00000002.txt", "00000002.json", "00000003.png", "00000003.txt",
                         "00000003.json"]
        assert tar.extractfile("00000003.txt").read().decode() == t2i[3]["caption"]
        meta = json.loads(tar.extractfile("00000003.json").read())
        assert meta["conversations"] == llava[3]["conversations"]
        img = Image.open(io.BytesIO(tar.extractfile("00000002.png").read()))
        assert np.array_equal(np.asarray(img), world.sample(2).render_array())


def test_export_bad_arguments(tmp_path):
    parser = _export_parser()
    for argv, match in ((["-n", "0"], "number of samples"), (["--size", "32"], "size"),
                        (["--shard-size", "0"], "shard size"), (["--start", "-5"], "first scene"),
                        (["--turns", "0"], "turns"), (["--seed", "-1"], "seed")):
        out = tmp_path / "x"
        args = parser.parse_args(["export", "--out", str(out), "--no-progress", *argv])
        with pytest.raises(ValueError, match=match):
            args.func(args)
        assert not out.exists()  # checked before anything is written


def test_export_never_overwrites_an_export_unless_asked(tmp_path, capsys):
    from harmon.cli import main

    out = tmp_path / "sw"
    assert main(["data", "export", "--out", str(out), "-n", "2", "--size", "64", "--no-progress"]) == 0
    before = (out / "t2i.jsonl").read_text()
    assert main(["data", "export", "--out", str(out), "-n", "2", "--start", "5", "--size", "64",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds an export" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "t2i.jsonl").read_text() == before  # nothing the user saved is lost
    assert main(["data", "export", "--out", str(out), "-n", "2", "--start", "5", "--size", "64",
                 "--no-progress", "--overwrite"]) == 0
    assert json.loads((out / "t2i.jsonl").read_text().splitlines()[0])["index"] == 5
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    assert main(["data", "export", "--out", str(a_file), "-n", "1", "--no-progress"]) == 2
    assert "not a folder" in capsys.readouterr().err and a_file.read_text() == "keep me"


def test_exported_data_loads_through_the_training_sources(tmp_path):
    from harmon.data.export import export
    from harmon.train.data import JsonlSource, LlavaSource, WebDatasetSource

    out = tmp_path / "sw"
    export(out, 4, size=64, seed=3, shard_size=2, progress=False)
    world = ShapeWorld(size=64, seed=3)
    t2i = JsonlSource(str(out / "t2i.jsonl"))
    item = t2i.item(1)
    assert item["caption"] == world.t2i_item(1)["caption"] and Path(item["image"]).is_file()
    llava = LlavaSource(str(out / "llava.json"))
    assert llava.item(2)["conversations"] == world.vqa_item(2)["conversations"]
    wds = WebDatasetSource(str(out / "shards"))
    assert wds.num_items() == 4
    assert wds.item(3)["caption"] == world.t2i_item(3)["caption"]


def test_group_relations_hold_for_every_member_and_cycles_are_refused():
    from harmon.eval.judge import judge_image

    spec = PromptSpec("position", "a circle to the left of three squares",
                      (ObjectReq("square", 3), ObjectReq("circle", 1, position=("left of", 0))))
    world = ShapeWorld(size=128, seed=0)
    assert all(judge_image(world.scene_for_spec(spec, i).render(), spec).correct for i in range(8))
    # a chain: placed in dependency order whatever the include order
    chain = PromptSpec("position", "a star above a circle left of a square",
                       (ObjectReq("star", position=("above", 1)),
                        ObjectReq("circle", position=("left of", 2)), ObjectReq("square")))
    assert all(judge_image(world.scene_for_spec(chain, i).render(), chain).correct for i in range(4))
    with pytest.raises(ValueError, match="cycle"):
        PromptSpec("position", "a circle left of a square left of the circle",
                   (ObjectReq("circle", position=("left of", 1)),
                    ObjectReq("square", position=("left of", 0))))
    with pytest.raises(ValueError, match="split"):
        PromptSpec("colors", "a red circle", (ObjectReq("circle", color="red"),), split="train")


def test_training_questions_never_name_a_heldout_pair():
    world = ShapeWorld(size=64, seed=0)
    named = {f"{c} {s}" for c, s in HELDOUT_PAIRS}
    for i in range(400):
        for q in world.sample(i).questions():
            assert not any(n in q.question or n in q.answer for n in named), q


# ----------------------------------------------------------------------------------------------------
# Prompts taken apart into questions (Harmon.score(method="questions"))


def test_prompt_questions_are_the_trained_wordings_and_true_of_scenes_that_show_the_prompt():
    from harmon.data.shapeworld import prompt_questions
    from harmon.eval.prompts import eval_prompts

    world = ShapeWorld(size=64, seed=0)
    kinds = Counter()
    for spec in eval_prompts("all"):
        checks = prompt_questions(spec.prompt)
        assert checks, spec.prompt
        shapes = {r.shape for r in spec.include}
        assert sum(q.startswith("How many") for q, _ in checks) == len(shapes), spec.prompt
        for k in range(2):
            scene = world.scene_for_spec(spec, k)
            trained = {qa.question: qa.answer for qa in scene.questions()}
            for q, a in checks:
                if q.startswith("Is there"):  # asked of a scene only when drawn for POPE
                    assert any(f"Is there {noun_phrase(o.shape, o.color)} in the image?" == q
                               for o in scene.objects), (spec.prompt, q)
                    assert a == "yes"
                else:  # counts and colours of shapes met once: every scene is asked them
                    assert trained[f"{q}\n{SHORT_ANSWER_PROMPT}"] == a, (spec.prompt, q, a)
                kinds[q.split()[0]] += k == 0
    assert kinds["How"] > 0 and kinds["Is"] > 0 and kinds["What"] > 0


def test_prompt_questions_leave_other_texts_alone():
    from harmon.data.shapeworld import prompt_questions

    assert prompt_questions("three circles") == [("How many circles are there in the image?",
                                                  "three")]
    assert prompt_questions("A red circle and a red square.") == [
        ("How many circles are there in the image?", "one"),
        ("How many squares are there in the image?", "one"),
        ("Is there a red circle in the image?", "yes"), ("What color is the circle?", "red"),
        ("Is there a red square in the image?", "yes"), ("What color is the square?", "red")]
    # the same shape named twice is counted once, its colour not asked (two circles to ask about)
    assert prompt_questions("a red circle above a blue circle") == [
        ("How many circles are there in the image?", "two"),
        ("Is there a red circle in the image?", "yes"), ("Is there a blue circle in the image?", "yes")]
    for text in ("a photo of a cat", "seven circles", "a circles", "two circle", "a pink circle",
                 "a circle and", "", "a, b, c and d circles"):
        assert prompt_questions(text) is None, text


def test_flawed_scene_draws_the_object_wrong_and_leaves_it_out_of_every_answer():
    """ShapeWorld.flawed moves one object of a scene of two or more to ``flaws``: it is still
    drawn (blended into a far colour, or fused with a shifted copy), but captions and answers are
    those of the objects drawn right, the flawed object is asked about with the count and
    existence its right objects give, and what a flaw leaves unclear is not asked."""
    world = ShapeWorld(size=64, seed=5)
    kinds = Counter()
    for i in range(120):
        scene = world.sample(i)
        bad = world.flawed(scene)
        if len(scene.objects) == 1:
            assert bad is scene
            continue
        assert bad == world.flawed(scene)  # deterministic
        (flaw,) = bad.flaws
        kinds[flaw.kind] += 1
        assert len(bad.objects) == len(scene.objects) - 1 and bad.relation is None
        assert sorted(bad.objects + (flaw.obj,), key=id) == sorted(scene.objects, key=id)
        qa = bad.questions()
        answers = {q.question.partition("\n")[0]: q.answer for q in qa}
        shape, color = flaw.obj.shape, flaw.obj.color
        right = [o for o in bad.objects if o.shape == shape]
        assert answers[f"How many {SHAPES[shape]} are there in the image?"] == NUMBER_WORDS[len(right)]
        # a blob is still an object, and a blend shares colours: those questions are not asked
        assert "How many objects are there in the image?" not in answers
        assert not {q.qtype for q in qa} & {"shape", "caption"}
        if flaw.kind == "blend":
            assert np.linalg.norm(np.subtract(flaw.other_rgb, COLORS[color])) > 120
        named = f"Is there {noun_phrase(shape, color)} in the image?"
        assert answers[named] == ("yes" if any(o.color == color for o in right) else "no")
        assert bad.captions["short"] == replace(bad, flaws=()).captions["short"]
        # drawn: the flawed object's pixels differ from the scene without it
        a = bad.render_array().astype(int)
        b = replace(bad, flaws=()).render_array().astype(int)
        x0, y0, x1, y1 = (int(v * 64) for v in flaw.obj.bbox)
        assert np.abs(a - b)[y0:y1 + 1, x0:x1 + 1].sum(-1).max() > 60
        assert bad.to_dict()["flaws"][0]["kind"] == flaw.kind
    assert set(kinds) == set(FLAW_KINDS) and min(kinds.values()) > 20


def test_flaws_look_as_named():
    """A blended object holds both its colour and the other one; a fused object covers more
    pixels than the object drawn right."""
    obj = ShapeObject("square", "red", 0.5, 0.5, 0.4, COLORS["red"])
    clean = Scene(64, (obj,), "black", (0, 0, 0), 0.0, 1, "single")
    blend = Scene(64, (), "black", (0, 0, 0), 0.0, 1, "single",
                  flaws=(Flaw(obj, "blend", 0.0, 0.0, COLORS["blue"]),))
    px = blend.render_array().reshape(-1, 3).astype(int)
    near = lambda rgb: (np.abs(px - np.asarray(rgb)).sum(1) < 40).sum()  # noqa: E731
    assert near(COLORS["red"]) > 60 and near(COLORS["blue"]) > 60
    fuse = Scene(64, (), "black", (0, 0, 0), 0.0, 1, "single",
                 flaws=(Flaw(obj, "fuse", 0.7, 0.8),))
    covered = lambda s: (s.render_array().sum(-1) > 100).sum()  # noqa: E731
    assert covered(fuse) > 1.2 * covered(clean)
    with pytest.raises(ValueError, match="unknown flaw kind 'melt'"):
        Flaw(obj, "melt", 0.0, 0.5)


def test_flaw_prob_flaws_that_share_of_the_vqa_stream_only():
    """flaw_prob flaws about that share of the VQA scenes of two or more objects (the same ones
    every time), never the text-to-image stream; 0 leaves the stream as it was; bad values are
    refused by name."""
    plain, flawed = ShapeWorld(size=64, seed=6), ShapeWorld(size=64, seed=6, flaw_prob=0.5)
    many = [i for i in range(300) if len(plain.sample(i).objects) > 1]
    share = np.mean([bool(flawed.vqa_scene(i).flaws) for i in many])
    assert 0.4 < share < 0.6
    assert all(plain.vqa_scene(i) == plain.sample(i) for i in range(50))
    i = next(i for i in many if flawed.vqa_scene(i).flaws)
    assert flawed.vqa_item(i)["conversations"] == flawed.vqa_item(i)["conversations"]
    assert np.array_equal(flawed.vqa_item(i, as_numpy=True)["image"],
                          flawed.vqa_scene(i).render_array())
    assert np.array_equal(flawed.t2i_item(i, as_numpy=True)["image"], plain.sample(i).render_array())
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="flaw_prob must be a number in"):
            ShapeWorld(flaw_prob=bad)
    # one object drawn right beside a blob is not asked "What shape is in the image?"
    worded = ShapeWorld(size=64, seed=6, flaw_prob=1.0, paraphrase=True,
                        kind_weights={"pair": 1.0})
    asked = [h["value"] for i in range(40) for h in worded.conversation_for(i, turns=3)[0][::2]]
    assert not any("What shape is in the image?" in q or "What color is the object?" in q
                   for q in asked)


def test_parse_prompt_reads_the_caption_grammar():
    from harmon.data.shapeworld import parse_prompt

    assert parse_prompt("A red circle to the left of two squares.") == (
        [("circle", "red", 1), ("square", None, 2)], "to the left of")
    assert parse_prompt("a circle, a star and three crosses") == (
        [("circle", None, 1), ("star", None, 1), ("cross", None, 3)], None)
    for text in ("a photo of a cat", "four circles and three circles", "", None, 3):
        assert parse_prompt(text) is None, text


def test_complete_prompt_names_a_trained_colour_for_every_phrase_without_one():
    from harmon.data.shapeworld import HELDOUT_PAIRS, complete_prompt, parse_prompt, trained_colors

    first = lambda options: options[0]  # noqa: E731
    assert complete_prompt("three circles", first) == "three red circles"  # one colour a phrase
    # the colours a prompt names are not drawn again, and each phrase gets its own
    assert complete_prompt("a red circle and a square", first) == \
        "a red circle and an orange square"
    assert complete_prompt("a circle to the left of a square", first) == \
        "a red circle to the left of an orange square"
    # a held-out pair is never drawn: the first trained colour of a semicircle is orange
    assert ("red", "semicircle") in HELDOUT_PAIRS
    assert complete_prompt("a semicircle", first) == "an orange semicircle"
    assert trained_colors("circle") == [c for c in COLOR_NAMES if c != "purple"]
    seen = []
    complete_prompt("a red star, a blue star and two stars", lambda o: seen.append(o) or o[-1])
    assert seen == [[c for c in trained_colors("star") if c not in ("red", "blue")]]
    # every completion is a prompt of the grammar again, with every colour named
    rng = np.random.default_rng(0)
    for text in ("a circle", "two triangles and a star", "a cross below a blue diamond"):
        for _ in range(20):
            done = complete_prompt(text, lambda o: o[rng.integers(len(o))])
            objects, _ = parse_prompt(done)
            assert all(c is not None and (c, s) not in HELDOUT_PAIRS for s, c, _ in objects), done
    # texts outside the grammar, and prompts naming every colour, come back as they are
    for text in ("a photo of a cat", "A red circle.", "two blue squares above a red star", ""):
        assert complete_prompt(text, first) == text
    with pytest.raises(ValueError, match="not one of the options"):
        complete_prompt("a circle", lambda options: "pink")
