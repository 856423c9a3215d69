"""Task arithmetic: theta_0 + lambda * sum_t w_t (theta_t - theta_0)."""

from __future__ import annotations

from mergekit_lite import kernels
from mergekit_lite.methods.base import LAMBDA, WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, normalize_param
from mergekit_lite.methods.dare_linear import fused_dare
from mergekit_lite.methods.sparsify import merge_task_vectors, task_vectors


def merge_task_arithmetic(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    """On the CPU in one pass of DARE's kernel keeping every entry, which is task arithmetic with these bits, on
    float32 chunks or bfloat16 ones as stored."""
    if chunk.delta_sq is None and kernels.usable_stored(chunk.base, *chunk.experts):
        count = len(chunk.experts)
        return fused_dare(context, chunk, [0] * count, [1.0] * count, False, elect=False, drops=False)
    deltas, delta_sq = task_vectors(chunk)
    return merge_task_vectors(context, chunk, deltas, delta_sq, None, elect=False)


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="base plus the weighted sum of task vectors, scaled by lambda",
    merge_chunk=merge_task_arithmetic,
    params=(WEIGHT, LAMBDA, normalize_param(False)),
    reads_stored=True,
)
