"""Plan the output tensors, stream inputs through the device chunk by chunk, call the method, write results.

Each tensor is processed as chunks of whole rows (about a million elements), read with plain file reads
straight from the input shards: memory is a few chunks per input, whatever the size of the tensor or the
model. The next chunk is read in a background thread while the current one is computed, and each merged
chunk goes to its final offset in the output file at once.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

from mergekit_lite import kernels
from mergekit_lite.checkpoint import Checkpoint, CheckpointWriter, TensorSpec, open_reference
from mergekit_lite.checkpoint.files import same_path
from mergekit_lite.checkpoint.writer import DEFAULT_SHARD_BYTES, check_output_path
from mergekit_lite.device import resolve_device
from mergekit_lite.errors import UserError
from mergekit_lite.layers import count_layers, is_embedding, is_token_embedding, layer_index, must_stay_positive
from mergekit_lite.methods import Chunk, MergeMethod, TensorContext, get_method
from mergekit_lite.methods.base import ChunkResult, summarize_counts
from mergekit_lite.params import recipe_params
from mergekit_lite.pipeline import Progress, SilentProgress
from mergekit_lite.recipe import DTYPES, Recipe
from mergekit_lite.vocab import (MODEL_TOKEN, VocabAlignment, align, aligned_model_rows, model_rows, runs,
                                 stand_in_rows)
from mergekit_lite.vocab_build import Vocabularies, token_settings

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_ELEMENTS = 1 << 20
# A tensor up to this size is read once and kept for a method's statistics pass and its merge pass.
REPLAY_ELEMENTS = 1 << 22


@dataclass
class Sources:
    """The opened inputs: an optional base, the experts, and which recipe entry each expert came from."""

    base: Checkpoint | None
    experts: list[Checkpoint]
    entry_of_expert: list[int | None]  # None: the base model, added as an input (base_as_input)

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose tensor names, shapes and config the output follows."""
        return self.base if self.base is not None else self.experts[0]


@dataclass
class TensorInputs:
    """Where one output tensor is read from when it is not the same-named tensor of every source: a slice's
    layer, renumbered, of its own models."""

    base: tuple[Checkpoint, str] | None
    experts: list[tuple[Checkpoint, str]]


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    merge: bool  # False: copied from the reference (non-float tensors)
    missing_in: list[int] = field(default_factory=list)  # experts lacking the tensor: they contribute no change
    row_aligned: list[int] = field(default_factory=list)  # experts whose vocab rows were cut or padded to the base's
    read_as: dict[int, str] = field(default_factory=dict)  # expert -> the tensor it stores this one under (tied head)
    positive: bool = False  # a statistic that must stay > 0 (batch-norm variance): kept from the reference if not
    model_params: list[dict[str, Any]] = field(default_factory=list)  # per expert, resolved for this tensor
    params: dict[str, Any] = field(default_factory=dict)  # recipe-wide, resolved for this tensor
    by_token: VocabAlignment | None = None  # rows put in the output vocabulary's order (a merge that writes a tokenizer)
    inputs: TensorInputs | None = None  # read from these rather than the plan's sources (layer slices)

    def source_name(self, expert: int) -> str:
        return self.read_as.get(expert, self.name)

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.dtype, self.shape).nbytes


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    sources: Sources
    tensors: list[TensorPlan]
    num_layers: int
    warnings: list[str]
    params: dict[str, Any] = field(default_factory=dict)  # recipe-wide, resolved with no tensor in view
    vocab_size: int | None = None  # the output's vocabulary rows, when embeddings are aligned by token
    config_updates: dict[str, Any] = field(default_factory=dict)  # e.g. the layer count of a sliced merge
    layer_plan: list[dict[str, Any]] | None = None  # a sliced merge: output layers and where they come from

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def close(self) -> None:
        """Close every input the plan opened."""
        for ckpt in [self.sources.base, *self.sources.experts]:
            if ckpt is not None:
                ckpt.close()


def open_sources(recipe: Recipe, method: MergeMethod, allow_pickle: bool = False) -> Sources:
    """Open the inputs. Methods without a base (linear) mix every listed model, the base_model too if listed;
    the others skip a model entry that names the base, however it is spelled (`base`, `base/`, a link)."""
    uses_base = (method.needs_base or method.optional_base) and recipe.base_model is not None
    base = open_reference(recipe.base_model, allow_pickle=allow_pickle) if uses_base else None
    experts, entries = [], []
    for index, entry in enumerate(recipe.models):
        if uses_base and same_path(entry.model, recipe.base_model):
            continue
        experts.append(open_reference(entry.model, allow_pickle=allow_pickle))
        entries.append(index)
    if method.base_as_input and recipe.base_model is not None and not any(
            same_path(entry.model, recipe.base_model) for entry in recipe.models):
        experts.append(open_reference(recipe.base_model, allow_pickle=allow_pickle))
        entries.append(None)  # no model entry: its per-model parameters are the recipe-wide ones
    return Sources(base=base, experts=experts, entry_of_expert=entries)


def output_dtype(recipe: Recipe, source: torch.dtype) -> torch.dtype:
    """out_dtype, else dtype, else the reference tensor's own dtype; non-float tensors keep theirs."""
    name = recipe.out_dtype or recipe.dtype
    if not source.is_floating_point or name is None:
        return source
    return TORCH_DTYPES[DTYPES[name]]


