"""DELLA: magnitude-ranked keep probabilities in [density - eps, density + eps], rescaled by 1/p, then TIES."""

from __future__ import annotations

from mergekit_lite.errors import UserError
from mergekit_lite.methods.base import (
    LAMBDA,
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    ParamSpec,
    normalize_param,
    rescale_param,
)
from mergekit_lite.methods.dare_linear import SEED
from mergekit_lite.methods.sparsify import (
    kept_fraction,
    merge_task_vectors,
    random_keep_mask,
    rank_keep_probabilities,
    tensor_seed,
)

EPSILON = ParamSpec("epsilon", float, 0.1, "half-width of the keep-probability range around density", minimum=0.0)
DELLA_DENSITY = ParamSpec(
    "density", float, 0.5, "mean keep probability", minimum=0.0, maximum=1.0, exclusive_minimum=True
)


def merge_della(inputs: MergeInputs) -> MergeOutput:
    deltas, kept = [], []
    params = zip(inputs.experts, inputs.per_model("density"), inputs.per_model("epsilon"))
    for index, (expert, density, epsilon) in enumerate(params):
        if density < 1 and not (0 < density - epsilon and density + epsilon <= 1):
            raise UserError(
                f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1] (tensor {inputs.name})"
            )
        delta = expert - inputs.base
        if density < 1:
            probability = rank_keep_probabilities(delta, density, epsilon)
            mask = random_keep_mask(delta.shape, probability, tensor_seed(inputs.seed, inputs.name, index), delta.device)
            delta.mul_(mask)
            if inputs.params["rescale"]:
                delta.div_(probability)
            kept.append(kept_fraction(mask))
        else:
            kept.append(1.0)
        deltas.append(delta)
    return merge_task_vectors(inputs, deltas, kept, elect=True)


METHOD = MergeMethod(
    name="della",
    summary="magnitude-ranked random drop (DELLA), rescaled by the keep probability, then TIES sign election",
    merge=merge_della,
    params=(WEIGHT, DELLA_DENSITY, EPSILON, LAMBDA, normalize_param(True), rescale_param(True), SEED),
    random=True,
)
