"""SLERP: spherical interpolation between two models, per tensor; linear when they are nearly parallel."""

from __future__ import annotations

import math

from mergekit_lite.methods.base import (Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext,
                                        fixed_order_gram)

T = ParamSpec("t", float, 0.5, "interpolation position: 0 gives base_model, 1 the other model", scope="global",
              minimum=0.0, maximum=1.0)
PARALLEL = 0.9995  # |cos| above this: the arc is numerically a line


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float) -> tuple[float, float]:
    """(a, b) such that a*v0 + b*v1 lies on the great-circle arc from v0 to v1 at fraction t."""
    if norm0 == 0 or norm1 == 0:
        return 1 - t, t
    cos = max(-1.0, min(1.0, dot / (norm0 * norm1)))
    if abs(cos) > PARALLEL:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def whole_tensor_geometry(context: TensorContext, stream: ChunkStream) -> tuple[float, float]:
    """The coefficients for this tensor, from norms and the dot product accumulated over its chunks."""
    sq0 = sq1 = dot = 0.0
    for chunk in stream():
        products = fixed_order_gram([chunk.base, chunk.experts[0]])
        sq0, sq1, dot = sq0 + products[0][0], sq1 + products[1][1], dot + products[0][1]
    return slerp_coefficients(context.params["t"], math.sqrt(sq0), math.sqrt(sq1), dot)


def merge_slerp(context: TensorContext, chunk: Chunk, coefficients: tuple[float, float]) -> ChunkResult:
    a, b = coefficients
    return ChunkResult(chunk.experts[0].mul_(b).add_(chunk.base, alpha=a))


METHOD = MergeMethod(
    name="slerp",
    summary="spherical interpolation between base_model and one other model, by t",
    merge_chunk=merge_slerp,
    prepare=whole_tensor_geometry,
    params=(T,),
    min_models=1,
    max_models=1,
)
