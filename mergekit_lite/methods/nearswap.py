"""NearSwap: take the other model's value where it is near the base's, keep the base's where they are far apart:
w = clamp(t / |base - other|, 0, 1), result = w * other + (1 - w) * base, entry by entry."""

from __future__ import annotations

import torch

from mergekit_lite import kernels
from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext

T = ParamSpec("t", float, None, "distance below which the other model's value is taken whole", scope="global",
              minimum=0.0, required=True)
MIN_DISTANCE = 1e-6  # mergekit's floor under |base - other|


def nearswap_weights(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    return (t / (base - other).abs_().clamp_(min=MIN_DISTANCE)).clamp_(0.0, 1.0)


def merge_nearswap(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    """On the CPU one pass of the C kernel, with these bits, on float32 chunks or bfloat16 ones as stored."""
    other = chunk.experts[0]
    if kernels.usable_stored(chunk.base, other):
        merged, stats = kernels.nearswap_merge(chunk.base.reshape(-1), other.reshape(-1), context.params["t"])
        return ChunkResult(merged.view(other.shape), result_delta_sq=stats["change_sq"], result_sq=stats["result_sq"],
                           nonfinite_inputs=stats["nonfinite_inputs"])
    weight = nearswap_weights(chunk.base, other, context.params["t"])
    return ChunkResult(other.sub_(chunk.base).mul_(weight).add_(chunk.base))


METHOD = MergeMethod(
    name="nearswap",
    summary="per entry, w = clamp(t / |base - other|, 0, 1) of the other model and 1 - w of the base",
    merge_chunk=merge_nearswap,
    params=(T,),
    max_models=1,
    reads_stored=True,
)
