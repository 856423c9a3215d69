"""TIES-Merging: trim each task vector to its largest entries, elect a sign per entry, average the agreeing.

`trim_scope: tensor` (default, as LLM merge tools do) trims each tensor to its own top `density`;
`trim_scope: model` (as the paper does) trims each expert's whole flattened task vector to one global
threshold, found by a first streamed pass over the model that never holds it in memory.
"""

from __future__ import annotations

from typing import Callable, Iterator

from mergekit_lite import kernels
from mergekit_lite.errors import UserError
from mergekit_lite.methods.base import (
    INT8_MASK, LAMBDA, WEIGHT, Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext, density_param,
    normalize_param,
)
from mergekit_lite.methods.sparsify import (
    delta_magnitudes, trim_each, keep_count, merge_task_vectors, streamed_kth_largest, task_vectors,
)

TRIM_SCOPE = ParamSpec(
    "trim_scope", str, "tensor", "trim per tensor, or per expert over the whole model (the paper)", scope="global",
    choices=("tensor", "model"),
)


def _thresholds(densities: list[float], n: int, stream: Callable[[int], Iterator[list]]) -> list[float]:
    """Per expert, the magnitude at or above which floor(density*n) entries lie (0: keep all, inf: none)."""
    ranks = [[keep_count(d, n)] if 0 < keep_count(d, n) and d < 1 else [] for d in densities]
    found = streamed_kth_largest(stream, n, ranks) if any(ranks) else [[] for _ in densities]
    return [row[0] if row else (0.0 if d >= 1 else float("inf")) for row, d in zip(found, densities)]


def tensor_thresholds(context: TensorContext, stream: ChunkStream) -> list[float]:
    if context.model_state is not None:
        return context.model_state
    magnitudes = lambda stride: (delta_magnitudes(c, stride) for c in stream())  # noqa: E731
    return _thresholds(context.per_model("density"), context.numel, magnitudes)


def model_thresholds(tensors: Callable[[], Iterator[tuple[TensorContext, ChunkStream]]]) -> list[float]:
    """Each expert's exact magnitude threshold over the whole model (trim_scope: model)."""
    densities, total = None, 0
    for context, _stream in tensors():
        if densities is None:
            densities = context.per_model("density")
        if context.per_model("density") != densities:
            raise UserError("trim_scope: model needs one density per model, not per-tensor filters or gradients")
        total += context.numel
    if densities is None:
        return []

    def stream(stride: int) -> Iterator[list]:
        for _context, chunks in tensors():
            for chunk in chunks():
                yield delta_magnitudes(chunk, stride)

    return _thresholds(densities, total, stream)


def merge_ties(context: TensorContext, chunk: Chunk, thresholds: list[float]) -> ChunkResult:
    if kernels.usable(chunk.base, *chunk.experts):
        return _merge_ties_fused(context, chunk, thresholds)
    deltas, delta_sq = task_vectors(chunk)
    trimmed, kept = trim_each(deltas, [(threshold, float("inf")) for threshold in thresholds])
    return merge_task_vectors(context, chunk, trimmed, delta_sq, kept, elect=True)


def _merge_ties_fused(context: TensorContext, chunk: Chunk, thresholds: list[float]) -> ChunkResult:
    """The same computation as the torch path, bit for bit, in two passes of a C kernel."""
    merged, stats = kernels.ties_merge(
        chunk.base.reshape(-1), [expert.reshape(-1) for expert in chunk.experts], chunk.delta_sq is not None,
        thresholds, context.per_model("weight"), context.params["normalize"], context.params["lambda"],
    )
    delta_sq = chunk.delta_sq if chunk.delta_sq is not None else stats["delta_sq"]
    return ChunkResult(merged.view(chunk.base.shape), kept=stats["kept"], any_kept=stats["any_kept"],
                       disagreed=stats["disagreed"], delta_sq=delta_sq, result_delta_sq=stats["change_sq"],
                       result_sq=stats["result_sq"])


METHOD = MergeMethod(
    name="ties",
    summary="trim task vectors to the top density by magnitude, elect signs, average the agreeing entries",
    merge_chunk=merge_ties,
    prepare=tensor_thresholds,
    params=(WEIGHT, density_param(0.2, "fraction of each task vector kept, by magnitude"), LAMBDA, normalize_param(True),
            TRIM_SCOPE, INT8_MASK),
    prepare_model=model_thresholds,
    needs_model_pass=lambda params: params.get("trim_scope") == "model",
)
