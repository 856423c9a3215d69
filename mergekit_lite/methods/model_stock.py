"""Model Stock: move from the base toward the experts' mean by t = N cos / (1 + (N - 1) cos)."""

from __future__ import annotations

import itertools
import math


from mergekit_lite.methods.base import Chunk, ChunkResult, ChunkStream, MergeMethod, TensorContext, fixed_order_dot
from mergekit_lite.methods.sparsify import task_vectors


def stock_ratio(count: int, cosine: float) -> float:
    """The interpolation ratio from the paper's geometry; 0 when the task vectors are orthogonal or opposed."""
    cosine = max(cosine, 0.0)
    return count * cosine / (1 + (count - 1) * cosine)


def mean_pairwise_cosine(context: TensorContext, stream: ChunkStream) -> float:
    """The ratio for this tensor, from the task vectors' dot products accumulated over its chunks."""
    count = len(context.model_params)
    gram = [[0.0] * count for _ in range(count)]
    for chunk in stream():
        deltas = task_vectors(chunk)[0]
        for i, j in itertools.combinations_with_replacement(range(count), 2):
            gram[i][j] += fixed_order_dot(deltas[i], deltas[j])
    cosines = []
    for i, j in itertools.combinations(range(count), 2):
        denominator = math.sqrt(gram[i][i] * gram[j][j])
        cosines.append(gram[i][j] / denominator if denominator > 0 else 0.0)
    return stock_ratio(count, sum(cosines) / len(cosines))


def merge_model_stock(context: TensorContext, chunk: Chunk, ratio: float) -> ChunkResult:
    deltas, delta_sq = task_vectors(chunk)
    mean = deltas[0]
    for delta in deltas[1:]:
        mean.add_(delta)
    return ChunkResult(mean.mul_(ratio / len(deltas)).add_(chunk.base), delta_sq=delta_sq)


METHOD = MergeMethod(
    name="model_stock",
    summary="base plus t times the mean task vector, t from the mean pairwise cosine of task vectors",
    merge_chunk=merge_model_stock,
    prepare=mean_pairwise_cosine,
    min_models=2,
)