def plan_merge(recipe: Recipe, allow_pickle: bool = False, allow_crimes: bool = False,
               vocabularies: Vocabularies | None = None) -> MergePlan:
    """Open every input and decide, from headers alone, what each output tensor is and how it is made. With
    `vocabularies` (a merge that writes its own tokenizer), embedding rows are aligned by token."""
    method = get_method(recipe.merge_method)
    sources = open_sources(recipe, method, allow_pickle)
    try:
        return _plan(recipe, method, sources, allow_crimes, vocabularies)
    except BaseException:
        for ckpt in [sources.base, *sources.experts]:
            if ckpt is not None:
                ckpt.close()
        raise


def _plan(recipe: Recipe, method: MergeMethod, sources: Sources, allow_crimes: bool,
          vocabularies: Vocabularies | None) -> MergePlan:
    reference = sources.reference
    warnings: list[str] = list(recipe.warnings)  # what checking the recipe found harmless but worth saying
    if not reference.tensors:
        raise UserError(f"{reference.path}: holds no tensors; there is nothing to merge")
    for expert in sources.experts:
        check_same_architecture(reference, expert, allow_crimes, warnings)
    plans = []
    kept_as_is = []
    num_layers = count_layers(reference.config, reference.tensors)
    token_rows = _token_rows(recipe, sources, vocabularies) if vocabularies is not None else None
    vocab_size = (reference.config or {}).get("vocab_size")
    for name, info in reference.tensors.items():
        # Integer and boolean tensors (quantisation tables, masks, position ids) are not averaged as numbers,
        # and nor is an empty tensor: they are copied from the reference, as mergekit does.
        merge = info.dtype.is_floating_point and info.numel > 0
        if not info.dtype.is_floating_point:
            kept_as_is.append(name)
        plan = TensorPlan(name=name, shape=info.shape, dtype=output_dtype(recipe, info.dtype), merge=merge,
                          positive=must_stay_positive(name))
        by_token = (token_rows is not None and merge and is_token_embedding(name) and len(info.shape) == 2
                    and (not isinstance(vocab_size, int) or info.shape[0] == vocab_size))
        if merge:  # the recipe is read here once: the engine streams from the plan
            layer = layer_index(name)
            plan.model_params = [recipe_params(recipe, method, entry, name, layer, num_layers, as_model=True)
                                 for entry in sources.entry_of_expert]
            plan.params = recipe_params(recipe, method, None, name, layer, num_layers)
        for index, expert in enumerate(sources.experts):
            other = expert.tensors.get(name)
            tied = tied_embedding_name(expert, name) if other is None else None
            if tied is not None:
                plan.read_as[index] = tied
                other = expert.tensors[tied]
            if other is not None and other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise UserError(
                    f"{expert.path}: tensor {name!r} is {str(other.dtype).removeprefix('torch.')} but {reference.path} "
                    f"stores it as {str(info.dtype).removeprefix('torch.')}; quantised or integer weights cannot be "
                    "merged with floating-point ones (dequantise first)")
            if other is None:
                if sources.base is None:
                    raise UserError(f"{expert.path}: has no tensor {name!r}, which {reference.path} has; {method.name} needs it in every model")
                plan.missing_in.append(index)
            elif other.shape != info.shape and not (by_token and _rows_differ_only(other.shape, info.shape)):
                if _rows_differ_only(other.shape, info.shape) and is_embedding(name):
                    plan.row_aligned.append(index)
                    if sources.base is None:  # no base to stand in for missing rows: the rows all models have
                        plan.shape = (min(plan.shape[0], other.shape[0]), *plan.shape[1:])
                else:
                    raise UserError(
                        f"{expert.path}: tensor {name!r} has shape {list(other.shape)} but {reference.path} has "
                        f"{list(info.shape)}; the models are of different architectures or sizes"
                    )
        if by_token:
            plan.by_token = token_rows(plan)
            plan.shape = (plan.by_token.total_rows, info.shape[1])
        if plan.missing_in:
            missing = ", ".join(str(sources.experts[i].path) for i in plan.missing_in)
            warnings.append(f"{name}: not in {missing}; those models contribute no change to it")
        if plan.row_aligned:
            aligned = ", ".join(str(sources.experts[i].path) for i in plan.row_aligned)
            warnings.append(f"{name}: vocabulary size differs in {aligned}; " + (
                f"rows aligned to {reference.path}" if sources.base is not None else
                f"the first {plan.shape[0]} rows, which every model has, are merged (tokenizer_source aligns by token)"))
        plans.append(plan)
    if kept_as_is:
        warnings.append(f"{len(kept_as_is)} integer or boolean tensor(s) copied from {reference.path}, not merged, "
                        f"e.g. {kept_as_is[0]!r}")
    extra = sorted({n for e in sources.experts for n in e.tensors if n not in reference.tensors})
    if extra:
        warnings.append(f"{len(extra)} tensor(s) not in {reference.path} are left out, e.g. {extra[0]!r}")
    aligned = [plan.by_token.total_rows for plan in plans if plan.by_token is not None]
    aligned += [plan.shape[0] for plan in plans if plan.by_token is None and is_token_embedding(plan.name)
                and plan.shape[0] != reference.tensors[plan.name].shape[0]]  # cut to the rows all models have
    if token_rows is not None and not any(plan.by_token is not None for plan in plans):
        warnings.append("no embedding tensor has the config's vocab_size rows: nothing was aligned by token")
    return MergePlan(recipe, method, sources, plans, num_layers, warnings,
                     recipe_params(recipe, method, None, "", None, num_layers), aligned[0] if aligned else None)


