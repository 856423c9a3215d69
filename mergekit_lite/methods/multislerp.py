"""Multi-SLERP: a weighted mean of several models on the sphere. Each model (task vector, with a base) is scaled
to unit norm; the weighted mean of those units, renormalised, is the direction, and the weighted mean of the
norms the length. (mergekit's tangent-space step adds only rounding: the weighted tangent vectors at the mean
sum to zero.) A pass over the tensor gathers the models' dot products; the result is then a fixed linear
combination of the models, streamed."""

from __future__ import annotations

import math

from mergekit_lite.errors import UserError
from mergekit_lite.methods.base import (WEIGHT, Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec,
                                        TensorContext, fixed_order_gram)
from mergekit_lite.methods.linear import weighted_models
from mergekit_lite.methods.sparsify import model_vectors

NORMALIZE_WEIGHTS = ParamSpec("normalize_weights", bool, True, "divide the weights by their sum", scope="global")
EPS = ParamSpec("eps", float, 1e-8, "added to norms before dividing by them", scope="global", minimum=0.0)


def gram(stream: ChunkStream, count: int) -> list[list[float]]:
    """Dot products of every pair of models' vectors over the whole tensor."""
    products = [[0.0] * count for _ in range(count)]
    for chunk in stream():
        here = fixed_order_gram(model_vectors(chunk))
        products = [[a + b for a, b in zip(row, more)] for row, more in zip(products, here)]
    return products


def sphere_mean_coefficients(products: list[list[float]], weights: list[float], eps: float) -> list[float]:
    """c such that sum_i c_i v_i is the spherical weighted mean, from the vectors' dot products."""
    norms = [math.sqrt(max(products[i][i], 0.0)) for i in range(len(weights))]
    scale = [w / (n + eps) for w, n in zip(weights, norms)]
    mean_sq = sum(scale[i] * scale[j] * products[i][j] for i in range(len(weights)) for j in range(len(weights)))
    mean_norm = math.sqrt(max(mean_sq, 0.0))
    if mean_norm < eps:
        if len(weights) == 2:  # opposite vectors: mergekit falls back to the weighted sum
            return list(weights)
        raise UserError("multislerp: the weighted mean of the models' directions is zero (opposite models with "
                        "balancing weights); change the weights")
    length = sum(w * n for w, n in zip(weights, norms))
    return [s / mean_norm * length for s in scale]


def coefficients(context: TensorContext, stream: ChunkStream) -> list[float]:
    weights = context.per_model("weight")
    if len(weights) == 1:
        return [1.0]
    if context.params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    return sphere_mean_coefficients(gram(stream, len(weights)), weights, context.params["eps"])


def merge_multislerp(context: TensorContext, chunk: Chunk, combination: list[float]) -> ChunkResult:
    merged, stats = weighted_models(model_vectors(chunk), combination, 0.0)
    if chunk.base is None:
        return ChunkResult(merged, result_sq=stats["result_sq"] if stats else None)
    return ChunkResult(merged.add_(chunk.base), result_delta_sq=stats["result_sq"] if stats else None)


METHOD = MergeMethod(
    name="multislerp",
    summary="weighted mean of several models on the sphere (of their task vectors with a base)",
    merge_chunk=merge_multislerp,
    prepare=coefficients,
    params=(WEIGHT, NORMALIZE_WEIGHTS, EPS),
    needs_base=False,
    optional_base=True,
)
