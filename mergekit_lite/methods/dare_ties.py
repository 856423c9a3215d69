"""DARE + TIES: random drop with rescaling, then the TIES sign election and disjoint merge."""

from __future__ import annotations

from mergekit_lite.methods.base import (
    INT8_MASK,
    LAMBDA,
    WEIGHT,
    MergeInputs,
    MergeMethod,
    MergeOutput,
    normalize_param,
    rescale_param,
)
from mergekit_lite.methods.dare_linear import DARE_DENSITY, SEED, dare_deltas
from mergekit_lite.methods.sparsify import merge_task_vectors


def merge_dare_ties(inputs: MergeInputs) -> MergeOutput:
    deltas, kept = dare_deltas(inputs)
    return merge_task_vectors(inputs, deltas, kept, elect=True)


METHOD = MergeMethod(
    name="dare_ties",
    summary="DARE random drop with rescaling, then TIES sign election",
    merge=merge_dare_ties,
    params=(WEIGHT, DARE_DENSITY, LAMBDA, normalize_param(False), rescale_param(True), INT8_MASK, SEED),
    random=True,
)
