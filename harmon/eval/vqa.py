"""Understanding metrics on ShapeWorld: POPE and exact match per question type.

- :func:`pope_metrics`: accuracy, precision, recall, F1 and yes-ratio of yes/no answers, "yes" being the
  positive class, with POPE's answer parsing (:func:`parse_yes_no`).
- :func:`exact_match`: normalised string equality (case, punctuation, articles, number words,
  "grey"/"gray", "to the left of"/"left of"...).
- :func:`build_vqa_eval_set` / :func:`evaluate_vqa`: a fixed question set on scenes of a seed stream
  the training stream does not use, and its scores per question type and per POPE split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from harmon.data.shapes import NUMBER_WORDS
from harmon.data.shapeworld import QA, Scene, ShapeWorld

#: Offset added to the seed of evaluation worlds, so their scenes are not those of a training world
#: with a small seed.
EVAL_SEED_OFFSET = 1_000_003

_ARTICLES = {"a", "an", "the"}
_DIGITS = {str(k): v for k, v in NUMBER_WORDS.items()}
_SYNONYMS = {"grey": "gray", "centre": "center", "violet": "purple", "magenta": "purple", "plus": "cross",
             "rhombus": "diamond"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, digits as words, a few synonyms, single spaces.

    "The answer is: 3." keeps its words ("answer is three"); exact match wants bare answers, as the
    short-answer prompt asks for.
    """
    t = _PUNCT.sub(" ", str(text).lower())
    words = []
    for w in t.split():
        w = _DIGITS.get(w, w)
        w = _SYNONYMS.get(w, w)
        if w and w not in _ARTICLES:
            words.append(w)
    out = " ".join(words).replace("half circle", "semicircle")
    # Relation answers: "to the left of" and "left" mean "left of".
    out = re.sub(r"^to (left|right) of$", r"\1 of", out)
    out = re.sub(r"^(left|right)$", r"\1 of", out)
    return out


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the normalised prediction equals the normalised answer."""
    return normalize_answer(prediction) == normalize_answer(answer)


def parse_yes_no(text: str) -> str:
    """POPE's parsing: 'no' if the first sentence holds 'no' or 'not' (or starts with "n't"), else 'yes'."""
    first = str(text).strip().split(".")[0].lower()
    words = re.findall(r"[a-z']+", first)
    if any(w in ("no", "not") or w.endswith("n't") for w in words):
        return "no"
    return "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE scores with "yes" as the positive class.

    Args:
        predictions: model answers (free text, parsed by :func:`parse_yes_no`).
        labels: ground truth, "yes" or "no" each.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}``; precision (recall) is 0 when no
        "yes" is predicted (labelled).
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for p, y in zip(predictions, labels):
        y = str(y).strip().lower()
        if y not in ("yes", "no"):
            raise ValueError(f"POPE label {y!r} is not 'yes' or 'no'")
        pred = parse_yes_no(p)
        if pred == "yes":
            tp, fp = (tp + 1, fp) if y == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if y == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n}


@dataclass(frozen=True)
class VQAItem:
    """One evaluation question on one scene (render the image with ``scene.render()``)."""

    id: str
    scene: Scene
    question: str
    answer: str
    qtype: str
    split: str | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The question as the first human turn of a LLaVA conversation (no answer)."""
        return [{"from": "human", "value": "<image>\n" + self.question}]


def build_vqa_eval_set(n_images: int = 100, size: int = 128, seed: int = 0,
                       qtypes: Iterable[str] | None = None) -> list[VQAItem]:
    """Every question of ``n_images`` evaluation scenes.

    The scenes come from ``ShapeWorld(size, seed + EVAL_SEED_OFFSET)``, so they differ from those of a
    training world; POPE questions are balanced (one yes and one no per split and image).

    Args:
        qtypes: keep only these question types (default all but 'caption').
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    keep = set(qtypes) if qtypes is not None else {"pope", "count", "color", "shape", "position"}
    world = ShapeWorld(size=size, seed=seed + EVAL_SEED_OFFSET)
    items: list[VQAItem] = []
    for i in range(n_images):
        scene = world.sample(i)
        for k, q in enumerate(scene.questions()):
            if q.qtype in keep:
                items.append(VQAItem(f"{i:06d}-{k:02d}", scene, q.question, q.answer, q.qtype, q.split))
    return items


def evaluate_vqa(items: Sequence[VQAItem | QA | Mapping[str, Any]],
                 predictions: Sequence[str]) -> dict[str, Any]:
    """Score answers to a question set.

    Args:
        items: questions with ``answer``, ``qtype`` and, for POPE, ``split`` (VQAItem, QA or dicts).
        predictions: one answer per item, in order.

    Returns:
        ``{"per_type": {qtype: {"accuracy", "correct", "n"}}, "pope": {split: pope_metrics, "all": ...},
        "overall": mean accuracy over question types}``. POPE questions count in ``per_type["pope"]``
        by parsed yes/no.
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} questions")
    per: dict[str, list[bool]] = {}
    pope: dict[str, tuple[list[str], list[str]]] = {}
    for it, pred in zip(items, predictions):
        get = it.get if isinstance(it, Mapping) else (lambda k, d=None, _it=it: getattr(_it, k, d))
        qtype, answer, split = get("qtype"), get("answer"), get("split")
        if qtype is None or answer is None:
            raise ValueError(f"question {it!r} lacks a qtype or an answer")
        if qtype == "pope":
            for key in (split or "unknown", "all"):
                pope.setdefault(key, ([], []))
                pope[key][0].append(pred)
                pope[key][1].append(answer)
            ok = parse_yes_no(pred) == str(answer).lower()
        else:
            ok = exact_match(pred, answer)
        per.setdefault(qtype, []).append(ok)
    per_type = {k: {"accuracy": sum(v) / len(v), "correct": sum(v), "n": len(v)} for k, v in per.items()}
    return {"per_type": per_type,
            "pope": {k: pope_metrics(p, y) for k, (p, y) in pope.items()},
            "overall": sum(v["accuracy"] for v in per_type.values()) / len(per_type) if per_type else 0.0}
