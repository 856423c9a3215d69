"""Breadcrumbs-TIES: breadcrumbs' band of kept magnitudes (drop the top `gamma` and the smallest), then the TIES
sign election over what is left."""

from __future__ import annotations

from mergekit_lite.methods.base import (LAMBDA, WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, density_param,
                                        normalize_param)
from mergekit_lite.methods.breadcrumbs import GAMMA, outlier_bounds
from mergekit_lite.methods.sparsify import merge_task_vectors, task_vectors, trim_each


def merge_breadcrumbs_ties(context: TensorContext, chunk: Chunk, bounds: list[tuple[float, float]]) -> ChunkResult:
    deltas, delta_sq = task_vectors(chunk)
    trimmed, kept = trim_each(deltas, bounds)
    return merge_task_vectors(context, chunk, trimmed, delta_sq, kept, elect=True)

METHOD = MergeMethod(
    name="breadcrumbs_ties",
    summary="drop the largest gamma and the smallest entries of each task vector, keep density, then TIES election",
    merge_chunk=merge_breadcrumbs_ties,
    prepare=outlier_bounds,
    params=(WEIGHT, density_param(0.9, "fraction of entries kept"), GAMMA, LAMBDA, normalize_param(False)),
)
