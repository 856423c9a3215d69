"""LoRA references (`model: base+adapter`, mergekit's spelling): a checkpoint whose tensors are the base's with a
PEFT LoRA adapter applied as they are read.

The adapter is read in PEFT's saved format (`adapter_config.json`, `adapter_model.safetensors`): for a target
module `m`, `m.lora_A.weight` [r, in] and `m.lora_B.weight` [out, r] add `scaling * B @ A` to `m.weight`
(transposed for `fan_in_fan_out` layers such as GPT-2's Conv1D); embeddings store `lora_embedding_A` [r, vocab]
and `lora_embedding_B` [dim, r] and add `scaling * (B @ A)^T`. `scaling` is `alpha / r` (`alpha / sqrt(r)` with
rsLoRA), per module from `rank_pattern` / `alpha_pattern`. Modules saved whole (`modules_to_save`, or an
embedding's `base_layer`) replace the base's tensor. Rows [s, e) of a delta need only rows [s, e) of B (or
columns of A), so a tensor is still read a chunk at a time: memory does not grow with the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.checkpoint.files import checked_file, load_json, roots_of
from mergekit_lite.checkpoint.reader import Checkpoint, open_checkpoint
from mergekit_lite.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def split_lora_reference(reference: str) -> tuple[str, str] | None:
    """(base, adapter) for `base+adapter`; None for a plain reference (or a path that itself holds a `+`)."""
    if "+" not in reference or Path(reference).expanduser().exists():
        return None
    base, _, adapter = reference.rpartition("+")
    if not base or not adapter:
        return None
    return base, adapter


@dataclass(frozen=True)
class LowRankUpdate:
    """One module's update: delta = scaling * B @ A, in the layout of the weight it is added to."""

    a_name: str
    b_name: str
    scaling: float
    transposed: bool  # the weight is stored [in, out] (fan_in_fan_out) or is an embedding [vocab, dim]


@dataclass
class Adapter:
    """A LoRA adapter's updates and replacements, keyed by the model tensor they change."""

    path: Path
    weights: Checkpoint
    updates: dict[str, LowRankUpdate] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # model tensor -> adapter tensor saved whole


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """A per-module value from PEFT's rank_pattern / alpha_pattern: a key matches the module's name or its end."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    return float(default)


def read_adapter(directory: str | Path) -> Adapter:
    """The adapter in `directory`, checked: a LoRA adapter in PEFT's format with the weights it names."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such file or directory (the adapter of a base+adapter reference)")
    if not (directory / ADAPTER_CONFIG).exists():
        raise CheckpointError(f"{directory}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    config = load_json(directory / ADAPTER_CONFIG, roots_of(directory), "adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{directory}: a {kind} adapter; only LoRA adapters can be applied")
    if config.get("use_dora"):
        raise CheckpointError(f"{directory}: a DoRA adapter (use_dora); only plain LoRA adapters can be applied")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, (int, float)) or isinstance(rank, bool) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: r and lora_alpha must be positive numbers")
    if not (directory / ADAPTER_WEIGHTS).exists():
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS} (pickled adapters are not read)")
    checked_file(directory / ADAPTER_WEIGHTS, roots_of(directory), "adapter weights")  # inside it (or its cache repo)
    weights = open_checkpoint(directory / ADAPTER_WEIGHTS)
    adapter = Adapter(directory, weights)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for name in weights.tensors:
        key = name.removeprefix(PEFT_PREFIX)
        for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                              (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)]
                b_name = name[: -len(a_suffix)] + b_suffix
                if b_name not in weights.tensors:
                    raise CheckpointError(f"{directory}: {name} has no matching {b_name}")
                module_rank = weights.tensors[name].shape[0]
                module_alpha = _pattern_value(config.get("alpha_pattern"), module, alpha)
                scale = module_alpha / (math.sqrt(module_rank) if config.get("use_rslora") else module_rank)
                adapter.updates[module + ".weight"] = LowRankUpdate(name, b_name, scale, embedding or fan_in_fan_out)
                break
        else:
            if key.endswith((".lora_B.weight", ".lora_embedding_B")):
                continue
            if ".lora_" in key or "lora_magnitude" in key:
                raise CheckpointError(f"{directory}: {name}: an adapter tensor of a kind that cannot be applied")
            adapter.replacements[key.replace(".base_layer.", ".")] = name
    return adapter


