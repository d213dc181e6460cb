"""Evaluation: the ShapeWorld judge (GenEval-style generation scores) and understanding metrics.

- :mod:`harmon.eval.judge`: detector and per-criterion checks (:func:`judge_image`, :func:`summarize`);
- :mod:`harmon.eval.prompts`: evaluation prompt sets, the held-out split, GenEval metadata and folders;
- :mod:`harmon.eval.vqa`: POPE metrics and exact match per question type;
- :mod:`harmon.eval.shapes_cli`: ``harmon eval shapes``.
"""

from .judge import (FAILURE_KINDS, Detection, ImageLoadError, JudgeResult, check_spec, detect,
                    first_failure, judge_detections, judge_image, load_image, summarize)
from .prompts import (eval_prompts, read_geneval_folder, read_metadata_jsonl, write_geneval_folder,
                      write_metadata_jsonl, write_reference_folder)
from .vqa import build_vqa_eval_set, evaluate_vqa, exact_match, normalize_answer, parse_yes_no, pope_metrics

__all__ = [
    "FAILURE_KINDS", "Detection", "ImageLoadError", "JudgeResult", "build_vqa_eval_set", "check_spec",
    "detect", "eval_prompts", "first_failure", "judge_detections",
    "evaluate_vqa", "exact_match", "judge_image", "load_image", "normalize_answer", "parse_yes_no",
    "pope_metrics", "read_geneval_folder", "read_metadata_jsonl", "summarize", "write_geneval_folder",
    "write_metadata_jsonl", "write_reference_folder",
]
