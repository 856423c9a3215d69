"""Model Stock: move from the base toward the experts' mean by t = N cos / (1 + (N - 1) cos)."""

from __future__ import annotations

import itertools

import torch

from mergekit_lite.methods.base import MergeInputs, MergeMethod, MergeOutput


def mean_pairwise_cosine(deltas: list[torch.Tensor]) -> float:
    flat = [d.reshape(-1) for d in deltas]
    cosines = []
    for a, b in itertools.combinations(flat, 2):
        denominator = a.norm() * b.norm()
        cosines.append(float(torch.dot(a, b) / denominator) if denominator > 0 else 0.0)
    return sum(cosines) / len(cosines)


def stock_ratio(count: int, cosine: float) -> float:
    """The interpolation ratio from the paper's geometry; 0 when the task vectors are orthogonal or opposed."""
    cosine = max(cosine, 0.0)
    return count * cosine / (1 + (count - 1) * cosine)


def merge_model_stock(inputs: MergeInputs) -> MergeOutput:
    deltas = [x - inputs.base for x in inputs.experts]
    ratio = stock_ratio(len(deltas), mean_pairwise_cosine(deltas))
    mean_delta = sum(deltas) / len(deltas)
    return MergeOutput(inputs.base + ratio * mean_delta)


METHOD = MergeMethod(
    name="model_stock",
    summary="base plus t times the mean task vector, t from the mean pairwise cosine of task vectors",
    merge=merge_model_stock,
    min_models=2,
)
