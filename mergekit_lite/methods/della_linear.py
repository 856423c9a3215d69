"""DELLA-linear: DELLA's magnitude-ranked random drop with rescaling, then task arithmetic (no sign election)."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    LAMBDA, WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, density_param, normalize_param, rescale_param,
)
from mergekit_lite.methods.dare_linear import SEED
from mergekit_lite.methods.della import EPSILON, della_drop
from mergekit_lite.methods.sparsify import merge_task_vectors


def merge_della_linear(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    deltas, delta_sq, kept = della_drop(context, chunk)
    return merge_task_vectors(context, chunk, deltas, delta_sq, kept, elect=False)


METHOD = MergeMethod(
    name="della_linear",
    summary="magnitude-ranked random drop (DELLA), rescaled by the keep probability, then task arithmetic",
    merge_chunk=merge_della_linear,
    params=(WEIGHT, density_param(0.5, "mean keep probability"), EPSILON, LAMBDA, normalize_param(False),
            rescale_param(True), SEED),
    random=True,
)
