"""Arcee Fusion: take the other model's change only where it matters most. Importance of an entry is
|change| times the KL divergence between the two models' softmaxed rows (last axis); entries at or above
median + 1.5 IQR of the tensor's importances take the other model's value, the rest keep the base's."""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import Chunk, ChunkResult, ChunkStream, MergeMethod, TensorContext, per_entry_statistic
from mergekit_lite.methods.sparsify import streamed_kth_largest

SOFTMAX_EPS = 1e-8  # added to both softmaxes before the KL divergence, as mergekit does
QUANTILES = (0.25, 0.5, 0.75)


def importance(base: torch.Tensor, other: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per entry, |other - base| times the KL divergence of the rows' softmaxes, flattened (into `out` when given).
    The steps of that expression done in two buffers of the chunk's size instead of nine, with the same bits: a
    fresh buffer per step costs more here than the arithmetic."""
    b, o = base.reshape(-1, width), other.reshape(-1, width)
    p = torch.softmax(o, dim=-1).add_(SOFTMAX_EPS)
    q = torch.softmax(b, dim=-1).add_(SOFTMAX_EPS)
    divergence = torch.div(p, q, out=q).log_().mul_(p).sum(-1, keepdim=True)  # p * log(p / q); products commute
    change = torch.sub(o, b, out=p).abs_()
    result = change.mul_(divergence) if out is None else torch.mul(change, divergence, out=out.view(-1, width))
    return result.reshape(-1)


def threshold(context: TensorContext, stream: ChunkStream) -> tuple[float, dict[int, torch.Tensor]]:
    """median + 1.5 * (q3 - q1) of the importances over the whole tensor, exact (the quantile at q is the
    floor(q * (n - 1))-th smallest, counting from 0), and each chunk's importances, computed once: they cost
    an exp and a log per entry, and the merge pass needs them again. They take one float per entry of this
    one tensor."""
    width, n = (context.shape[-1] if context.shape else 1), context.numel
    values, by_chunk = per_entry_statistic(n, stream, lambda c, out: importance(c.base, c.experts[0], width, out))
    if float(values.min()) >= 0:  # the usual case: the fast exact selection, which takes magnitudes
        ranks = [n - int(q * (n - 1)) for q in QUANTILES]  # the k-th smallest as the (n - k + 1)-th largest
        parts = list(by_chunk.values())
        q1, median, q3 = streamed_kth_largest(lambda stride: ([part[::stride]] for part in parts), n, [ranks])[0]
    else:  # rows whose softmaxes barely differ can give a KL divergence a hair below zero
        q1, median, q3 = (float(torch.kthvalue(values, int(q * (n - 1)) + 1).values) for q in QUANTILES)
    return median + 1.5 * (q3 - q1), by_chunk


def merge_arcee_fusion(context: TensorContext, chunk: Chunk, state: tuple[float, dict[int, torch.Tensor]]
                       ) -> ChunkResult:
    cut, by_chunk = state
    keep = (by_chunk.pop(chunk.start) >= cut).view(chunk.base.shape)
    return ChunkResult(chunk.experts[0].sub_(chunk.base).mul_(keep).add_(chunk.base))


METHOD = MergeMethod(
    name="arcee_fusion",
    summary="the other model's change where |change| x row KL divergence reaches median + 1.5 IQR, else the base",
    merge_chunk=merge_arcee_fusion,
    prepare=threshold,
    max_models=1,
)
