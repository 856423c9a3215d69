"""Linear merge (model soup / averaging): sum_t w_t theta_t, divided by sum_t w_t when normalizing."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    normalize_param,
)


def merge_linear(inputs: MergeInputs) -> MergeOutput:
    weights = inputs.per_model("weight")
    total = sum(weights)
    merged = sum(w * x for w, x in zip(weights, inputs.experts))
    if inputs.params["normalize"] and abs(total) >= 1e-8:
        merged = merged / total
    return MergeOutput(merged)


METHOD = MergeMethod(
    name="linear",
    summary="weighted average of the models' weights (base_model is not mixed in unless listed in models)",
    merge=merge_linear,
    params=(WEIGHT, normalize_param(True)),
    needs_base=False,
)
