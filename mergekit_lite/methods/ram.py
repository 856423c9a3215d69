"""RAM (Reinforced Agent Merging): an entry that one model alone changed (|task vector| > epsilon) keeps that
change whole; an entry several changed gets the mean of their changes."""

from __future__ import annotations

import torch

from mergekit_lite import kernels
from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext
from mergekit_lite.methods.sparsify import task_vectors

RAM_EPSILON = ParamSpec("epsilon", float, 1e-5, "a task-vector entry counts as a change above this magnitude",
                        scope="global", minimum=0.0)


def contributions(deltas: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Which entries each model changed, and how many models changed each entry."""
    changed = [delta.abs() > epsilon for delta in deltas]
    count = torch.zeros_like(deltas[0])
    for mask in changed:
        count += mask
    return changed, count


def fused_ram(context: TensorContext, chunk: Chunk, scales: list[float] | None) -> ChunkResult | None:
    """RAM (scales None) or RAM+ in one pass of the C kernel, with the torch path's bits, on float32 chunks or on
    bfloat16 ones as stored; None when the kernels cannot take this chunk."""
    if not kernels.usable_stored(chunk.base, *chunk.experts):
        return None
    merged, norms = kernels.ram_merge(chunk.base.reshape(-1), [expert.reshape(-1) for expert in chunk.experts],
                                      chunk.delta_sq is not None, context.params["epsilon"], scales)
    return ChunkResult(merged.view(chunk.base.shape), delta_sq=norms["delta_sq"], result_delta_sq=norms["change_sq"],
                       result_sq=norms["result_sq"], nonfinite_inputs=norms["nonfinite_inputs"])


def merge_ram(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    fused = fused_ram(context, chunk, None)
    if fused is not None:
        return fused
    deltas, delta_sq = task_vectors(chunk)
    changed, count = contributions(deltas, context.params["epsilon"])
    merged = torch.zeros_like(deltas[0])
    for delta, mask in zip(deltas, changed):
        merged += delta * mask
    merged /= count.clamp_(min=1)
    return ChunkResult(merged.view(chunk.base.shape).add_(chunk.base), delta_sq=delta_sq)


METHOD = MergeMethod(
    name="ram",
    summary="entries one model changed keep its change; entries several changed take their mean change",
    merge_chunk=merge_ram,
    params=(RAM_EPSILON,),
    reads_stored=True,
)
