"""DELLA: magnitude-ranked keep probabilities in [density - eps, density + eps], rescaled by 1/p, then TIES.

Ranks are taken within each row, as the reference implementation does; chunks always hold whole rows.
"""

from __future__ import annotations

from mergekit_lite.errors import UserError
from mergekit_lite.methods.base import (
    LAMBDA, WEIGHT, Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext, density_param, normalize_param,
    rescale_param,
)
from mergekit_lite.methods.dare_linear import SEED
from mergekit_lite.methods.sparsify import (
    merge_task_vectors, random_keep, rank_keep_probabilities, task_vectors, tensor_seed,
)

EPSILON = ParamSpec("epsilon", float, 0.1, "half-width of the keep-probability range around density", minimum=0.0)


def della_drop(context: TensorContext, chunk: Chunk) -> tuple[list, list[float], list[int]]:
    """Each expert's task vector after DELLA's magnitude-ranked random drop, rescaled by 1/p when `rescale`."""
    deltas, delta_sq = task_vectors(chunk)
    kept = []
    settings = zip(deltas, context.per_model("density"), context.per_model("epsilon"))
    for index, (delta, density, epsilon) in enumerate(settings):
        if density >= 1:
            kept.append(delta.numel())
            continue
        if not (0 < density - epsilon and density + epsilon <= 1):
            raise UserError(f"della: density {density} +/- epsilon {epsilon} must stay inside (0, 1] (tensor {context.name})")
        probability = rank_keep_probabilities(delta, density, epsilon)
        seed = tensor_seed(context.seed, context.name, index, chunk.start)
        kept.append(random_keep(delta, probability, seed, rescale=context.params["rescale"]))
    return deltas, delta_sq, kept


def merge_della(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    deltas, delta_sq, kept = della_drop(context, chunk)
    return merge_task_vectors(context, chunk, deltas, delta_sq, kept, elect=True)


METHOD = MergeMethod(
    name="della",
    summary="magnitude-ranked random drop (DELLA), rescaled by the keep probability, then TIES sign election",
    merge_chunk=merge_della,
    params=(WEIGHT, density_param(0.5, "mean keep probability"), EPSILON, LAMBDA, normalize_param(True),
            rescale_param(True), SEED),
    random=True,
)
