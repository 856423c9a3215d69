"""SCE (select, calculate, erase): keep the entries whose task vectors vary most across the models (`select_topk`
of them), weight each model by its mean squared (kept) task vector, and average per entry the models that agree
with the sign of the sum."""

from __future__ import annotations

import torch

from mergekit_lite import kernels
from mergekit_lite.methods.base import (Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext,
                                        per_entry_statistic)
from mergekit_lite.methods.sparsify import count_nonzero, keep_count, streamed_kth_largest, task_vectors

SELECT_TOPK = ParamSpec("select_topk", float, 1.0, "fraction of entries kept, by their variance across the models",
                        scope="global", minimum=0.0, maximum=1.0)
MIN_DIVISOR = 1e-6  # mergekit's floor under the sum of agreeing weights


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per entry, the (biased) variance of the models' task vectors: mean, then mean squared deviation (torch.var
    across a short first axis takes a slow general path, ten times this)."""
    flat = [d.reshape(-1) for d in deltas]
    mean = flat[0].clone()
    for d in flat[1:]:
        mean += d
    mean /= len(flat)
    total = torch.zeros_like(mean)
    for d in flat:
        total.addcmul_(d - mean, d - mean)
    return total.div_(len(flat))


Selection = tuple[float | None, list[float], dict[int, torch.Tensor]]


def selection(context: TensorContext, stream: ChunkStream) -> Selection:
    """The variance at or above which an entry is kept (None: all kept; inf: none), each model's weight (its
    kept task vector's mean square, normalised to sum 1; equal weights when they are all ~0), and the
    variances by chunk for the merge pass."""
    fraction = context.params["select_topk"]
    threshold = None
    by_chunk: dict[int, torch.Tensor] = {}
    if fraction <= 0:
        threshold = float("inf")
    elif fraction < 1:
        values, by_chunk = per_entry_statistic(context.numel, stream,
                                                lambda c, out: out.copy_(variance(task_vectors(c)[0])))
        k = keep_count(fraction, count_nonzero(values))
        parts = list(by_chunk.values())
        threshold = float("inf") if k == 0 else streamed_kth_largest(
            lambda stride: ([part[::stride]] for part in parts), values.numel(), [[k]])[0][0]
    squares = None
    for chunk in stream():
        deltas = task_vectors(chunk)[0]
        kept = by_chunk[chunk.start] >= threshold if by_chunk else None
        flat = [d.reshape(-1) for d in deltas]
        here = [float(((d * kept) if kept is not None else d).square().sum()) for d in flat]
        squares = here if squares is None else [a + b for a, b in zip(squares, here)]
    means = [s / context.numel for s in squares]
    total = sum(means)
    if abs(total) < 1e-6:
        return threshold, [1.0 / len(means)] * len(means), by_chunk
    return threshold, [m / total for m in means], by_chunk


def merge_sce(context: TensorContext, chunk: Chunk, state: Selection) -> ChunkResult:
    threshold, weights, by_chunk = state
    variances = by_chunk.pop(chunk.start) if threshold not in (None, float("inf")) else None
    if kernels.usable(chunk.base, *chunk.experts) and (variances is None or kernels.usable(variances)):
        merged, norms = kernels.sce_merge(
            chunk.base.reshape(-1), [expert.reshape(-1) for expert in chunk.experts], chunk.delta_sq is not None,
            variances, 0.0 if threshold is None else threshold, threshold == float("inf"), weights, MIN_DIVISOR)
        return ChunkResult(merged.view(chunk.base.shape), delta_sq=norms["delta_sq"],
                           result_delta_sq=norms["change_sq"], result_sq=norms["result_sq"])
    deltas, delta_sq = task_vectors(chunk)
    if threshold == float("inf"):
        deltas = [d.zero_() for d in deltas]
    elif threshold is not None:
        kept = (variances >= threshold).view(deltas[0].shape)
        deltas = [d.mul_(kept) for d in deltas]
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total += delta
    majority = torch.where(total >= 0, 1.0, -1.0)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for delta, weight in zip(deltas, weights):
        agrees = (torch.sign(delta) == majority).to(delta.dtype) * weight
        merged += delta * agrees
        divisor += agrees
    merged /= divisor.clamp_(min=MIN_DIVISOR)
    return ChunkResult(merged.view(chunk.base.shape).add_(chunk.base), delta_sq=delta_sq)


METHOD = MergeMethod(
    name="sce",
    summary="keep the select_topk most varying entries, weight models by mean squared change, sign-agreeing mean",
    merge_chunk=merge_sce,
    prepare=selection,
    params=(SELECT_TOPK,),
)
