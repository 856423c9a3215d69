"""DARE + task arithmetic: drop each task-vector entry with probability 1 - density, rescale survivors."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    ParamSpec,
    normalize_param,
    rescale_param,
)
from mergekit_lite.methods.sparsify import (
    kept_fraction,
    merge_task_vectors,
    random_keep_mask,
    tensor_seed,
)

SEED = ParamSpec("seed", int, 0, "random seed for the drop masks (--seed overrides)", scope="global", minimum=0)
DARE_DENSITY = ParamSpec(
    "density", float, 0.1, "keep probability of each task-vector entry (DARE drops 1 - density)",
    minimum=0.0, maximum=1.0, exclusive_minimum=True,
)


def dare_deltas(inputs: MergeInputs) -> tuple[list, list[float]]:
    """Each expert's task vector after a seeded random drop, rescaled by 1/density when `rescale`."""
    deltas, kept = [], []
    for index, (expert, density) in enumerate(zip(inputs.experts, inputs.per_model("density"))):
        delta = expert - inputs.base
        if density < 1:
            mask = random_keep_mask(delta.shape, density, tensor_seed(inputs.seed, inputs.name, index), delta.device)
            delta.mul_(mask)
            if inputs.params["rescale"]:
                delta.div_(density)
            kept.append(kept_fraction(mask))
        else:
            kept.append(1.0)
        deltas.append(delta)
    return deltas, kept


def merge_dare_linear(inputs: MergeInputs) -> MergeOutput:
    deltas, kept = dare_deltas(inputs)
    return merge_task_vectors(inputs, deltas, kept, elect=False)


METHOD = MergeMethod(
    name="dare_linear",
    summary="DARE random drop with rescaling, then task arithmetic",
    merge=merge_dare_linear,
    params=(WEIGHT, DARE_DENSITY, LAMBDA, normalize_param(False), rescale_param(True), INT8_MASK, SEED),
    random=True,
)
