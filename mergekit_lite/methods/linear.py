"""Linear merge (model soup / averaging): sum_t w_t theta_t, divided by sum_t w_t when normalizing."""

from __future__ import annotations

from mergekit_lite.methods.base import WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, normalize_param


def merge_linear(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    weights = context.per_model("weight")
    merged = chunk.experts[0].mul_(weights[0])
    for weight, expert in zip(weights[1:], chunk.experts[1:]):
        merged.add_(expert, alpha=weight)
    total = sum(weights)
    if context.params["normalize"] and abs(total) >= 1e-8:
        merged.div_(total)
    return ChunkResult(merged)


METHOD = MergeMethod(
    name="linear",
    summary="weighted average of the models' weights (base_model is not mixed in unless listed in models)",
    merge_chunk=merge_linear,
    params=(WEIGHT, normalize_param(True)),
    needs_base=False,
)
