"""What a tensor-wise merge method is: its parameters, an optional whole-tensor statistics pass, and a pure
function that merges one chunk of rows.

The engine streams each tensor as chunks of whole rows (float32, on the compute device), so memory does not
grow with tensor size. A method that needs a statistic of the whole tensor (a magnitude threshold, a norm,
a cosine) computes it in `prepare` from a re-readable stream of the same chunks, then `merge_chunk` uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from mergekit_lite import kernels
from mergekit_lite.params import ParamSpec


@dataclass
class TensorContext:
    """What a method knows about the whole tensor it is merging."""

    name: str
    shape: tuple[int, ...]
    model_params: list[dict[str, Any]]  # per expert, resolved for this tensor
    params: dict[str, Any]  # recipe-wide, resolved for this tensor
    seed: int = 0
    model_state: Any = None  # what the method's whole-model pass computed, if it has one

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def per_model(self, key: str) -> list[Any]:
        return [p[key] for p in self.model_params]


@dataclass
class Chunk:
    """Rows [start, start + rows) of one tensor, float32, for the base (if any) and every expert. For a method
    with `reads_stored`, on the CPU with the kernels built, they may instead be bfloat16 rows as stored (all of
    them, and the output bfloat16 too): its kernels widen them a block at a time.

    In `merge_chunk` the experts belong to the method, which may overwrite them (the base may not be
    changed: the engine measures the result against it). In `prepare` the only change allowed is turning
    the experts into task vectors through `sparsify.task_vectors`, which records it in `delta_sq`, so the
    merge pass over the same chunk does not subtract again.
    """

    start: int
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    delta_sq: list[float] | None = None  # set once the experts hold task vectors: their squared norms


ChunkStream = Callable[[], Iterator[Chunk]]  # each call yields freshly read chunks


@dataclass
class ChunkResult:
    """A merged chunk and the counts the report aggregates over the whole tensor."""

    tensor: torch.Tensor
    kept: list[int] | None = None  # entries kept per expert after sparsification
    any_kept: int | None = None  # entries some expert kept (sign election methods)
    disagreed: int | None = None  # of those, entries where a kept expert had the minority sign
    delta_sq: list[float] | None = None  # squared norm of each expert's task vector in this chunk
    result_delta_sq: float | None = None  # squared norm of (result - base), when the method has it at hand
    result_sq: float | None = None  # squared norm of the result, when the method has it at hand
    nonfinite_inputs: int = 0  # NaN and Inf among the rows as stored of a chunk in bfloat16 (which were not checked)


@dataclass
class MergeOutput:
    """A whole merged tensor with its statistics (the result of `MergeMethod.merge`)."""

    tensor: torch.Tensor
    kept_fraction: list[float] | None = None
    sign_agreement: float | None = None


# A whole-model pass: called with a function that yields, tensor by tensor, (context, chunk stream).
ModelPass = Callable[[Callable[[], Iterator[tuple[TensorContext, ChunkStream]]]], Any]


@dataclass(frozen=True)
class SplitModelPass:
    """The whole-model pass of a method, split so that workers each see some tensors (a Ray cluster): in each
    round every worker answers `part(question, tensors)` over its tensors, and `reduce(question, answers)` gives
    (True, the model state) or (False, the next round's question). The first question is None."""

    part: Callable[[Any, Iterator[tuple[TensorContext, ChunkStream]]], Any]
    reduce: Callable[[Any, list[Any]], tuple[bool, Any]]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    merge_chunk: Callable[[TensorContext, Chunk, Any], ChunkResult]
    params: tuple[ParamSpec, ...] = ()
    prepare: Callable[[TensorContext, ChunkStream], Any] | None = None  # whole-tensor statistics pass
    needs_base: bool = True
    optional_base: bool = False  # without needs_base: uses base_model when the recipe gives one
    base_as_input: bool = False  # base_model, when given, is one more input (as mergekit adds it), not a reference
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # uses the seed
    prepare_model: ModelPass | None = None  # optional first pass over the whole model
    needs_model_pass: Callable[[dict], bool] = field(default=lambda params: False)
    split_model_pass: SplitModelPass | None = None  # the same pass across workers, with the same result
    reads_stored: bool = False  # merge_chunk and prepare take bfloat16 chunks as stored (see Chunk)

    def merge(self, context: TensorContext, base: torch.Tensor | None, experts: list[torch.Tensor]) -> MergeOutput:
        """Merge whole in-memory tensors as one chunk: the library entry for callers that hold tensors."""

        chunk = Chunk(0, None if base is None else base.float(), [e.float().clone() for e in experts])
        state = self.prepare(context, lambda: iter([chunk])) if self.prepare is not None else None
        result = self.merge_chunk(context, chunk, state)
        return MergeOutput(result.tensor, *summarize_counts(result, context.numel))


def summarize_counts(result: ChunkResult, numel: int) -> tuple[list[float] | None, float | None]:
    kept = [k / numel for k in result.kept] if result.kept is not None and numel else None
    agreement = None
    if result.any_kept is not None:
        agreement = 1.0 if result.any_kept == 0 else 1.0 - result.disagreed / result.any_kept
    return kept, agreement


WEIGHT = ParamSpec("weight", float, 1.0, "scale of this model's contribution (negative subtracts it)")
LAMBDA = ParamSpec("lambda", float, 1.0, "global scale applied to the merged task vector", scope="global")
INT8_MASK = ParamSpec("int8_mask", bool, False, "accepted for mergekit recipes; masks are always exact here", scope="global")


def density_param(default: float, help: str) -> ParamSpec:
    return ParamSpec("density", float, default, help, minimum=0.0, maximum=1.0, exclusive_minimum=True)


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, "divide by the sum of the (agreeing) weights", scope="global")


