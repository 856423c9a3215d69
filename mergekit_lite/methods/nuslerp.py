"""NuSLERP: spherical interpolation of two models (or of their task vectors, with a base) at t = w1 / (w0 + w1):
over the whole tensor (`nuslerp_flatten`, the default), per row of the last axis, or (`nuslerp_row_wise`) per
vector along the first axis."""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import (WEIGHT, Chunk, ChunkResult, ChunkStream, MergeMethod, ParamSpec, TensorContext,
                                        fixed_order_gram)
from mergekit_lite.methods.sparsify import model_vectors

ROW_WISE = ParamSpec("nuslerp_row_wise", bool, False, "interpolate each vector along the first axis", scope="global")
FLATTEN = ParamSpec("nuslerp_flatten", bool, True, "interpolate the whole tensor as one vector", scope="global")
MIN_NORM = 1e-7  # mergekit's floor under a norm before normalising
COLINEAR = 1e-8  # |sin(angle)| below this: interpolate linearly


def interpolation_t(weights: list[float]) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def arc_coefficients(t: float, sq0: torch.Tensor, sq1: torch.Tensor, dot: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), elementwise over vectors, with a*v0 + b*v1 on the arc from v0 to v1 at fraction t."""
    cos = dot / (sq0.sqrt().clamp(min=MIN_NORM) * sq1.sqrt().clamp(min=MIN_NORM))
    theta = torch.acos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    colinear = sin.abs() < COLINEAR
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    a = torch.where(colinear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe)
    b = torch.where(colinear, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    return a, b


def tensor_coefficients(context: TensorContext, stream: ChunkStream) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Whole-tensor (flatten) or per-first-axis-vector (row_wise) coefficients, from sums over the chunks; None
    for per-row interpolation, which each chunk does alone. A whole tensor's sums are float64 dot products in a
    fixed order (`fixed_order_gram`), the same on any machine."""
    flatten, row_wise = context.params["nuslerp_flatten"], context.params["nuslerp_row_wise"]
    if not flatten and not row_wise and len(context.shape) > 1:
        return None
    sums = None
    for chunk in stream():
        if flatten or len(context.shape) <= 1:
            gram = fixed_order_gram(model_vectors(chunk))
            here = [torch.tensor(value, dtype=torch.float64) for value in (gram[0][0], gram[1][1], gram[0][1])]
        else:
            v0, v1 = (v.double() for v in model_vectors(chunk))
            here = [(v0 * v0).sum(0), (v1 * v1).sum(0), (v0 * v1).sum(0)]
        sums = here if sums is None else [a + b for a, b in zip(sums, here)]
    a, b = arc_coefficients(interpolation_t(context.per_model("weight")), *sums)
    return a.float(), b.float()


def merge_nuslerp(context: TensorContext, chunk: Chunk, coefficients: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> ChunkResult:
    v0, v1 = model_vectors(chunk)
    if coefficients is None:  # per row of the last axis
        t = interpolation_t(context.per_model("weight"))
        w0, w1 = v0.double(), v1.double()
        a, b = arc_coefficients(t, (w0 * w0).sum(-1, keepdim=True), (w1 * w1).sum(-1, keepdim=True),
                                (w0 * w1).sum(-1, keepdim=True))
        a, b = a.float(), b.float()
    else:
        a, b = coefficients
    merged = v0.mul_(a).add_(v1.mul_(b))  # v0 * a + v1 * b, in place
    return ChunkResult(merged if chunk.base is None else merged.add_(chunk.base))


METHOD = MergeMethod(
    name="nuslerp",
    summary="spherical interpolation of two models (of their task vectors with a base) at t = w1 / (w0 + w1)",
    merge_chunk=merge_nuslerp,
    prepare=tensor_coefficients,
    params=(WEIGHT, ROW_WISE, FLATTEN),
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
)