def delta_rows(adapter: Adapter, update: LowRankUpdate, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of scaling * B @ A in the weight's layout, float32."""
    a = adapter.weights.get(update.a_name).float()  # [r, in] (or [r, vocab])
    b = adapter.weights.get(update.b_name).float()  # [out, r] (or [dim, r])
    if update.transposed:  # the weight is [in, out]: rows of (B @ A)^T = A^T rows @ B^T
        return (a[:, start:stop].t() @ b.t()).mul_(update.scaling)
    return (b[start:stop] @ a).mul_(update.scaling)


@dataclass
class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint read through a LoRA adapter: same names and shapes, adapted values."""

    adapter: Adapter | None = None
    reference: str = ""

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        adapter = self.adapter
        replaced = adapter.replacements.get(name)
        if replaced is not None:
            rows = adapter.weights.read_rows(replaced, start, stop)
            return _into(rows.to(self.tensors[name].dtype), out)
        update = adapter.updates.get(name)
        if update is None:
            return super().read_rows(name, start, stop, out)
        rows = super().read_rows(name, start, stop)  # a 2-d weight: apply_adapter checked its shape
        return _into((rows.float() + delta_rows(adapter, update, start, stop)).to(rows.dtype), out)

    def close(self) -> None:
        super().close()
        if self.adapter is not None:
            self.adapter.weights.close()


def _into(rows: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`rows`, copied into the caller's byte buffer when one is given (the reader reuses its buffers)."""
    size = rows.numel() * rows.element_size()
    if out is None or out.numel() < size:
        return rows
    view = out[:size].view(rows.dtype).reshape(rows.shape)
    view.copy_(rows)
    return view


def apply_adapter(base: Checkpoint, adapter: Adapter, reference: str) -> AdaptedCheckpoint:
    """`base` read through `adapter`, refused when the adapter changes a tensor the base lacks or reshapes one."""
    for target in [*adapter.updates, *adapter.replacements]:
        info = base.tensors.get(target)
        if info is None:
            raise CheckpointError(f"{reference}: the adapter changes {target!r}, which {base.path} does not have; "
                                  "is it an adapter for another model?")
        update = adapter.updates.get(target)
        if update is not None:
            a, b = adapter.weights.tensors[update.a_name].shape, adapter.weights.tensors[update.b_name].shape
            shape = (a[1], b[0]) if update.transposed else (b[0], a[1])
            if len(a) != 2 or len(b) != 2 or tuple(info.shape) != shape or a[0] != b[1]:
                raise CheckpointError(f"{reference}: the adapter's update of {target!r} is {list(shape)}, but the "
                                      f"tensor is {list(info.shape)}")
        else:
            saved = adapter.weights.tensors[adapter.replacements[target]].shape
            if tuple(saved) != tuple(info.shape):
                raise CheckpointError(f"{reference}: the adapter saves {target!r} as {list(saved)}, but the tensor is "
                                      f"{list(info.shape)} (a resized vocabulary cannot be applied)")
    return AdaptedCheckpoint(base.path, base.format, base.tensors, base.config, base.shards + adapter.weights.shards,
                             adapter=adapter, reference=reference)


def open_reference(reference: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """A checkpoint by its recipe reference: a path, or `base+adapter` (the adapter applied as tensors are read)."""
    split = split_lora_reference(str(reference))
    if split is None:
        return open_checkpoint(reference, allow_pickle=allow_pickle)
    base_path, adapter_path = split
    base = open_checkpoint(base_path, allow_pickle=allow_pickle)
    try:
        return apply_adapter(base, read_adapter(adapter_path), str(reference))
    except BaseException:
        base.close()
        raise
