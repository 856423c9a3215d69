"""TIES-Merging: trim each task vector to its largest entries, elect a sign per entry, average the agreeing.

`trim_scope: tensor` (default, as LLM merge tools do) trims each tensor to its own top `density`;
`trim_scope: model` (as the paper does) trims each expert's whole flattened task vector to one global
threshold, found by a first streamed pass that never holds the model in memory.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from mergekit_lite.errors import UserError
from mergekit_lite.methods.base import (
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    ParamSpec,
    normalize_param,
)
from mergekit_lite.methods.sparsify import (
    keep_count,
    kept_fraction,
    magnitude_mask,
    merge_task_vectors,
)

TIES_DENSITY = ParamSpec(
    "density", float, 0.2, "fraction of each task vector kept, by magnitude", minimum=0.0, maximum=1.0, exclusive_minimum=True
)
TRIM_SCOPE = ParamSpec(
    "trim_scope", str, "tensor", "trim per tensor, or per expert over the whole model (the paper)", scope="global",
    choices=("tensor", "model"),
)

_BUCKETS = 1 << 16


def merge_ties(inputs: MergeInputs) -> MergeOutput:
    deltas, kept = [], []
    for index, (expert, density) in enumerate(zip(inputs.experts, inputs.per_model("density"))):
        delta = expert - inputs.base
        if inputs.prepared is not None:
            mask = delta.abs() >= inputs.prepared[index]
        else:
            mask = magnitude_mask(delta, density)
        delta.mul_(mask)
        kept.append(kept_fraction(mask))
        deltas.append(delta)
    return merge_task_vectors(inputs, deltas, kept, elect=True)


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as int32 bit patterns: their order is the values' order."""
    return magnitude.reshape(-1).contiguous().view(torch.int32)


def model_thresholds(stream: Callable[[], Iterator[tuple]], settings: dict) -> list[float]:
    """Each expert's exact global magnitude threshold (k-th largest |delta| over the model), in two passes.

    A radix select on float bit patterns: the first pass histograms the high 16 bits of every |delta| and
    finds the bucket holding the k-th largest; the second histograms the low 16 bits inside that bucket.
    Memory is two 65,536-entry histograms per expert, whatever the model size.
    """
    densities: list[float] | None = None
    high: list[torch.Tensor] = []
    total = 0
    for _name, base, experts, model_params in stream():
        if densities is None:
            densities = [p["density"] for p in model_params]
            high = [torch.zeros(_BUCKETS, dtype=torch.int64) for _ in experts]
        for index, (expert, params) in enumerate(zip(experts, model_params)):
            if params["density"] != densities[index]:
                raise UserError("trim_scope: model needs one density per model, not per-tensor filters or gradients")
            high[index] += torch.bincount(_bits((expert - base).abs()) >> 16, minlength=_BUCKETS).cpu()
        total += base.numel()
    if densities is None:
        return []
    ks = [keep_count(d, total) for d in densities]
    buckets = [_bucket_of_kth_largest(h, k) if k > 0 else None for h, k in zip(high, ks)]
    low = [torch.zeros(_BUCKETS, dtype=torch.int64) for _ in densities]
    for _name, base, experts, _params in stream():
        for index, expert in enumerate(experts):
            if buckets[index] is None:
                continue
            bits = _bits((expert - base).abs())
            inside = bits[(bits >> 16) == buckets[index][0]]
            low[index] += torch.bincount(inside & 0xFFFF, minlength=_BUCKETS).cpu()
    thresholds = []
    for index, k in enumerate(ks):
        if k == 0 or densities[index] >= 1:
            thresholds.append(float("inf") if k == 0 else 0.0)
            continue
        bucket, rank_inside = buckets[index]
        low_bucket, _ = _bucket_of_kth_largest(low[index], rank_inside)
        bits = torch.tensor([(bucket << 16) | low_bucket], dtype=torch.int32)
        thresholds.append(float(bits.view(torch.float32)[0]))
    return thresholds


def _bucket_of_kth_largest(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest value, and that value's rank from the top inside the bucket."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k)))
    bucket = histogram.numel() - 1 - position
    above = int(from_top[position - 1]) if position > 0 else 0
    return bucket, k - above


METHOD = MergeMethod(
    name="ties",
    summary="trim task vectors to the top density by magnitude, elect signs, average the agreeing entries",
    merge=merge_ties,
    params=(WEIGHT, TIES_DENSITY, LAMBDA, normalize_param(True), TRIM_SCOPE, INT8_MASK),
    prepare=model_thresholds,
    needs_prepare=lambda params: params.get("trim_scope") == "model",
)
