"""Task arithmetic: theta_0 + lambda * sum_t w_t (theta_t - theta_0)."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    LAMBDA,
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    normalize_param,
)
from mergekit_lite.methods.sparsify import merge_task_vectors


def merge_task_arithmetic(inputs: MergeInputs) -> MergeOutput:
    return merge_task_vectors(inputs, [x - inputs.base for x in inputs.experts], None, elect=False)


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="base plus the weighted sum of task vectors, scaled by lambda",
    merge=merge_task_arithmetic,
    params=(WEIGHT, LAMBDA, normalize_param(False)),
)
