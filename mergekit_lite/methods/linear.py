"""Linear merge (model soup / averaging): sum_t w_t theta_t, divided by sum_t w_t when normalizing."""

from __future__ import annotations

from mergekit_lite import kernels
from mergekit_lite.methods.base import WEIGHT, Chunk, ChunkResult, MergeMethod, TensorContext, normalize_param


def merge_linear(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    """Each weighted model rounded, then summed in order (as mergekit sums its weighted stack), then divided; on
    the CPU in one pass of the C kernel, with these bits, on float32 chunks or bfloat16 ones as stored."""
    weights = context.per_model("weight")
    total = sum(weights)
    divisor = total if context.params["normalize"] and abs(total) >= 1e-8 else 0.0
    if kernels.usable_stored(*chunk.experts):
        merged, stats = kernels.weighted_sum([expert.reshape(-1) for expert in chunk.experts], weights, divisor)
        return ChunkResult(merged.view(chunk.experts[0].shape), result_sq=stats["result_sq"],
                           nonfinite_inputs=stats["nonfinite_inputs"])
    merged = chunk.experts[0].mul_(weights[0])
    for weight, expert in zip(weights[1:], chunk.experts[1:]):
        merged.add_(expert.mul_(weight))
    if divisor:
        merged.div_(divisor)
    return ChunkResult(merged)


METHOD = MergeMethod(
    name="linear",
    summary="weighted average of the models' weights (base_model is not mixed in unless listed in models)",
    merge_chunk=merge_linear,
    params=(WEIGHT, normalize_param(True)),
    needs_base=False,
    reads_stored=True,
)
