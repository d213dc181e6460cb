"""What a trained model's answers depend on: the loss of the first answer token by question type,
with the right image and with another scene's, and where the LLM looks when it answers.

Questions are those of the training stream (ShapeWorld, seed 999: scenes the model did not train
on), in the training prompt format, teacher-forced. A type whose loss is the same with either
image is answered from the question alone; a yes/no type at ln 2 = 0.693 is at chance. The
attention table gives, per LLM layer (mean over heads), the share of the answer position's
attention on the image, on the question's words and on the rest (the short-answer instruction
and chat tokens).

    python benchmarks/understanding_use.py                     # the shipped model
    python benchmarks/understanding_use.py --checkpoint runs/shapeworld_model_stage4/final
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from harmon import Harmon
from harmon.data.shapeworld import SHORT_ANSWER_PROMPT, ShapeWorld
from harmon.models.llm import run_body
from harmon.tokenizer import IM_END, IM_START
from harmon.train.data import IMAGE_TOKEN_ID, chat_ids, _turns, pad_square
from harmon.understand import image_embeddings

HERE = Path(__file__).resolve().parent


def questions(model: Harmon, n: int):
    """Per scene: the VQA item, ids (1, L), labels (L,), the index of the position that predicts
    the first answer token, and the pixels (1, 3, S, S) in the training transform."""
    world = ShapeWorld(size=model.cfg.image_size, seed=999)
    h, w = model.model.grid_for(model.cfg.image_size)
    n_img = h * w + model.model.num_buffers  # image placeholders: tokens + buffers
    for i in range(n):
        item = world.vqa_item(i, turns=1)
        ids, labels = chat_ids(model.tokenizer, _turns(item["conversations"]), n_img)
        first = next(j for j, lab in enumerate(labels) if lab >= 0) - 1
        px = pad_square(item["image"], model.cfg.image_size)[None].to(model.device)
        yield item, torch.tensor([ids], device=model.device), torch.tensor(labels), first, px


@torch.no_grad()
def answer_loss(model: Harmon, n: int) -> dict[str, dict[str, float]]:
    """{type: {"right", "other", "n"}}: mean first-answer-token loss with the scene's image and
    with the previous scene's."""
    m = model.model
    sums: dict[str, dict[str, float]] = defaultdict(lambda: {"right": 0.0, "other": 0.0, "n": 0})
    prev = None
    for item, ids, labels, first, px in questions(model, n):
        qtype = item["qtypes"][0]
        img = image_embeddings(m, px)
        if prev is not None:
            for key, im in (("right", img), ("other", prev)):
                emb = m.splice_images(ids, im, IMAGE_TOKEN_ID)
                logits = m.logits(run_body(m.llm, emb, torch.ones_like(ids))[0, first])
                target = labels[first + 1:first + 2].to(logits.device)
                sums[qtype][key] += float(F.cross_entropy(logits[None].float(), target))
            sums[qtype]["n"] += 1
        prev = img
    return {t: {"right": s["right"] / s["n"], "other": s["other"] / s["n"], "n": s["n"]}
            for t, s in sorted(sums.items())}


@torch.no_grad()
def attention_shares(model: Harmon, n: int) -> dict[str, list[list[float]]]:
    """{type: per layer [image, question, rest]} shares of the answer position's attention."""
    m = model.model
    impl = m.llm.config._attn_implementation
    m.llm.config._attn_implementation = "eager"  # sdpa does not return the weights
    # the tokens between the question's words and the answer, as chat_ids writes them (caption
    # questions carry no short-answer instruction)
    chat_end = f"{IM_END}\n{IM_START}assistant\n"
    tails = {True: len(model.tokenizer.encode(f"\n{SHORT_ANSWER_PROMPT}{chat_end}")),
             False: len(model.tokenizer.encode(chat_end))}
    acc: dict[str, torch.Tensor] = {}
    cnt: dict[str, int] = defaultdict(int)
    try:
        for item, ids, _labels, first, px in questions(model, n):
            qtype = item["qtypes"][0]
            emb = m.splice_images(ids, image_embeddings(m, px), IMAGE_TOKEN_ID)
            out = m.llm.model(inputs_embeds=emb, attention_mask=torch.ones_like(ids),
                              output_attentions=True)
            is_img = (ids[0, :first + 1] == IMAGE_TOKEN_ID).cpu()
            tail = tails[SHORT_ANSWER_PROMPT in item["conversations"][0]["value"]]
            q0, q1 = int(is_img.nonzero()[-1]) + 1, first + 1 - tail
            shares = []
            for att in out.attentions:
                row = att[0, :, first, :first + 1].float().mean(0).cpu()  # over heads
                img = float(row[is_img].sum())
                ques = float(row[q0:q1].sum())
                shares.append([img, ques, 1.0 - img - ques])
            acc[qtype] = acc.get(qtype, 0) + torch.tensor(shares)
            cnt[qtype] += 1
    finally:
        m.llm.config._attn_implementation = impl
    return {t: (acc[t] / cnt[t]).tolist() for t in sorted(acc)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(HERE / "results" / "understanding_use.json"))
    args = ap.parse_args()
    model = Harmon.from_pretrained(args.checkpoint, device=args.device)
    loss = answer_loss(model, args.questions)
    print(f"{model.name}: first-answer-token loss, {args.questions} training-style questions")
    print(f"{'type':>10} {'n':>4} {'right image':>12} {'other image':>12}")
    for t, r in loss.items():
        print(f"{t:>10} {r['n']:>4} {r['right']:>12.3f} {r['other']:>12.3f}")
    att = attention_shares(model, min(args.questions, 60))
    print("answer position's attention per layer: image / question / rest")
    for t, layers in att.items():
        print(f"{t:>10} " + "  ".join("/".join(f"{v:.2f}" for v in la) for la in layers))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": model.name, "provenance": model.provenance,
                                           "questions": args.questions, "answer_loss": loss,
                                           "attention": att}, indent=1))


if __name__ == "__main__":
    main()