def _token_rows(recipe: Recipe, sources: Sources, vocabularies: Vocabularies) -> Callable[[TensorPlan], VocabAlignment]:
    """A function giving a vocabulary-indexed tensor's alignment: each aligned model's (the base first) row for
    every output token, and the stand-in rules of the recipe's token settings."""
    models = ([sources.base] if sources.base is not None else []) + sources.experts
    references = (([recipe.base_model] if sources.base is not None else [])
                  + [recipe.models[index].model if index is not None else recipe.base_model
                     for index in sources.entry_of_expert])
    vocabs = [vocabularies.vocabulary_of(ckpt.directory) for ckpt in models]
    settings = token_settings(vocabularies, references, vocabs)
    offset = 1 if sources.base is not None else 0

    def alignment(plan: TensorPlan) -> VocabAlignment:
        rows = []
        for index, ckpt in enumerate(models):
            expert = index - offset
            if expert >= 0 and expert in plan.missing_in:
                rows.append(np.full(len(vocabularies.output), -1, dtype=np.int64))
                continue
            name = plan.source_name(expert) if expert >= 0 else plan.name
            embedded = ckpt.tensors[name].shape[0]
            configured = (ckpt.config or {}).get("vocab_size")
            if isinstance(configured, int) and 0 < configured < embedded:
                embedded = configured
            rows.append(model_rows(vocabularies.output, vocabs[index], embedded))
        return align(rows, 0 if sources.base is not None else None, settings, vocabularies.pad_to_multiple_of)

    return alignment


_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def tied_embedding_name(ckpt: Checkpoint, name: str) -> str | None:
    """For an output head a checkpoint does not store because its config ties it to the input embedding,
    the embedding's name; else None."""
    if not name.endswith(("lm_head.weight", "embed_out.weight")):
        return None
    if not (ckpt.config or {}).get("tie_word_embeddings", False):
        return None
    return next((n for n in ckpt.tensors if n.endswith(_INPUT_EMBEDDINGS)), None)


def _architecture(ckpt: Checkpoint) -> str | None:
    config = ckpt.config or {}
    return config.get("architecture") or config.get("model_type")


def check_same_architecture(reference: Checkpoint, expert: Checkpoint, allow_crimes: bool = False,
                             warnings: list[str] | None = None) -> None:
    """Refuse models whose configs name different architectures (unless `allow_crimes`, mergekit's flag: then a
    warning), or that share under half the tensor names."""
    ours, theirs = _architecture(reference), _architecture(expert)
    if ours and theirs and ours != theirs:
        if not allow_crimes:
            raise UserError(f"{expert.path}: is a {theirs} model but {reference.path} is a {ours} model; they cannot "
                            "be merged (--allow-crimes merges them anyway where their tensors match)")
        if warnings is not None:
            warnings.append(f"{expert.path} is a {theirs} model, merged into a {ours} model (--allow-crimes)")
    shared = sum(1 for name in reference.tensors if name in expert.tensors)
    if shared * 2 < len(reference.tensors):
        raise UserError(
            f"{expert.path}: holds only {shared} of the {len(reference.tensors)} tensor names of {reference.path}; "
            "the models are of different architectures"
        )


def _rows_bytes(info, start: int, stop: int) -> int:
    return info.nbytes if len(info.shape) < 2 else (stop - start) * info.row_bytes


def _rows_differ_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 1 and a[1:] == b[1:] and a[0] != b[0]


