"""Plan the output tensors, stream inputs through the device, call the method, hand results to the writer.

Memory is bounded by the inputs of one tensor (a base and T experts, in float32) plus a few working copies,
whatever the model size: the next tensor's inputs are read in a background thread while the current one
is computed, and each result goes to its final place in the output file as soon as it exists.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from mergekit_lite.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    TensorSpec,
    open_checkpoint,
)
from mergekit_lite.checkpoint.writer import DEFAULT_SHARD_BYTES, check_output_path
from mergekit_lite.device import resolve_device
from mergekit_lite.errors import UserError
from mergekit_lite.layers import count_layers, layer_index
from mergekit_lite.methods import MergeInputs, MergeMethod, get_method
from mergekit_lite.recipe import DTYPES, Recipe, is_embedding, recipe_params

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Progress(Protocol):
    def start(self, tensors: int, nbytes: int, label: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def stop(self) -> None: ...


class _Silent:
    def start(self, tensors: int, nbytes: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class Sources:
    """The opened inputs: an optional base, the experts, and which recipe entry each expert came from."""

    base: Checkpoint | None
    experts: list[Checkpoint]
    entry_of_expert: list[int]

    @property
    def reference(self) -> Checkpoint:
        """The checkpoint whose tensor names, shapes and config the output follows."""
        return self.base if self.base is not None else self.experts[0]


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    merge: bool  # False: copied from the reference (non-float tensors, or nothing to merge)
    missing_in: list[int] = field(default_factory=list)  # experts lacking the tensor: they contribute no change
    row_aligned: list[int] = field(default_factory=list)  # experts whose vocab rows were cut or padded to the base's


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    sources: Sources
    tensors: list[TensorPlan]
    num_layers: int
    warnings: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(TensorSpec(t.name, t.dtype, t.shape).nbytes for t in self.tensors)


def open_sources(recipe: Recipe, method: MergeMethod, allow_pickle: bool = False) -> Sources:
    """Open the inputs. Methods without a base (linear) mix every listed model, the base_model too if listed."""
    allow = allow_pickle or recipe.allow_pickle
    uses_base = method.needs_base and recipe.base_model is not None
    base = open_checkpoint(recipe.base_model, allow_pickle=allow) if uses_base else None
    experts, entries = [], []
    for index, entry in enumerate(recipe.models):
        if uses_base and entry.model == recipe.base_model:
            continue
        experts.append(open_checkpoint(entry.model, allow_pickle=allow))
        entries.append(index)
    return Sources(base=base, experts=experts, entry_of_expert=entries)


def output_dtype(recipe: Recipe, source: torch.dtype) -> torch.dtype:
    """out_dtype, else dtype, else the reference tensor's own dtype; non-float tensors keep theirs."""
    name = recipe.out_dtype or recipe.dtype
    if not source.is_floating_point or name is None:
        return source
    return TORCH_DTYPES[DTYPES[name]]


def plan_merge(recipe: Recipe, allow_pickle: bool = False) -> MergePlan:
    """Open every input and decide, from headers alone, what each output tensor is and how it is made."""
    method = get_method(recipe.merge_method)
    sources = open_sources(recipe, method, allow_pickle)
    reference = sources.reference
    warnings: list[str] = []
    for expert in sources.experts:
        _check_same_architecture(reference, expert)
    plans = []
    for name, info in reference.tensors.items():
        plan = TensorPlan(name=name, shape=info.shape, dtype=output_dtype(recipe, info.dtype), merge=info.dtype.is_floating_point)
        for index, expert in enumerate(sources.experts):
            other = expert.tensors.get(name)
            if other is None:
                if sources.base is None:
                    raise UserError(f"{expert.path}: has no tensor {name!r}, which {reference.path} has; {method.name} needs it in every model")
                plan.missing_in.append(index)
            elif other.shape != info.shape:
                if sources.base is not None and _rows_differ_only(other.shape, info.shape) and is_embedding(name):
                    plan.row_aligned.append(index)
                else:
                    raise UserError(
                        f"{expert.path}: tensor {name!r} has shape {list(other.shape)} but {reference.path} has "
                        f"{list(info.shape)}; the models are of different architectures or sizes"
                    )
        if plan.missing_in:
            missing = ", ".join(str(sources.experts[i].path) for i in plan.missing_in)
            warnings.append(f"{name}: not in {missing}; those models contribute no change to it")
        if plan.row_aligned:
            aligned = ", ".join(str(sources.experts[i].path) for i in plan.row_aligned)
            warnings.append(f"{name}: vocabulary size differs in {aligned}; rows aligned to {reference.path}")
        plans.append(plan)
    extra = sorted({n for e in sources.experts for n in e.tensors if n not in reference.tensors})
    if extra:
        warnings.append(f"{len(extra)} tensor(s) not in {reference.path} are left out, e.g. {extra[0]!r}")
    num_layers = count_layers(reference.config, reference.tensors)
    return MergePlan(recipe, method, sources, plans, num_layers, warnings)


