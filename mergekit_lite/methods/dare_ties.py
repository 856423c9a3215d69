"""DARE + TIES: random drop with rescaling, then the TIES sign election and disjoint merge."""

from __future__ import annotations

from mergekit_lite.methods.base import Chunk, ChunkResult, MergeMethod, TensorContext
from mergekit_lite.methods.dare_linear import DARE_PARAMS, merge_dare


def merge_dare_ties(context: TensorContext, chunk: Chunk, _state: None) -> ChunkResult:
    return merge_dare(context, chunk, elect=True)


METHOD = MergeMethod(
    name="dare_ties",
    summary="DARE random drop with rescaling, then TIES sign election",
    merge_chunk=merge_dare_ties,
    params=DARE_PARAMS,
    random=True,
    reads_stored=True,
)
