"""Model breadcrumbs: drop each task vector's largest `gamma` outliers and its smallest entries, then add."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    LAMBDA,
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    ParamSpec,
    normalize_param,
)
from mergekit_lite.methods.sparsify import (
    kept_fraction,
    merge_task_vectors,
    outlier_mask,
)

GAMMA = ParamSpec("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers", minimum=0.0, maximum=1.0)
BREADCRUMBS_DENSITY = ParamSpec(
    "density", float, 0.9, "fraction of entries kept", minimum=0.0, maximum=1.0, exclusive_minimum=True
)


def merge_breadcrumbs(inputs: MergeInputs) -> MergeOutput:
    deltas, kept = [], []
    for expert, density, gamma in zip(inputs.experts, inputs.per_model("density"), inputs.per_model("gamma")):
        delta = expert - inputs.base
        mask = outlier_mask(delta, density, gamma)
        delta.mul_(mask)
        kept.append(kept_fraction(mask))
        deltas.append(delta)
    return merge_task_vectors(inputs, deltas, kept, elect=False)


METHOD = MergeMethod(
    name="breadcrumbs",
    summary="drop the largest gamma and the smallest entries of each task vector, keep density, then task arithmetic",
    merge=merge_breadcrumbs,
    params=(WEIGHT, BREADCRUMBS_DENSITY, GAMMA, LAMBDA, normalize_param(False)),
)
