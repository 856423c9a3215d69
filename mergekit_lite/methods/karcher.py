"""Karcher mean: the Riemannian mean of the models' directions on the unit sphere (a few fixed-point steps from
their normalised mean), times the mean of their norms. Equal weights; with a base model, the base is one of
the points, as in mergekit. The steps run on the models' dot products, so the result is a linear combination
of the models, streamed."""

from __future__ import annotations

import math

import torch

from mergekit_lite.methods.base import Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext
from mergekit_lite.methods.linear import weighted_models
from mergekit_lite.methods.multislerp import gram

MAX_ITER = ParamSpec("max_iter", int, 10, "fixed-point steps at most", scope="global", minimum=0)
TOL = ParamSpec("tol", float, 1e-5, "stop when a step moves less than this; norms below it count as zero",
                scope="global", minimum=0.0)


def _dot(products: list[list[float]], a: list[float], b: list[float]) -> float:
    return sum(a[i] * b[j] * products[i][j] for i in range(len(a)) for j in range(len(b)) if a[i] and b[j])


def karcher_coefficients(products: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """c such that sum_i c_i v_i is the Karcher mean of the vectors with these dot products."""
    count = len(products)
    norms = [math.sqrt(max(products[i][i], 0.0)) for i in range(count)]
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    units = [[products[i][j] / (norms[i] * norms[j]) if i in valid and j in valid else 0.0 for j in range(count)]
             for i in range(count)]  # dot products of the unit vectors
    alpha = 1.0 / len(valid)
    basis = lambda i: [1.0 if j == i else 0.0 for j in range(count)]  # noqa: E731
    u = [alpha if i in valid else 0.0 for i in range(count)]
    length = math.sqrt(max(_dot(units, u, u), 0.0))
    u = basis(valid[0]) if length < tol else [x / length for x in u]
    for _ in range(max_iter):
        step = [0.0] * count
        for i in valid:
            cos = max(-1.0, min(1.0, _dot(units, u, basis(i))))
            theta = math.acos(cos)
            if theta < tol:
                continue
            factor = alpha * theta / math.sin(theta)
            step = [s + factor * ((1.0 if j == i else 0.0) - cos * u[j]) for j, s in enumerate(step)]
        size = math.sqrt(max(_dot(units, step, step), 0.0))
        if size < tol:
            break
        u = [math.cos(size) * a + math.sin(size) * b / size for a, b in zip(u, step)]
        length = math.sqrt(max(_dot(units, u, u), 0.0))
        if length > tol:
            u = [x / length for x in u]
    scale = sum(norms) / count  # the mean norm over every model, zero ones included
    return [scale * u[i] / norms[i] if i in valid else 0.0 for i in range(count)]


def coefficients(context: TensorContext, stream: ChunkStream) -> list[float]:
    count = len(context.model_params)
    if count == 1:
        return [1.0]
    return karcher_coefficients(gram(stream, count), context.params["max_iter"], context.params["tol"])


def merge_karcher(context: TensorContext, chunk: Chunk, combination: list[float]) -> ChunkResult:
    """The mean is a fixed combination of the models (those of too small a norm left out): one weighted sum."""
    used = [(model, c) for model, c in zip(chunk.experts, combination) if c]
    if not used:
        return ChunkResult(torch.zeros_like(chunk.experts[0]))
    merged, stats = weighted_models([model for model, _ in used], [c for _, c in used], 0.0)
    return ChunkResult(merged, result_sq=stats["result_sq"] if stats else None)


METHOD = MergeMethod(
    name="karcher",
    summary="Riemannian (Karcher) mean of the models' directions on the sphere, times their mean norm",
    merge_chunk=merge_karcher,
    prepare=coefficients,
    params=(MAX_ITER, TOL),
    needs_base=False,
    base_as_input=True,
)
