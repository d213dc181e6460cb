"""harmon.train.data: prompt formats, determinism, mixing, disk formats, bad items."""

from __future__ import annotations

import io
import json
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.tokenizer import UNCONDITIONAL_PROMPT, byte_level_tokenizer, chat
from harmon.train.config import DataConfig, build
from harmon.train.data import (IGNORE_INDEX, IMAGE_TOKEN_ID, MicroBatches, RankSampler, Schedule,
                               crop_square, pad_square)

TOK = byte_level_tokenizer()


def data_cfg(sources, ratio=(1, 1, 1), size=64, micro=3, **kw) -> DataConfig:
    return build(DataConfig, {"sources": sources, "ratio": list(ratio), "image_size": size,
                              "micro_batch": {"text": micro, "i2t": micro, "t2i": micro}, **kw})


SW = [{"kind": "shapeworld", "task": t} for t in ("text", "i2t", "t2i")]


def decode(ids) -> str:
    return TOK.decode([i for i in ids if i >= 0], skip_special_tokens=False)


def test_shapeworld_micro_batches_have_the_reference_formats():
    ds = MicroBatches(data_cfg(SW, max_prompt_tokens=400), TOK, seed=0)
    text, i2t, t2i = ds[0], ds[1], ds[2]
    assert [text["task"], i2t["task"], t2i["task"]] == ["text", "i2t", "t2i"]
    # t2i: chat("Generate an image: ...") right-padded with <|im_end|>, boolean-style mask
    assert t2i["pixel_values"].shape == (3, 3, 64, 64)
    assert -1.0 <= float(t2i["pixel_values"].min()) and float(t2i["pixel_values"].max()) <= 1.0
    for ids, mask in zip(t2i["input_ids"], t2i["attention_mask"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == TOK.pad_id).all()
        s = decode(ids[:n].tolist())
        assert s.startswith("<|im_start|>user\nGenerate an image") and s.endswith(
            "<|im_end|>\n<|im_start|>assistant\n")
    # i2t: N + 64 placeholders, labels exactly on the answer and its <|im_end|>
    n_img = (64 // 16) ** 2 + 64
    for ids, labels, mask in zip(i2t["input_ids"], i2t["labels"], i2t["attention_mask"]):
        ids, labels = ids.tolist(), labels.tolist()
        assert ids.count(IMAGE_TOKEN_ID) == n_img
        first = ids.index(IMAGE_TOKEN_ID)
        assert decode(ids[:first]) == "<|im_start|>user\n"
        sup = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
        assert sup == list(range(sup[0], sup[-1] + 1))  # one contiguous answer (one turn)
        assert decode(ids[: sup[0]]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert decode([ids[sup[-1]]]) == "<|im_end|>" and decode([ids[sup[-1] + 1]]) == "\n"
        assert all(labels[i] == ids[i] for i in sup)
    # text: the rewriting conversation, supervised on the assistant turn only
    s = decode(text["input_ids"][0].tolist())
    assert s.startswith("<|im_start|>user\nRewrite this scene description")
    assert decode([x for x in text["labels"][0].tolist() if x >= 0]).endswith("<|im_end|>")


def test_micro_batches_are_a_pure_function_of_G():
    a = MicroBatches(data_cfg(SW), TOK, seed=3)
    b = MicroBatches(data_cfg(SW), TOK, seed=3)
    for G in (5, 2, 9, 2):
        x, y = a[G], b[G]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
    # ShapeWorld scenes come from the world's own seed (the source's), in index order
    other = [dict(s, seed=1) for s in SW]
    c = MicroBatches(data_cfg(other), TOK, seed=3)
    assert not torch.equal(a[2]["pixel_values"], c[2]["pixel_values"])


def test_schedule_ratio_and_samples():
    s = Schedule([1, 3, 8], {"text": 2, "i2t": 4, "t2i": 8})
    tasks = [s.task(G) for G in range(24)]
    assert tasks[:12] == ["text"] + ["i2t"] * 3 + ["t2i"] * 8 and tasks[12:] == tasks[:12]
    # every task's samples are consecutive and never repeat
    seen = {"text": [], "i2t": [], "t2i": []}
    for G in range(36):
        t, idx = s.samples(G)
        seen[t] += list(idx)
    for t, idx in seen.items():
        assert idx == list(range(len(idx)))
    assert s.tasks_seen(12) == {"text": 2, "i2t": 12, "t2i": 64}


def test_rank_sampler_covers_one_process_run():
    W, A, steps = 2, 3, 4
    one = list(RankSampler(10, steps, 0, 1, W * A))
    many = [list(RankSampler(10, steps, r, W, A)) for r in range(W)]
    per_step = [sum((many[r][s * A:(s + 1) * A] for r in range(W)), []) for s in range(steps)]
    assert sum(per_step, []) == one == list(range(10, 10 + W * A * steps))


def test_caption_dropout_rate_and_prompt_cut():
    cfg = data_cfg([SW[2]], ratio=(0, 0, 1), micro=50, max_prompt_tokens=40)
    ds = MicroBatches(cfg, TOK, seed=0)
    uncond = TOK.encode(chat(UNCONDITIONAL_PROMPT))
    dropped = total = 0
    for G in range(8):
        b = ds[G]
        assert b["input_ids"].shape[1] <= 40
        for ids, m in zip(b["input_ids"], b["attention_mask"]):
            total += 1
            dropped += ids[: int(m.sum())].tolist() == uncond
    assert total == 400 and 0.06 < dropped / total < 0.14  # 10% +- 4 standard deviations


def test_transforms_crop_and_gray_pad():
    im = Image.new("RGB", (120, 60), (255, 0, 0))
    x = pad_square(im, 32)
    assert x.shape == (3, 32, 32)
    gray = 2 * 127 / 255 - 1
    assert torch.allclose(x[:, 0, 16], torch.tensor([gray] * 3), atol=1e-6)  # top band: padding
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)
    y = crop_square(im, 32, np.random.default_rng(0))
    assert y.shape == (3, 32, 32) and torch.allclose(y, torch.tensor([1.0, -1.0, -1.0])[:, None, None]
                                                     .expand(3, 32, 32), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# disk data


def _png(path, color=(0, 200, 0), size=(96, 96)):
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def disk_data(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    for i in range(6):
        _png(img / f"{i}.png", (40 * i, 100, 200))
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _png(img / "tiny.png", size=(40, 40))  # shorter side < 80: rejected for i2t
    lines = [{"image": f"{i}.png", "caption": f"caption {i}"} for i in range(6)]
    lines += [{"image": "missing.png", "caption": "gone"}, {"image": "corrupt.png", "caption": "bad"},
              {"image": "tiny.png", "caption": "small"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                          + "this line is not json\n")
    llava = [{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is {i}?"}, {"from": "gpt", "value": f"It is {i}."},
        {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing."}]} for i in range(4)]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (100, 80), (10, 20 * i, 30)).save(buf, format="JPEG")
            for name, data in ((f"s{i}.jpg", buf.getvalue()), (f"s{i}.txt", f"tar caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "plain text"}) + "\n" + json.dumps(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
    return tmp_path


def test_disk_sources_with_bad_items_are_skipped_and_counted(disk_data):
    srcs = [{"kind": "jsonl", "task": "t2i", "path": str(disk_data / "pairs.jsonl"),
             "image_root": str(disk_data / "images")},
            {"kind": "jsonl", "task": "i2t", "path": str(disk_data / "pairs.jsonl"),
             "image_root": str(disk_data / "images")},
            {"kind": "text", "task": "text", "path": str(disk_data / "text.jsonl")}]
    ds = MicroBatches(data_cfg(srcs, micro=4), TOK, seed=0)
    skipped = {"t2i": 0, "i2t": 0}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for G in range(30):  # ~13 passes over the 10 lines of each stream
            b = ds[G]
            if b["task"] in skipped:
                skipped[b["task"]] += b["skipped"]
                assert b["pixel_values"].shape == (4, 3, 64, 64)
    # t2i: missing, corrupt and non-JSON lines (3 of 10); i2t also rejects the 40 px image (4 of 10)
    assert 0.15 < skipped["t2i"] / 40 < 0.6 and skipped["i2t"] > skipped["t2i"] * 0.9
    msgs = " ".join(str(x.message) for x in w)
    assert "skipping" in msgs and ("does not exist" in msgs or "unreadable" in msgs)
    b = ds[1]
    labels = [x for x in b["labels"][0].tolist() if x >= 0]
    assert decode(labels).startswith("caption ") and decode(labels).endswith("<|im_end|>")


def test_llava_multi_turn_and_webdataset(disk_data):
    srcs = [{"kind": "llava", "task": "i2t", "path": str(disk_data / "llava.json"),
             "image_root": str(disk_data / "images")},
            {"kind": "webdataset", "task": "t2i", "path": str(disk_data / "*.tar")}]
    ds = MicroBatches(data_cfg(srcs, ratio=(0, 1, 1), micro=2), TOK, seed=0)
    i2t = ds[0]
    ids, labels = i2t["input_ids"][0].tolist(), i2t["labels"][0].tolist()
    sup = decode([x for x in labels if x >= 0])
    assert sup.startswith("It is ") and sup.endswith(".<|im_end|>Nothing.<|im_end|>")
    assert ids.count(IMAGE_TOKEN_ID) == 16 + 64
    assert "<|im_start|>user\nAnd then?<|im_end|>" in decode(ids)
    t2i = ds[1]
    assert t2i["pixel_values"].shape == (2, 3, 64, 64) and t2i["skipped"] == 0
    assert "tar caption" in decode(t2i["input_ids"][0].tolist()) or \
        decode(t2i["input_ids"][0].tolist()).count("Generate an image.") == 1


def test_missing_data_path_is_an_error(tmp_path):
    srcs = [{"kind": "jsonl", "task": "t2i", "path": str(tmp_path / "nope.jsonl")}]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        MicroBatches(data_cfg(srcs, ratio=(0, 0, 1)), TOK, seed=0)
    with pytest.raises(FileNotFoundError, match="no .tar"):
        MicroBatches(data_cfg([{"kind": "webdataset", "task": "t2i", "path": str(tmp_path)}],
                              ratio=(0, 0, 1)), TOK, seed=0)


def test_a_source_that_is_all_bad_fails_clearly(tmp_path):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"image": f"x{i}.png", "caption": "c"})
                                                + "\n" for i in range(3)))
    ds = MicroBatches(data_cfg([{"kind": "jsonl", "task": "t2i", "path": str(tmp_path / "bad.jsonl")}],
                               ratio=(0, 0, 1)), TOK, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="consecutive t2i data items are unusable"):
            ds[0]


def test_streams_visit_every_item_once_per_epoch():
    from harmon.train.data import Stream, shuffled_index

    for n in (1, 2, 7, 100, 1001):
        assert sorted(shuffled_index(i, n, 3) for i in range(n)) == list(range(n))

    class Items:
        def num_items(self):
            return 37

    s = Stream(Items(), seed=5)
    e0 = [s.index(j) for j in range(37)]
    e1 = [s.index(j) for j in range(37, 74)]
    assert sorted(e0) == sorted(e1) == list(range(37)) and e0 != e1
