"""Task arithmetic: theta_0 + lambda * sum_t w_t (theta_t - theta_0)."""

from __future__ import annotations

from mergekit_lite.methods.base import LAMBDA, WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, normalize_param
from mergekit_lite.methods.sparsify import merge_task_vectors, task_vectors


def merge_task_arithmetic(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    deltas, delta_sq = task_vectors(chunk)
    return merge_task_vectors(context, chunk, deltas, delta_sq, None, elect=False)


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="base plus the weighted sum of task vectors, scaled by lambda",
    merge_chunk=merge_task_arithmetic,
    params=(WEIGHT, LAMBDA, normalize_param(False)),
)
