"""DARE + task arithmetic: drop each task-vector entry with probability 1 - density, rescale survivors."""

from __future__ import annotations

from mergekit_lite import kernels
from mergekit_lite.methods.base import (
    INT8_MASK, LAMBDA, WEIGHT, Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext, density_param,
    normalize_param, rescale_param,
)
from mergekit_lite.methods.sparsify import merge_task_vectors, random_keep, task_vectors, tensor_seed

SEED = ParamSpec("seed", int, 0, "random seed for the drop masks (--seed overrides)", scope="global", minimum=0)
DARE_DENSITY = density_param(0.1, "keep probability of each task-vector entry (DARE drops 1 - density)")
DARE_PARAMS = (WEIGHT, DARE_DENSITY, LAMBDA, normalize_param(False), rescale_param(True), INT8_MASK, SEED)


def dare_drop(context: TensorContext, chunk: Chunk) -> tuple[list, list[float], list[int]]:
    """Each expert's task vector after a seeded random drop, rescaled by 1/density when `rescale`."""
    deltas, delta_sq = task_vectors(chunk)
    kept = []
    for index, (delta, density) in enumerate(zip(deltas, context.per_model("density"))):
        if density >= 1:
            kept.append(delta.numel())
            continue
        seed = tensor_seed(context.seed, context.name, index, chunk.start)
        kept.append(random_keep(delta, density, seed, rescale=context.params["rescale"]))
    return deltas, delta_sq, kept


def merge_dare(context: TensorContext, chunk: Chunk, *, elect: bool) -> ChunkResult:
    """DARE's drop, then the weighted sum or (elect) the TIES election; on the CPU in one fused pass (on float32
    chunks, or bfloat16 ones as stored), whose bits are those of the drop and merge_task_vectors done one after the
    other."""
    if chunk.delta_sq is None and kernels.usable_stored(chunk.base, *chunk.experts):
        seeds = [tensor_seed(context.seed, context.name, index, chunk.start) for index in range(len(chunk.experts))]
        return fused_dare(context, chunk, seeds, context.per_model("density"), context.params["rescale"], elect=elect)
    deltas, delta_sq, kept = dare_drop(context, chunk)
    return merge_task_vectors(context, chunk, deltas, delta_sq, kept, elect=elect)


def fused_dare(context: TensorContext, chunk: Chunk, seeds: list[int], densities: list[float], rescale: bool, *,
               elect: bool, drops: bool = True) -> ChunkResult:
    """The DARE kernel over a chunk (float32, or bfloat16 as stored): the drop at these densities (1 keeps every
    entry: task arithmetic, which reports no kept counts: drops False), the weights, then the election or the sum,
    lambda and the base."""
    merged, stats = kernels.dare_merge(
        chunk.base.reshape(-1), [expert.reshape(-1) for expert in chunk.experts], seeds, densities, rescale,
        context.per_model("weight"), elect, context.params["normalize"], context.params["lambda"],
    )
    return ChunkResult(merged.view(chunk.base.shape), kept=stats["kept"] if drops else None,
                       any_kept=stats["any_kept"] if elect else None, disagreed=stats["disagreed"] if elect else None,
                       delta_sq=stats["delta_sq"], result_delta_sq=stats["change_sq"], result_sq=stats["result_sq"],
                       nonfinite_inputs=stats["nonfinite_inputs"])


def merge_dare_linear(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    return merge_dare(context, chunk, elect=False)


METHOD = MergeMethod(
    name="dare_linear",
    summary="DARE random drop with rescaling, then task arithmetic",
    merge_chunk=merge_dare_linear,
    params=DARE_PARAMS,
    random=True,
    reads_stored=True,
)
