"""SLERP: spherical interpolation between two models, per tensor; linear when they are nearly parallel."""

from __future__ import annotations

import math

import torch

from mergekit_lite.methods.base import MergeInputs, MergeMethod, MergeOutput, ParamSpec

T = ParamSpec("t", float, 0.5, "interpolation position: 0 gives base_model, 1 the other model", scope="global",
              minimum=0.0, maximum=1.0)
PARALLEL = 0.9995  # |cos| above this: the arc is numerically a line


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle through the directions of v0 and v1 (magnitudes interpolate too)."""
    n0, n1 = v0.norm(), v1.norm()
    if n0 == 0 or n1 == 0:
        return (1 - t) * v0 + t * v1
    cos = float(torch.clamp(torch.sum(v0 * v1) / (n0 * n1), -1.0, 1.0))
    if abs(cos) > PARALLEL:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * v0 + (math.sin(t * theta) / sin_theta) * v1


def merge_slerp(inputs: MergeInputs) -> MergeOutput:
    return MergeOutput(slerp(inputs.params["t"], inputs.base, inputs.experts[0]))


METHOD = MergeMethod(
    name="slerp",
    summary="spherical interpolation between base_model and one other model, by t",
    merge=merge_slerp,
    params=(T,),
    min_models=1,
    max_models=1,
)
