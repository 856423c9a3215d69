"""The registry of merge methods: one module each, registered by name (tensor-wise ones, and the model-aware
pleas and twin, which run their own merge)."""

from __future__ import annotations

from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import (
    breadcrumbs, dare_linear, dare_ties, della, linear, model_stock, pleas, slerp, task_arithmetic, ties, twin,
)
from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, MergeOutput, ParamSpec, TensorContext

METHODS: dict[str, MergeMethod] = {
    module.METHOD.name: module.METHOD
    for module in (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, breadcrumbs, della, model_stock, pleas,
                   twin)
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Chunk", "ChunkResult", "MergeMethod", "MergeOutput", "ParamSpec", "TensorContext", "get_method"]
