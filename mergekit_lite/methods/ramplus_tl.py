"""RAM+ (tensor-local): RAM, with each model's unique changes scaled up by 1 + r * clamp(rho, 0, alpha), rho
being, in this tensor, how many of its changes other models share per change it alone made."""

from __future__ import annotations

import torch

from mergekit_lite import kernels
from mergekit_lite.methods.base import Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext
from mergekit_lite.methods.ram import RAM_EPSILON, contributions, fused_ram
from mergekit_lite.methods.sparsify import task_vectors

R = ParamSpec("r", float, 0.1, "how much a model's shared-to-unique ratio raises its unique changes", scope="global",
              minimum=0.0)
ALPHA = ParamSpec("alpha", float, 0.2, "cap on the shared-to-unique ratio", scope="global", minimum=0.0)


def unique_scales(context: TensorContext, stream: ChunkStream) -> list[float]:
    """Per model, 1 + r * clamp(shared / unique, 0, alpha), counted over the whole tensor."""
    epsilon = context.params["epsilon"]
    shared = unique = None
    for chunk in stream():
        if kernels.usable_stored(chunk.base, *chunk.experts):
            here_shared, here_unique = kernels.ram_counts(
                chunk.base.reshape(-1), [expert.reshape(-1) for expert in chunk.experts], chunk.delta_sq is not None,
                epsilon)
        else:
            deltas = task_vectors(chunk)[0]
            changed, count = contributions(deltas, epsilon)
            here_shared = [int((mask & (count > 1)).sum()) for mask in changed]
            here_unique = [int((mask & (count == 1)).sum()) for mask in changed]
        shared = here_shared if shared is None else [a + b for a, b in zip(shared, here_shared)]
        unique = here_unique if unique is None else [a + b for a, b in zip(unique, here_unique)]
    r, alpha = context.params["r"], context.params["alpha"]
    return [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared, unique)]


def merge_ramplus_tl(context: TensorContext, chunk: Chunk, scales: list[float]) -> ChunkResult:
    fused = fused_ram(context, chunk, scales)
    if fused is not None:
        return fused
    deltas, delta_sq = task_vectors(chunk)
    changed, count = contributions(deltas, context.params["epsilon"])
    alone, shared = count == 1, count > 1
    merged = torch.zeros_like(deltas[0])
    divisor = count.clamp(min=1)
    for delta, mask, scale in zip(deltas, changed, scales):
        kept = delta * mask
        merged += kept * alone * scale + kept * shared / divisor
    return ChunkResult(merged.view(chunk.base.shape).add_(chunk.base), delta_sq=delta_sq)


METHOD = MergeMethod(
    name="ramplus_tl",
    summary="RAM with each model's unique changes raised by its shared-to-unique ratio in the tensor (RAM+)",
    merge_chunk=merge_ramplus_tl,
    prepare=unique_scales,
    params=(RAM_EPSILON, R, ALPHA),
    reads_stored=True,
)
