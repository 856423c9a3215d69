"""TIES-Merging: trim each task vector to its largest entries, elect a sign per entry, average the agreeing.

`trim_scope: tensor` (default, as LLM merge tools do) trims each tensor to its own top `density`;
`trim_scope: model` (as the paper does) trims each expert's whole flattened task vector to one global
threshold, found by a first streamed pass over the model that never holds it in memory.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from mergekit_lite import kernels
from mergekit_lite.errors import UserError
from mergekit_lite.methods.base import (
    INT8_MASK, LAMBDA, WEIGHT, Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, SplitModelPass, TensorContext,
    density_param, normalize_param,
)
from mergekit_lite.methods.sparsify import (
    bucket_of_kth_largest, delta_magnitudes, high_histogram, keep_count, low_histogram, merge_task_vectors,
    radix_value, streamed_kth_largest, task_vectors, trim_each,
)

TRIM_SCOPE = ParamSpec(
    "trim_scope", str, "tensor", "trim per tensor, or per expert over the whole model (the paper)", scope="global",
    choices=("tensor", "model"),
)


def _unkept_threshold(density: float) -> float:
    """The threshold of an expert with no rank to find: keep everything (density 1) or nothing."""
    return 0.0 if density >= 1 else float("inf")


def _one_density(seen: list[float] | None, densities: list[float]) -> list[float]:
    if seen is not None and densities != seen:
        raise UserError("trim_scope: model needs one density per model, not per-tensor filters or gradients")
    return densities


def _thresholds(densities: list[float], n: int, stream: Callable[[int], Iterator[list]]) -> list[float]:
    """Per expert, the magnitude at or above which floor(density*n) entries lie (0: keep all, inf: none)."""
    ranks = [[keep_count(d, n)] if 0 < keep_count(d, n) and d < 1 else [] for d in densities]
    found = streamed_kth_largest(stream, n, ranks) if any(ranks) else [[] for _ in densities]
    return [row[0] if row else _unkept_threshold(d) for row, d in zip(found, densities)]


def tensor_thresholds(context: TensorContext, stream: ChunkStream) -> list[float]:
    if context.model_state is not None:
        return context.model_state
    magnitudes = lambda stride: (delta_magnitudes(c, stride) for c in stream())  # noqa: E731
    return _thresholds(context.per_model("density"), context.numel, magnitudes)


def model_thresholds(tensors: Callable[[], Iterator[tuple[TensorContext, ChunkStream]]]) -> list[float]:
    """Each expert's exact magnitude threshold over the whole model (trim_scope: model)."""
    densities, total = None, 0
    for context, _stream in tensors():
        densities = _one_density(densities, context.per_model("density"))
        total += context.numel
    if densities is None:
        return []

    def stream(stride: int) -> Iterator[list]:
        for _context, chunks in tensors():
            for chunk in chunks():
                yield delta_magnitudes(chunk, stride)

    return _thresholds(densities, total, stream)


def count_magnitudes(question: dict[str, Any] | None, tensors: Iterator[tuple[TensorContext, ChunkStream]]
                     ) -> dict[str, Any]:
    """One worker's share of the model-scope thresholds, found by a radix select whose histograms add up across
    workers: round one counts every expert's magnitudes by their high 16 bits; round two, in the bucket that
    holds each expert's threshold (`question["targets"]`), by their low 16 bits."""
    targets = question["targets"] if question is not None else None
    densities, total, histograms = None, 0, {}
    for context, stream in tensors:
        densities = _one_density(densities, context.per_model("density"))
        total += context.numel
        for chunk in stream():
            for expert, magnitudes in enumerate(delta_magnitudes(chunk)):
                if targets is None:
                    counts = high_histogram(magnitudes)
                elif targets[expert] is not None:
                    counts = low_histogram(magnitudes, targets[expert][0])
                else:
                    continue
                histograms[expert] = counts + histograms[expert] if expert in histograms else counts
    return {"densities": densities, "numel": total, "histograms": histograms}


def _summed(answers: list[dict[str, Any]], expert: int) -> torch.Tensor:
    return sum(answer["histograms"][expert] for answer in answers if expert in answer["histograms"])


def reduce_magnitude_counts(question: dict[str, Any] | None, answers: list[dict[str, Any]]) -> tuple[bool, Any]:
    """Round one: the bucket and in-bucket rank of each expert's threshold; round two: the thresholds, equal to
    `model_thresholds` (both are exact)."""
    densities = None
    for answer in answers:
        if answer["densities"] is not None:
            densities = _one_density(densities, answer["densities"])
    if densities is None:
        return True, []
    if question is None:
        n = sum(answer["numel"] for answer in answers)
        targets = [bucket_of_kth_largest(_summed(answers, e), keep_count(d, n)) if 0 < keep_count(d, n) and d < 1
                   else None for e, d in enumerate(densities)]
        if any(target is not None for target in targets):
            return False, {"targets": targets}
        return True, [_unkept_threshold(d) for d in densities]
    thresholds = []
    for e, (d, target) in enumerate(zip(densities, question["targets"])):
        if target is None:
            thresholds.append(_unkept_threshold(d))
        else:
            thresholds.append(radix_value(target[0], bucket_of_kth_largest(_summed(answers, e), target[1])[0]))
    return True, thresholds


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
    split_model_pass=SplitModelPass(count_magnitudes, reduce_magnitude_counts),
)
