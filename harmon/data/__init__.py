"""Data: ShapeWorld, the project's procedural text-image world (see :mod:`harmon.data.shapeworld`)."""

from .shapes import (BACKGROUNDS, COLOR_NAMES, COLORS, MAX_OBJECTS, RELATIONS, SHAPE_NAMES, SHAPES, degrade,
                     gaussian_blur, relative_position)
from .shapeworld import (GENEVAL_TAGS, HELDOUT_PAIRS, QA, ObjectReq, PromptSpec, Scene, ShapeObject,
                         ShapeWorld, ShapeWorldT2I, ShapeWorldVQA)

__all__ = [
    "BACKGROUNDS", "COLORS", "COLOR_NAMES", "GENEVAL_TAGS", "HELDOUT_PAIRS", "MAX_OBJECTS", "ObjectReq",
    "PromptSpec", "QA", "RELATIONS", "SHAPES", "SHAPE_NAMES", "Scene", "ShapeObject", "ShapeWorld",
    "ShapeWorldT2I", "ShapeWorldVQA", "degrade", "gaussian_blur", "relative_position",
]
