"""The registry of tensor-wise merge methods: one module each, registered by name. (PLeaS and Twin-Merging run
models and are pipelines of their own: `pleas/pipeline.py`, `twin/pipeline.py`.)"""

from __future__ import annotations

from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import (arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della,
                                   della_linear, karcher, linear, model_stock, multislerp, nearswap, nuslerp,
                                   passthrough, ram, ramplus_tl, sce, slerp, task_arithmetic, ties)
from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, MergeOutput, ParamSpec, TensorContext

METHODS: dict[str, MergeMethod] = {
    module.METHOD.name: module.METHOD
    for module in (linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, breadcrumbs, della, model_stock,
                   passthrough, nuslerp, multislerp, karcher, sce, ram, ramplus_tl, nearswap, arcee_fusion,
                   della_linear, breadcrumbs_ties)
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Chunk", "ChunkResult", "MergeMethod", "MergeOutput", "ParamSpec", "TensorContext", "get_method"]
