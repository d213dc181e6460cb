"""Accelerated, output-preserving sampling paths (tested against the reference ones)."""

from .head import FastHeadSampler

__all__ = ["FastHeadSampler"]
