"""Whether a model's answers hang on one phrasing: accuracy on the evaluation questions in the
wording the training stream uses against every other wording of them
(:func:`harmon.data.shapeworld.question_wordings`: "How many circles can you see?", "Does the image
contain a red star?", ...), and on two open questions for single-object scenes that the plain
stream never asks ("What shape is in the image?", "What color is the object?").

A model trained with ``paraphrase`` has seen those other wordings; the ``unseen`` column asks in
wordings no training stream uses (:data:`UNSEEN_WORDINGS`, e.g. "What is the number of circles in
the image?"), and two more open questions, to tell learning a list of phrasings from reading
questions.

The scenes are those of ``harmon eval model`` (held-out evaluation scenes); answers are greedy and
scored as there (exact match; yes/no parsed for POPE).

    python benchmarks/question_wording.py                      # the shipped model
    python benchmarks/question_wording.py --checkpoint runs/shapeworld_model_stage4/final
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harmon import Harmon
from harmon.data.shapeworld import (QUESTION_WORDINGS, SHORT_ANSWER_PROMPT, SINGLE_OBJECT_QUESTIONS,
                                    question_wordings)
from harmon.eval.model_eval import answer_items
from harmon.eval.vqa import VQAItem, build_vqa_eval_set, evaluate_vqa

HERE = Path(__file__).resolve().parent
# (question, the object attribute that answers it): those paraphrase trains, and two it does not
OPEN_QUESTIONS = SINGLE_OBJECT_QUESTIONS
UNSEEN_OPEN_QUESTIONS = {"Which shape is shown in this picture?": "shape",
                         "What is the color of the shape?": "color"}

#: Wordings no training stream uses, in the form of QUESTION_WORDINGS.
UNSEEN_WORDINGS = (
    (r"Is there (.+) in the image\?", ("Is {0} visible in the image?", "Do you see {0} in this picture?")),
    (r"How many objects are there in the image\?",
     ("What is the number of objects in the image?", "How many things does this picture show?")),
    (r"How many (\w+) are there in the image\?",
     ("What is the number of {0} in the image?", "How many {0} does this picture show?")),
    (r"What color is the (\w+)\?", ("Tell me the color of the {0}.", "In what color is the {0} drawn?")),
    (r"What shape is the (\w+) object\?",
     ("Which shape does the {0} object have?", "Name the shape of the {0} object.")),
    (r"Is the (.+?) (to the left of|to the right of|above|below) the (.+)\?",
     ("Would you say the {0} is {1} the {2}?", "Does the {0} appear {1} the {2}?")),
)


def worded_sets(n_images: int, size: int, seed: int) -> dict[str, list[VQAItem]]:
    """``{"trained": the evaluation items, "other": each item once per other wording, "unseen":
    once per unseen wording, "open" / "unseen open": the open questions of the single-object
    scenes}``."""
    items = build_vqa_eval_set(n_images, size=size, seed=seed)

    def reworded(tag, table):
        return [VQAItem(f"{it.id}-{tag}{k}", it.scene, q, it.answer, it.qtype, it.split)
                for it in items for k, q in enumerate(question_wordings(it.question, table))]

    singles = {it.id.split("-")[0]: it.scene for it in items if len(it.scene.objects) == 1}

    def open_set(tag, questions):
        return [VQAItem(f"{sid}-{tag}-{attr}", scene, f"{q}\n{SHORT_ANSWER_PROMPT}",
                        getattr(scene.objects[0], attr), attr)
                for sid, scene in sorted(singles.items()) for q, attr in questions.items()]

    return {"trained": items, "other": reworded("w", QUESTION_WORDINGS),
            "unseen": reworded("u", UNSEEN_WORDINGS), "open": open_set("open", OPEN_QUESTIONS),
            "unseen open": open_set("uopen", UNSEEN_OPEN_QUESTIONS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--images", type=int, default=100, help="evaluation scenes")
    ap.add_argument("--seed", type=int, default=0, help="evaluation seed (as harmon eval model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=str(HERE / "results" / "question_wording.json"))
    args = ap.parse_args()
    model = Harmon.from_pretrained(args.checkpoint, device=args.device)
    sets = worded_sets(args.images, model.cfg.image_size, args.seed)
    scores = {name: evaluate_vqa(items, answer_items(model, items, batch_size=64, progress=False))
              for name, items in sets.items()}
    print(f"{model.name}: accuracy by wording, {args.images} evaluation scenes")
    print(f"{'type':>10}" + "".join(f"{name + (' wording' if 'open' not in name else ''):>22}"
                                     for name in sets))
    for t in scores["trained"]["per_type"]:
        cells = []
        for name in sets:
            r = scores[name]["per_type"].get(t)
            cells.append(f"{r['accuracy']:.3f} ({r['n']})" if r else "-")
        print(f"{t:>10}" + "".join(f"{c:>22}" for c in cells))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "model": model.name, "provenance": model.provenance, "images": args.images,
        "seed": args.seed,
        "per_type": {name: s["per_type"] for name, s in scores.items()}}, indent=1))


if __name__ == "__main__":
    main()
