"""Passthrough: one model's tensors as they are, optionally scaled (`scale`, with filters: e.g. 0 for o_proj).
With `slices`, the form that stacks layer ranges of models into a deeper one."""

from __future__ import annotations

from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, ParamSpec, TensorContext

SCALE = ParamSpec("scale", float, None, "multiply the tensor by this (auto: copied as it is)")


def merge_passthrough(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    scale = context.model_params[0]["scale"]
    tensor = chunk.experts[0]
    return ChunkResult(tensor if scale is None else tensor.mul_(scale))


METHOD = MergeMethod(
    name="passthrough",
    summary="one model's tensors as they are (times `scale` where given); with slices, stacks layer ranges",
    merge_chunk=merge_passthrough,
    params=(SCALE,),
    needs_base=False,
    max_models=1,
)
