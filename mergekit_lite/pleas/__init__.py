"""PLeaS (permutations and least squares): merge two models of one architecture from any initialisation,
to a chosen width. See method.py for the algorithm."""

from __future__ import annotations

from mergekit_lite.models.loading import load_model
from mergekit_lite.pleas.method import PleasOptions, PleasResult, pleas_merge

__all__ = ["PleasOptions", "PleasResult", "load_model", "pleas_merge"]
