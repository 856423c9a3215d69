"""Model Stock: move from the base toward the experts' mean by t = N cos / (1 + (N - 1) cos), with cos the mean
pairwise cosine of the task vectors: over the whole tensor, or (`filter_wise`) per row of its last axis."""

from __future__ import annotations

import itertools
import math


import torch

from mergekit_lite.methods.base import (Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext,
                                        fixed_order_gram)
from mergekit_lite.methods.sparsify import task_vectors

FILTER_WISE = ParamSpec("filter_wise", bool, False, "one ratio per row of the last axis instead of per tensor",
                        scope="global")


def stock_ratio(count: int, cosine: float) -> float:
    """The interpolation ratio from the paper's geometry; 0 when the task vectors are orthogonal or opposed."""
    cosine = max(cosine, 0.0)
    return count * cosine / (1 + (count - 1) * cosine)


def mean_pairwise_cosine(context: TensorContext, stream: ChunkStream) -> float | None:
    """The ratio for this tensor, from the task vectors' dot products accumulated over its chunks (None when
    filter-wise: each row's ratio comes from that row alone, in the merge pass)."""
    if context.params["filter_wise"]:
        return None
    count = len(context.model_params)
    gram = [[0.0] * count for _ in range(count)]
    for chunk in stream():
        here = fixed_order_gram(task_vectors(chunk)[0])
        gram = [[a + b for a, b in zip(row, more)] for row, more in zip(gram, here)]
    cosines = []
    for i, j in itertools.combinations(range(count), 2):
        denominator = math.sqrt(gram[i][i] * gram[j][j])
        cosines.append(gram[i][j] / denominator if denominator > 0 else 0.0)
    return stock_ratio(count, sum(cosines) / len(cosines))


def row_ratios(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per row ([rows, width] task vectors), the ratio from that row's mean pairwise cosine; mergekit bounds each
    norm product below by 1e-6."""
    cosines = []
    for i, j in itertools.combinations(range(len(deltas)), 2):
        norms = deltas[i].norm(dim=-1) * deltas[j].norm(dim=-1)
        cosines.append(((deltas[i] * deltas[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cosine = torch.stack(cosines).mean(0).clamp(min=0)
    count = len(deltas)
    return count * cosine / (1 + (count - 1) * cosine)


def merge_model_stock(context: TensorContext, chunk: Chunk, ratio: float | None) -> ChunkResult:
    deltas, delta_sq = task_vectors(chunk)
    if ratio is None:  # filter-wise: rows along the last axis
        width = context.shape[-1] if context.shape else 1
        ratio = row_ratios([delta.view(-1, width) for delta in deltas]).unsqueeze(1)
        mean = torch.stack([delta.view(-1, width) for delta in deltas]).mean(0)
        return ChunkResult(mean.mul_(ratio).view(chunk.base.shape).add_(chunk.base), delta_sq=delta_sq)
    mean = deltas[0]
    for delta in deltas[1:]:
        mean.add_(delta)
    return ChunkResult(mean.mul_(ratio / len(deltas)).add_(chunk.base), delta_sq=delta_sq)


METHOD = MergeMethod(
    name="model_stock",
    summary="base plus t times the mean task vector, t from the mean pairwise cosine of task vectors",
    merge_chunk=merge_model_stock,
    prepare=mean_pairwise_cosine,
    params=(FILTER_WISE,),
    min_models=2,
)