def _architecture(ckpt: Checkpoint) -> str | None:
    config = ckpt.config or {}
    return config.get("architecture") or config.get("model_type")


def _check_same_architecture(reference: Checkpoint, expert: Checkpoint) -> None:
    """Refuse models whose configs name different architectures, or that share under half the tensor names."""
    ours, theirs = _architecture(reference), _architecture(expert)
    if ours and theirs and ours != theirs:
        raise UserError(f"{expert.path}: is a {theirs} model but {reference.path} is a {ours} model; they cannot be merged")
    shared = sum(1 for name in reference.tensors if name in expert.tensors)
    if shared * 2 < len(reference.tensors):
        raise UserError(
            f"{expert.path}: holds only {shared} of the {len(reference.tensors)} tensor names of {reference.path}; "
            "the models are of different architectures"
        )


def _rows_differ_only(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 1 and a[1:] == b[1:] and a[0] != b[0]


def _align_rows(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An expert's embedding cut or padded to the base's vocabulary; padded rows are the base's (no change)."""
    rows = min(tensor.shape[0], like.shape[0])
    aligned = like.clone()
    aligned[:rows] = tensor[:rows]
    return aligned


@dataclass
class Timings:
    read: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    wait: float = 0.0
    prepare: float = 0.0


class Loader:
    """Reads one tensor's inputs, as float32 on the device, optionally one step ahead in a thread."""

    def __init__(self, plan: MergePlan, device: torch.device, timings: Timings) -> None:
        self.plan = plan
        self.device = device
        self.timings = timings

    def read(self, tensor: TensorPlan) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        started = time.perf_counter()
        sources = self.plan.sources
        get = lambda ckpt: ckpt.get(tensor.name, self.device).to(torch.float32)  # noqa: E731
        base = get(sources.base) if sources.base is not None and tensor.merge else None
        experts = []
        if tensor.merge:
            for index, expert in enumerate(sources.experts):
                if index in tensor.missing_in:
                    experts.append(base.clone())
                elif index in tensor.row_aligned:
                    experts.append(_align_rows(get(expert), base))
                else:
                    experts.append(get(expert))
        self.timings.read += time.perf_counter() - started
        return base, experts

    def stream(self, tensors: list[TensorPlan]) -> Iterator[tuple[TensorPlan, torch.Tensor | None, list[torch.Tensor]]]:
        """Yield each tensor's inputs while the next ones are read in the background."""
        if not tensors:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reader") as pool:
            pending: Future = pool.submit(self.read, tensors[0])
            for position, tensor in enumerate(tensors):
                waited = time.perf_counter()
                base, experts = pending.result()
                self.timings.wait += time.perf_counter() - waited
                if position + 1 < len(tensors):
                    pending = pool.submit(self.read, tensors[position + 1])
                yield tensor, base, experts


def tensor_stats(result: torch.Tensor, base: torch.Tensor | None, experts: list[torch.Tensor]) -> dict[str, Any]:
    stats: dict[str, Any] = {"norm": float(torch.linalg.vector_norm(result))}
    if base is not None:
        stats["delta_norm"] = float(torch.linalg.vector_norm(result - base))
        stats["expert_delta_norms"] = [float(torch.linalg.vector_norm(e - base)) for e in experts]
    return stats


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
) -> MergeResult:
    """Merge according to `plan` into `out_dir`; `finalize` may add files before the output is published."""
    progress = progress or _Silent()
    recipe, method = plan.recipe, plan.method
    check_output_path(out_dir, force)
    dev = resolve_device(device if device != "auto" or recipe.device is None else recipe.device)
    seed = _choose_seed(seed, recipe)
    timings = Timings()
    loader = Loader(plan, dev, timings)
    started = time.perf_counter()
    merged = [t for t in plan.tensors if t.merge]
    prepared = None
    global_params = recipe_params(recipe, method, None, "", None, plan.num_layers)
    if method.prepare is not None and method.needs_prepare(global_params):
        progress.start(len(merged), 2 * sum(_input_bytes(plan, t) for t in merged), "first pass: global thresholds")
        prepared = method.prepare(lambda: _prepare_stream(plan, loader, merged, progress), global_params)
        progress.stop()
        timings.prepare = time.perf_counter() - started
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    stats: list[dict[str, Any]] = []
    nonfinite: list[str] = []
    writer = CheckpointWriter(out_dir, specs, max_shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES, force=force,
                              metadata={"merged_with": f"mergekit_lite {method.name}"})
    progress.start(len(plan.tensors), plan.total_bytes, f"merging with {method.name}")
    try:
        with writer:
            for tensor, base, experts in loader.stream(plan.tensors):
                clock = time.perf_counter()
                if tensor.merge:
                    inputs = _method_inputs(plan, tensor, base, experts, seed, prepared)
                    output = method.merge(inputs)
                    result = output.tensor
                    entry = {"name": tensor.name, **tensor_stats(result, base, experts)}
                    if output.kept_fraction is not None:
                        entry["kept_fraction"] = output.kept_fraction
                    if output.sign_agreement is not None:
                        entry["sign_agreement"] = output.sign_agreement
                    if not bool(torch.isfinite(result).all()):
                        nonfinite.append(tensor.name)
                    out = result.to(tensor.dtype)
                else:
                    out = plan.sources.reference.get(tensor.name, dev).to(tensor.dtype)
                    entry = {"name": tensor.name, "copied_from": str(plan.sources.reference.path)}
                entry.update(shape=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
                stats.append(entry)
                out = out.cpu()
                timings.compute += time.perf_counter() - clock
                clock = time.perf_counter()
                writer.write(tensor.name, out)
                timings.write += time.perf_counter() - clock
                progress.advance(out.numel() * out.element_size())
            result_info = MergeResult(plan, stats, timings, dev, seed, writer.files, time.perf_counter() - started, nonfinite)
            if finalize is not None:
                finalize(result_info, writer)
    finally:
        progress.stop()
        for ckpt in [plan.sources.base, *plan.sources.experts]:
            if ckpt is not None:
                ckpt.close()
    result_info.wall_seconds = time.perf_counter() - started
    return result_info


def _choose_seed(seed: int | None, recipe: Recipe) -> int:
    if seed is not None:
        return seed
    if recipe.seed is not None:
        return recipe.seed
    value = recipe.parameters.get("seed", 0)
    return int(value) if isinstance(value, (int, float)) else 0


def _input_bytes(plan: MergePlan, tensor: TensorPlan) -> int:
    return TensorSpec(tensor.name, torch.float32, tensor.shape).nbytes


def _method_inputs(plan: MergePlan, tensor: TensorPlan, base, experts, seed: int, prepared) -> MergeInputs:
    recipe, method = plan.recipe, plan.method
    layer = layer_index(tensor.name)
    model_params = [
        recipe_params(recipe, method, entry, tensor.name, layer, plan.num_layers) for entry in plan.sources.entry_of_expert
    ]
    params = recipe_params(recipe, method, None, tensor.name, layer, plan.num_layers)
    return MergeInputs(tensor.name, base, experts, model_params, params, seed=seed, prepared=prepared)


def _prepare_stream(plan: MergePlan, loader: Loader, tensors: list[TensorPlan], progress: Progress):
    for tensor, base, experts in loader.stream(tensors):
        layer = layer_index(tensor.name)
        params = [
            recipe_params(plan.recipe, plan.method, entry, tensor.name, layer, plan.num_layers)
            for entry in plan.sources.entry_of_expert
        ]
        yield tensor.name, base, experts, params
        progress.advance(_input_bytes(plan, tensor))
