"""Model breadcrumbs: drop each task vector's largest `gamma` outliers and its smallest entries, then add."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    LAMBDA, WEIGHT, Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext, density_param, normalize_param,
)
from mergekit_lite.methods.sparsify import (
    delta_magnitudes, trim_each, keep_count, merge_task_vectors, streamed_kth_largest, task_vectors,
)

GAMMA = ParamSpec("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers", minimum=0.0, maximum=1.0)


def outlier_bounds(context: TensorContext, stream: ChunkStream) -> list[tuple[float, float]]:
    """Per expert, keep magnitudes in [low, high): the (top+keep)-th largest up to, not including, the top-th."""
    n = context.numel
    ranks = []
    for density, gamma in zip(context.per_model("density"), context.per_model("gamma")):
        keep = keep_count(density, n)
        top = min(int(gamma * n), n - keep)
        ranks.append([k for k in (top + keep, top) if k >= 1])
    found = streamed_kth_largest(lambda stride: (delta_magnitudes(c, stride) for c in stream()), n, ranks)
    bounds = []
    for rank, thresholds in zip(ranks, found):
        low = thresholds[0] if rank else float("inf")
        high = thresholds[1] if len(rank) > 1 else float("inf")
        bounds.append((low, high))
    return bounds


def merge_breadcrumbs(context: TensorContext, chunk: Chunk, bounds: list[tuple[float, float]]) -> ChunkResult:
    deltas, delta_sq = task_vectors(chunk)
    trimmed, kept = trim_each(deltas, bounds)
    return merge_task_vectors(context, chunk, trimmed, delta_sq, kept, elect=False)


METHOD = MergeMethod(
    name="breadcrumbs",
    summary="drop the largest gamma and the smallest entries of each task vector, keep density, then task arithmetic",
    merge_chunk=merge_breadcrumbs,
    prepare=outlier_bounds,
    params=(WEIGHT, density_param(0.9, "fraction of entries kept"), GAMMA, LAMBDA, normalize_param(False)),
)