def row_chunks(shape: tuple[int, ...], chunk_elements: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of about chunk_elements each; a 0-d or 1-d tensor is a single chunk.

    Depends on the shape alone, so seeded random methods give the same result on every run.
    """
    if len(shape) < 2 or math.prod(shape) == 0:
        return [(0, shape[0] if shape else 1)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


@dataclass
class Timings:
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    wait: float = 0.0
    prepare: float = 0.0


class BufferRing:
    """Two sets of reusable CPU buffers, one per chunk in flight (the one computed, the one being read).

    Reading every chunk into fresh memory from a second thread fragments the heap, and peak memory then
    drifts from run to run; reused buffers keep it flat. A chunk's tensors stay valid until the chunk
    after next is read, by which time the engine has written its result.
    """

    def __init__(self) -> None:
        self._sets: list[dict[tuple[int, torch.dtype], torch.Tensor]] = [{}, {}]
        self._turn = 0

    def next_set(self) -> dict[tuple[int, torch.dtype], torch.Tensor]:
        self._turn ^= 1
        return self._sets[self._turn]

    @staticmethod
    def buffer(buffers: dict, slot: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        current = buffers.get((slot, dtype))
        if current is None or current.numel() < numel:
            current = buffers[(slot, dtype)] = torch.empty(max(numel, 1), dtype=dtype)
        return current[:numel]


def _rows_of(chunk: Chunk, start: int, stop: int) -> Chunk:
    """Rows [start, stop) of a chunk that starts at row 0, as views."""
    if start == 0 and stop == (chunk.experts[0].shape[0] if chunk.experts[0].dim() else 1):
        return chunk
    view = lambda values: None if values is None else values[start:stop]  # noqa: E731
    return Chunk(start, view(chunk.base), [view(expert) for expert in chunk.experts])


def refuse_nonfinite(values: torch.Tensor, ckpt: Checkpoint, name: str, start: int) -> None:
    """Inputs holding NaN or Inf are refused: merged, they would silently spread into the result.

    A finite sum proves the chunk finite; only otherwise is the element-wise check paid for.
    """
    if values.numel() and not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise UserError(
            f"{ckpt.path}: tensor {name!r} holds {bad} NaN or Inf value(s) (from row {start}); "
            "refusing to merge it (repair or drop that model)"
        )


class ChunkReader:
    """Reads row chunks of one tensor from every input, as float32 on the device, one chunk ahead."""

    def __init__(self, plan: MergePlan, device: torch.device, timings: Timings, pool: ThreadPoolExecutor) -> None:
        self.plan = plan
        self.device = device
        self.timings = timings
        self.pool = pool
        self.ring = BufferRing() if device.type == "cpu" else None
        self._ahead: tuple[str, Any] | None = None  # (tensor name, future of its whole read)
        self._mean_rows: dict[str, list[torch.Tensor]] = {}  # by-token tensors with padding rows: each model's mean
        self._mean_lock = threading.Lock()

    def _raw(self, ckpt: Checkpoint, name: str, start: int, stop: int, buffers: dict | None, slot: int) -> torch.Tensor:
        """Rows as stored (e.g. bfloat16), read into this chunk's byte buffer for `slot` when there is one."""
        if buffers is None:
            return ckpt.read_rows(name, start, stop)
        out = BufferRing.buffer(buffers, slot, torch.uint8, _rows_bytes(ckpt.tensors[name], start, stop))
        return ckpt.read_rows(name, start, stop, out=out)

    def _float(self, raw: torch.Tensor, ckpt: Checkpoint, name: str, start: int, buffers: dict | None, slot: int) -> torch.Tensor:
        """Stored rows as float32 on the device, refused if they hold NaN or Inf."""
        if buffers is None:
            converted = raw.to(self.device).to(torch.float32)
        else:
            converted = BufferRing.buffer(buffers, slot, torch.float32, raw.numel()).view(raw.shape)
            if raw.dtype == torch.bfloat16 and raw.is_contiguous() and kernels.usable(converted):
                # One pass that widens and counts NaN/Inf, instead of a copy and a check.
                if kernels.widen_bfloat16(raw, converted):
                    refuse_nonfinite(converted, ckpt, name, start)
                return converted
            converted.copy_(raw)
        refuse_nonfinite(converted, ckpt, name, start)
        return converted

    def read_raw(self, tensor: TensorPlan, start: int, stop: int, buffers: dict | None) -> list[torch.Tensor | None]:
        """File reads only (the part worth a background thread): the base's rows, then each expert's
        (None for an expert that lacks the tensor)."""
        started = time.perf_counter()
        if tensor.by_token is not None:
            chunk = self._read_by_token(tensor, start, stop, self._padding_means(tensor))
            self._account(started)
            return [chunk]
        base, experts = self.inputs_of(tensor)
        raws: list[torch.Tensor | None] = [self._raw(*base, start, stop, buffers, 0) if base is not None else None]
        for index, source in enumerate(experts):
            if source is None:
                raws.append(None)
                continue
            expert, name = source
            stop_here = min(stop, expert.tensors[name].shape[0]) if index in tensor.row_aligned else stop
            raws.append(self._raw(expert, name, start, stop_here, buffers, index + 1) if start < stop_here else None)
        self._account(started)
        return raws

    def convert(self, tensor: TensorPlan, start: int, raws: list[torch.Tensor | None], buffers: dict | None) -> Chunk:
        """float32 chunk from the raw rows; done in the main thread, where torch's own threads do the work. For a
        method that reads rows as stored, bfloat16 rows stay as they are (see `keeps_stored`)."""
        if tensor.by_token is not None:
            return raws[0]
        if buffers is not None and self.keeps_stored(tensor, raws):
            return Chunk(start, raws[0], list(raws[1:]))
        base_source, sources = self.inputs_of(tensor)
        base = self._float(raws[0], *base_source, start, buffers, 0) if base_source is not None else None
        experts = []
        for index, source in enumerate(sources):
            raw = raws[index + 1]
            if source is None:  # the expert lacks this tensor: no change
                experts.append(base.clone())
                continue
            expert, name = source
            if index in tensor.missing_in:
                experts.append(base.clone())
            elif index in tensor.row_aligned and base is not None:
                aligned = base.clone()  # rows past the expert's vocabulary: no change
                if raw is not None:
                    aligned[: raw.shape[0]] = self._float(raw, expert, name, start, None, 0)
                experts.append(aligned)
            else:
                experts.append(self._float(raw, expert, name, start, buffers, index + 1))
        return Chunk(start, base, experts)

    def keeps_stored(self, tensor: TensorPlan, raws: list[torch.Tensor | None]) -> bool:
        """Whether a chunk goes to the method in bfloat16 as stored: the method's kernels widen it a block at a time
        and round the result once, instead of a widened copy of every input and a narrowing pass over the output.
        Only when every input and the output are bfloat16 and nothing is padded or aligned by token."""
        present = [raw for raw in raws if raw is not None]  # the base's is None when there is no base
        return (self.plan.method.reads_stored and tensor.dtype == torch.bfloat16 and not tensor.row_aligned
                and not tensor.missing_in and None not in raws[1:]
                and all(raw.dtype == torch.bfloat16 and raw.is_contiguous() for raw in present)
                and kernels.library() is not None)

    def refuse_stored_nonfinite(self, tensor: TensorPlan, start: int, stop: int) -> None:
        """A method found NaN or Inf among a chunk's rows as stored: name the input that holds them. The rows are
        read again, since the method has written its result over one of them."""
        base, experts = self.inputs_of(tensor)
        for ckpt, name in [source for source in (base, *experts) if source is not None]:
            refuse_nonfinite(self.copy_rows(ckpt, name, start, stop).float(), ckpt, name, start)
        raise UserError(f"tensor {tensor.name!r}: NaN or Inf among the inputs' rows from {start}; refusing to merge it")

    def inputs_of(self, tensor: TensorPlan) -> tuple[tuple[Checkpoint, str] | None, list[tuple[Checkpoint, str] | None]]:
        """(checkpoint, tensor name) of the base (None: no base) and of each expert (None: it lacks the tensor)."""
        if tensor.inputs is not None:
            return tensor.inputs.base, list(tensor.inputs.experts)
        sources = self.plan.sources
        base = (sources.base, tensor.name) if sources.base is not None else None
        return base, [None if index in tensor.missing_in else (expert, tensor.source_name(index))
                      for index, expert in enumerate(sources.experts)]

    def reference_of(self, tensor: TensorPlan) -> tuple[Checkpoint, str]:
        """Where a tensor that is copied rather than merged (or kept when a merge breaks it) is read from."""
        base, experts = self.inputs_of(tensor)
        if tensor.inputs is not None:
            return base if base is not None else experts[0]
        return self.plan.sources.reference, tensor.name

    def _aligned_inputs(self, tensor: TensorPlan) -> list[tuple[Checkpoint, str] | None]:
        """(checkpoint, tensor name) of each aligned model, the base first; None for an expert lacking it."""
        base, experts = self.inputs_of(tensor)
        return ([base] if base is not None else []) + experts

    def _read_by_token(self, tensor: TensorPlan, start: int, stop: int, means: list[torch.Tensor] | None) -> Chunk:
        """Rows [start, stop) of every model in the output vocabulary's order, stand-ins filled in."""
        alignment, inputs = tensor.by_token, self._aligned_inputs(tensor)
        vocab_stop = max(min(stop, alignment.vocab_rows), start)
        gathered = []
        for index, source in enumerate(inputs):
            rows = torch.zeros((vocab_stop - start, tensor.shape[1]), dtype=torch.float32)
            if source is not None:
                ckpt, name = source
                for position, first, count in runs(alignment.rows[index][start:vocab_stop]):
                    rows[position:position + count] = ckpt.read_rows(name, first, first + count).float()
                refuse_nonfinite(rows, ckpt, name, start)
            gathered.append(rows.to(self.device))
        named = {}
        for offset in np.flatnonzero(alignment.kind[start:vocab_stop] == MODEL_TOKEN).tolist():
            model, row = int(alignment.source_model[start + offset]), int(alignment.source_row[start + offset])
            ckpt, name = inputs[model]
            if not 0 <= row < ckpt.tensors[name].shape[0]:
                raise UserError(f"{ckpt.path}: tokenizer.tokens names row {row} of {name!r}, which has "
                                f"{ckpt.tensors[name].shape[0]} rows")
            named[(model, row)] = ckpt.read_rows(name, row, row + 1)[0].float().to(self.device)
        stand_in = stand_in_rows(alignment, start, stop, gathered, named)
        aligned = [aligned_model_rows(alignment, index, start, stop, rows, stand_in,
                                      means[index] if means is not None else None)
                   for index, rows in enumerate(gathered)]
        if self.inputs_of(tensor)[0] is None:
            return Chunk(start, None, aligned)
        base = aligned[0]
        experts = [base.clone() if inputs[index + 1] is None else rows for index, rows in enumerate(aligned[1:])]
        return Chunk(start, base, experts)

    def _padding_means(self, tensor: TensorPlan) -> list[torch.Tensor] | None:
        """Each aligned model's mean row over the vocabulary (the rows `pad_to_multiple_of` adds), computed once."""
        alignment = tensor.by_token
        if alignment.total_rows == alignment.vocab_rows:
            return None
        with self._mean_lock:
            if tensor.name not in self._mean_rows:
                totals = None
                for start, stop in row_chunks((alignment.vocab_rows, tensor.shape[1])):
                    chunk = self._read_by_token(tensor, start, stop, None)
                    rows = ([chunk.base] if chunk.base is not None else []) + chunk.experts
                    sums = [r.double().sum(0) for r in rows]
                    totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
                self._mean_rows[tensor.name] = [(t / alignment.vocab_rows).float() for t in totals]
            return self._mean_rows[tensor.name]

    def read(self, tensor: TensorPlan, start: int, stop: int, buffers: dict | None = None) -> Chunk:
        return self.convert(tensor, start, self.read_raw(tensor, start, stop, buffers), buffers)

    def _account(self, started: float) -> None:
        """Reads in the background overlap compute; reads in the main thread are time spent waiting on I/O."""
        elapsed = time.perf_counter() - started
        self.timings.read += elapsed
        if threading.current_thread() is threading.main_thread():
            self.timings.wait += elapsed

    def copy_rows(self, ckpt: Checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
        started = time.perf_counter()
        rows = ckpt.read_rows(name, start, stop)
        self._account(started)
        return rows

    def stream(self, tensor: TensorPlan) -> Iterator[Chunk]:
        """Every chunk of a tensor in order, the next one read in the background while this one is used."""
        ranges = row_chunks(tensor.shape)
        buffers = self._buffers()
        pending = self.pool.submit(self.read_raw, tensor, *ranges[0], buffers)
        for position in range(len(ranges)):
            waited = time.perf_counter()
            raws = pending.result()
            self.timings.wait += time.perf_counter() - waited
            current = buffers
            if position + 1 < len(ranges):
                buffers = self._buffers()
                pending = self.pool.submit(self.read_raw, tensor, *ranges[position + 1], buffers)
            yield self.convert(tensor, ranges[position][0], raws, current)

    def _buffers(self) -> dict | None:
        return self.ring.next_set() if self.ring is not None else None

    def replayable(self, tensor: TensorPlan, following: TensorPlan | None = None
                   ) -> tuple[Callable[[], Iterator[Chunk]], list[Chunk] | None]:
        """A re-readable chunk stream for whole-tensor statistics. A single-chunk tensor is read once and the
        same chunk is returned for the merge pass, instead of being read again."""
        ranges = row_chunks(tensor.shape)
        if not self.holds_whole(tensor):
            return (lambda: self.stream(tensor)), None
        if self._ahead is not None and self._ahead[0] == tensor.name:
            waited = time.perf_counter()
            whole = self._ahead[1].result()
            self.timings.wait += time.perf_counter() - waited
        else:
            whole = self.read(tensor, 0, ranges[-1][1], self._buffers())
        self._ahead = None
        if following is not None and self.ring is not None and self.holds_whole(following):
            # Read the next tensor into the other buffer set while this one is merged.
            rows = row_chunks(following.shape)[-1][1]
            self._ahead = (following.name, self.pool.submit(self.read, following, 0, rows, self._buffers()))
        chunks = [_rows_of(whole, start, stop) for start, stop in ranges]
        return (lambda: iter(chunks)), chunks

    @staticmethod
    def holds_whole(tensor: TensorPlan) -> bool:
        """Whether a tensor is read whole once (small enough) rather than streamed in chunks."""
        return len(row_chunks(tensor.shape)) == 1 or math.prod(tensor.shape) <= REPLAY_ELEMENTS


@dataclass
class TensorAccumulator:
    """Per-tensor statistics summed over chunks."""

    name: str
    numel: int
    norm_sq: float = 0.0
    delta_sq: float = 0.0
    expert_delta_sq: list[float] | None = None
    kept: list[int] | None = None
    any_kept: int | None = None
    disagreed: int | None = None
    nonfinite: bool = False

    def add(self, result: ChunkResult, merged: torch.Tensor, base: torch.Tensor | None) -> None:
        if result.result_sq is not None and math.isfinite(result.result_sq):
            norm_sq, finite = result.result_sq, True  # a finite sum of squares: every entry is finite
        else:
            norm_sq, finite = float(torch.dot(_flat_float(merged), _flat_float(merged))), False
        self.norm_sq += norm_sq
        if result.result_delta_sq is not None:
            self.delta_sq += result.result_delta_sq
        elif base is not None:
            diff = _flat_float(merged) - _flat_float(base)
            self.delta_sq += float(torch.dot(diff, diff))
        self.expert_delta_sq = _sum_lists(self.expert_delta_sq, result.delta_sq)
        self.kept = _sum_lists(self.kept, result.kept)
        if result.any_kept is not None:
            self.any_kept = (self.any_kept or 0) + result.any_kept
            self.disagreed = (self.disagreed or 0) + result.disagreed
        # A finite sum means no NaN or Inf; only when it is not is the element-wise check worth its cost.
        if not finite and not self.nonfinite and not bool(torch.isfinite(merged.sum())):
            self.nonfinite = not bool(torch.isfinite(merged).all())

    def summary(self, has_base: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "norm": math.sqrt(self.norm_sq)}
        if has_base:
            entry["delta_norm"] = math.sqrt(self.delta_sq)
        if self.expert_delta_sq is not None:
            entry["expert_delta_norms"] = [math.sqrt(v) for v in self.expert_delta_sq]
        counts = ChunkResult(torch.empty(0), self.kept, self.any_kept, self.disagreed)
        kept, agreement = summarize_counts(counts, self.numel)
        if kept is not None:
            entry["kept_fraction"] = kept
        if agreement is not None:
            entry["sign_agreement"] = agreement
        return entry


def _flat_float(values: torch.Tensor) -> torch.Tensor:
    """A chunk flattened, in float32 (a chunk merged as stored is bfloat16; a float32 one is not copied)."""
    return values.reshape(-1).float()


def _sum_lists(total, part):
    if part is None:
        return total
    return list(part) if total is None else [a + b for a, b in zip(total, part)]


@dataclass
class MergeResult:
    plan: MergePlan
    tensor_stats: list[dict[str, Any]]
    timings: Timings
    device: torch.device
    seed: int
    files: list[str]
    wall_seconds: float
    nonfinite: list[str]
    resumed: int = 0  # tensors kept from an interrupted run
    reverted: list[str] = field(default_factory=list)  # positive statistics the merge broke, kept from the reference
    nodes: list[str] = field(default_factory=list)  # a Ray run: the node that merged each shard
    first_pass_rounds: int = 0  # a Ray run: rounds of tasks the whole-model first pass took


def tensor_context(tensor: TensorPlan, seed: int, model_state: Any = None) -> TensorContext:
    """What a method sees of one tensor: its name, shape and the parameters planning resolved for it."""
    return TensorContext(tensor.name, tensor.shape, tensor.model_params, tensor.params, seed=seed,
                         model_state=model_state)


def run_merge(
    plan: MergePlan,
    out_dir: Path,
    *,
    device: str = "auto",
    force: bool = False,
    seed: int | None = None,
    shard_bytes: int | None = None,
    progress: Progress | None = None,
    finalize: Callable[[MergeResult, CheckpointWriter], None] | None = None,
    resume: bool = False,
    fingerprint: str = "",
) -> MergeResult:
    """Merge according to `plan` into `out_dir`; `finalize` may add files before the output is published.

    With `resume`, tensors that an interrupted run with the same `fingerprint` already wrote (and whose
    checksums still match) are kept, and only the rest are computed.
    """
    progress = progress or SilentProgress()
    recipe, method = plan.recipe, plan.method
    check_output_path(out_dir, force)
    dev = resolve_device(device if device != "auto" or recipe.device is None else recipe.device)
    seed = choose_seed(seed, recipe)
    timings = Timings()
    started = time.perf_counter()
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    stats: list[dict[str, Any]] = []
    nonfinite: list[str] = []
    reverted: list[str] = []
    writer = CheckpointWriter(out_dir, specs, max_shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES, force=force,
                              metadata={"merged_with": f"mergekit_lite {method.name}"}, resume=resume,
                              fingerprint=fingerprint)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
            reader = ChunkReader(plan, dev, timings, pool)
            model_state = _model_pass(plan, reader, seed, progress, timings)
            progress.start(len(plan.tensors), plan.total_bytes, f"merging with {method.name}")
            loop_started, waited_before = time.perf_counter(), timings.wait
            with writer:
                for position, tensor in enumerate(plan.tensors):
                    if tensor.name in writer.completed:
                        stats.append(writer.completed[tensor.name])
                        if writer.completed[tensor.name].get("kept_from") is not None:
                            reverted.append(tensor.name)
                        progress.advance(tensor.nbytes)
                        continue
                    if tensor.merge:
                        following = _next_to_merge(plan.tensors, position, writer.completed)
                        entry = _merge_tensor(plan, tensor, reader, writer, seed, model_state, timings, following)
                        if entry.pop("nonfinite"):
                            nonfinite.append(tensor.name)
                        if entry.get("kept_from") is not None:
                            reverted.append(tensor.name)
                    else:
                        entry = _copy_tensor(plan, tensor, reader, writer, timings)
                    entry.update(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
                    stats.append(entry)
                    writer.record(tensor.name, entry)
                    progress.advance(tensor.nbytes)
                loop = time.perf_counter() - loop_started
                timings.compute = loop - (timings.wait - waited_before) - timings.write
                result_info = MergeResult(plan, stats, timings, dev, seed, writer.files, time.perf_counter() - started,
                                          nonfinite, resumed=len(writer.completed), reverted=reverted)
                if finalize is not None:
                    finalize(result_info, writer)
    finally:
        progress.stop()
        plan.close()
    result_info.wall_seconds = time.perf_counter() - started
    return result_info


class RowWriter(Protocol):
    """Where merged rows go: the checkpoint writer, or one Ray task's view of the output's shard files."""

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None: ...


def merge_named(plan: MergePlan, names: list[str], writer: RowWriter, device: str, seed: int,
                model_state: Any = None) -> list[dict[str, Any]]:
    """Merge (or copy) the planned tensors `names`, in plan order, into `writer`; their report entries (with
    `nonfinite` and `kept_from` as the local run records them). The unit of work of one Ray task."""
    wanted = set(names)
    tensors = [t for t in plan.tensors if t.name in wanted]
    timings = Timings()
    entries = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
        reader = ChunkReader(plan, resolve_device(device), timings, pool)
        for position, tensor in enumerate(tensors):
            if tensor.merge:
                following = tensors[position + 1] if position + 1 < len(tensors) else None
                following = following if following is not None and following.merge else None
                entry = _merge_tensor(plan, tensor, reader, writer, seed, model_state, timings, following)
            else:
                entry = _copy_tensor(plan, tensor, reader, writer, timings)
            entry.update(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
            entries.append(entry)
    return entries


def first_pass(plan: MergePlan, device: str, seed: int, progress: Progress) -> tuple[Any, float]:
    """The method's whole-model first pass (None when it has none), and its seconds: run once by the driver of a
    distributed merge, whose tasks all receive its result."""
    timings = Timings()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
        state = _model_pass(plan, ChunkReader(plan, resolve_device(device), timings, pool), seed, progress, timings)
    return state, timings.prepare


def model_pass_part(plan: MergePlan, names: list[str], device: str, seed: int, question: Any) -> Any:
    """One worker's answer, over the planned tensors `names`, to a round of the method's split whole-model pass
    (`MergeMethod.split_model_pass`): the first-pass unit of work of one Ray task."""
    wanted = set(names)
    timings = Timings()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
        reader = ChunkReader(plan, resolve_device(device), timings, pool)
        tensors = ((tensor_context(tensor, seed), (lambda tensor=tensor: reader.stream(tensor)))
                   for tensor in plan.tensors if tensor.merge and tensor.name in wanted)
        return plan.method.split_model_pass.part(question, tensors)


def needs_model_pass(plan: MergePlan) -> bool:
    method = plan.method
    return method.prepare_model is not None and method.needs_model_pass(plan.params)


def _next_to_merge(tensors: list[TensorPlan], position: int, completed: dict) -> TensorPlan | None:
    """The tensor merged right after the one at `position`, if it is the very next in the plan."""
    following = tensors[position + 1] if position + 1 < len(tensors) else None
    return following if following is not None and following.merge and following.name not in completed else None


def _merge_tensor(plan: MergePlan, tensor: TensorPlan, reader: ChunkReader, writer: CheckpointWriter, seed: int,
                  model_state: Any, timings: Timings, following: TensorPlan | None = None) -> dict[str, Any]:
    method = plan.method
    context = tensor_context(tensor, seed, model_state)
    stream, cached = reader.replayable(tensor, following)
    state = method.prepare(context, stream) if method.prepare is not None else None
    chunks = iter(cached) if cached is not None else reader.stream(tensor)
    stats = TensorAccumulator(tensor.name, context.numel)
    kept_from = None
    for chunk in chunks:
        result = method.merge_chunk(context, chunk, state)
        if result.nonfinite_inputs:
            reader.refuse_stored_nonfinite(tensor, chunk.start, chunk.start + _rows_in(result.tensor))
        if tensor.positive and not bool((result.tensor > 0).all()):  # NaN fails the test too
            reference, name = reader.reference_of(tensor)
            stop = chunk.start + _rows_in(result.tensor)
            result = ChunkResult(reader.copy_rows(reference, name, chunk.start, stop).to(result.tensor))
            kept_from = str(reference.path)
        stats.add(result, result.tensor, chunk.base)
        _write(writer, tensor, chunk.start, result.tensor, timings)
    entry = stats.summary(reader.inputs_of(tensor)[0] is not None)
    entry["nonfinite"] = stats.nonfinite
    if kept_from is not None:
        entry["kept_from"] = kept_from
    return entry


def _rows_in(rows: torch.Tensor) -> int:
    """How many rows a merged chunk holds (a 0-d or 1-d tensor is one chunk of one row)."""
    return rows.shape[0] if rows.dim() > 1 else 1


def _copy_tensor(plan: MergePlan, tensor: TensorPlan, reader: ChunkReader, writer: CheckpointWriter,
                 timings: Timings) -> dict[str, Any]:
    reference, name = reader.reference_of(tensor)
    for start, stop in row_chunks(tensor.shape):
        _write(writer, tensor, start, reader.copy_rows(reference, name, start, stop), timings)
    return {"name": tensor.name, "copied_from": str(reference.path)}


def _write(writer: CheckpointWriter, tensor: TensorPlan, start: int, rows: torch.Tensor, timings: Timings) -> None:
    clock = time.perf_counter()
    writer.write_rows(tensor.name, start, rows.to(tensor.dtype).cpu())
    timings.write += time.perf_counter() - clock


def _model_pass(plan: MergePlan, reader: ChunkReader, seed: int, progress: Progress, timings: Timings) -> Any:
    """The method's whole-model first pass, when the recipe asks for one (e.g. TIES trim_scope: model)."""
    method = plan.method
    if not needs_model_pass(plan):
        return None
    started = time.perf_counter()
    merged = [t for t in plan.tensors if t.merge]

    def tensors() -> Iterator[tuple[TensorContext, Callable[[], Iterator[Chunk]]]]:
        for tensor in merged:
            yield tensor_context(tensor, seed), (lambda tensor=tensor: reader.stream(tensor))

    progress.start(len(merged), 0, "first pass over the model")
    state = method.prepare_model(tensors)
    progress.stop()
    timings.prepare = time.perf_counter() - started
    return state


def choose_seed(seed: int | None, recipe: Recipe) -> int:
    if seed is not None:
        return seed
    if recipe.seed is not None:
        return recipe.seed
    value = recipe.parameters.get("seed", 0)
    return int(value) if isinstance(value, (int, float)) else 0
