"""Linear merge (model soup / averaging): sum_t w_t theta_t, divided by sum_t w_t when normalizing."""

from __future__ import annotations

import torch

from mergekit_lite import kernels
from mergekit_lite.methods.base import WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, normalize_param


def weighted_models(vectors: list[torch.Tensor], weights: list[float], divisor: float
                    ) -> tuple[torch.Tensor, dict | None]:
    """sum_t weights[t] * vectors[t] (each product rounded, then added in order, as mergekit sums its weighted
    stack), divided by `divisor` unless it is 0; written over vectors[0]. On the CPU one pass of the C kernel
    (float32, or bfloat16 as stored), returned with its result_sq and nonfinite_inputs; else torch ops in the same
    order, with the same bits (None), which scale the other vectors in place too."""
    if kernels.usable_stored(*vectors):
        merged, stats = kernels.weighted_sum([vector.reshape(-1) for vector in vectors], weights, divisor)
        return merged.view(vectors[0].shape), stats
    merged = vectors[0].mul_(weights[0])
    for weight, vector in zip(weights[1:], vectors[1:]):
        merged.add_(vector.mul_(weight))
    return (merged.div_(divisor) if divisor else merged), None


def merge_linear(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    weights = context.per_model("weight")
    total = sum(weights)
    merged, stats = weighted_models(chunk.experts, weights,
                                    total if context.params["normalize"] and abs(total) >= 1e-8 else 0.0)
    if stats is None:
        return ChunkResult(merged)
    return ChunkResult(merged, result_sq=stats["result_sq"], nonfinite_inputs=stats["nonfinite_inputs"])


METHOD = MergeMethod(
    name="linear",
    summary="weighted average of the models' weights (base_model is not mixed in unless listed in models)",
    merge_chunk=merge_linear,
    params=(WEIGHT, normalize_param(True)),
    needs_base=False,
    reads_stored=True,
)