def rescale_param(default: bool) -> ParamSpec:
    return ParamSpec("rescale", bool, default, "divide kept entries by their keep probability", scope="global")


DOT_BLOCK = 4096


def per_entry_statistic(numel: int, stream: ChunkStream, compute: Callable[[Chunk, torch.Tensor], Any]
                        ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """A per-entry statistic of a whole tensor (`compute(chunk, out)` writes a chunk's, flattened, into `out`),
    computed once into one float32 buffer of `numel` entries, and each chunk's part as a view of it by the chunk's
    first row: a method that selects by the statistic and then merges by it does not compute it again."""
    values, by_chunk, filled = None, {}, 0
    for chunk in stream():
        if values is None:
            values = torch.empty(numel, dtype=torch.float32, device=chunk.experts[0].device)
        size = chunk.experts[0].numel()
        by_chunk[chunk.start] = values[filled:filled + size]
        compute(chunk, by_chunk[chunk.start])
        filled += size
    return values, by_chunk


def fixed_order_gram(vectors: list[torch.Tensor]) -> list[list[float]]:
    """Every pairwise dot product of `vectors`, with a result that depends neither on the thread count nor on the C
    kernels: products of float32 values are exact in float64; each block of DOT_BLOCK entries is summed in index
    order (a loop in the kernel, a cumulative sum on the torch path: the same additions), and the block sums are
    added exactly (math.fsum). BLAS and torch split a long reduction across threads, so a plain dot's rounding,
    and a method's output bytes, would follow the machine."""
    flat = [vector.reshape(-1) for vector in vectors]
    count = len(flat)
    if kernels.usable(*flat) and count <= kernels.GRAM_MAX_VECTORS:
        sums = kernels.block_gram(flat, DOT_BLOCK)
    else:
        wide = []
        for vector in flat:
            widened = vector.double()
            pad = -widened.numel() % DOT_BLOCK
            wide.append((torch.nn.functional.pad(widened, (0, pad)) if pad else widened).view(-1, DOT_BLOCK))
        scratch = torch.empty_like(wide[0])
        sums = torch.stack([torch.mul(wide[i], wide[j], out=scratch).cumsum(1)[:, -1].cpu()
                            for i in range(count) for j in range(i, count)])
    products = [[0.0] * count for _ in range(count)]
    pair = 0
    for i in range(count):
        for j in range(i, count):
            products[i][j] = products[j][i] = math.fsum(sums[pair].tolist())
            pair += 1
    return products
