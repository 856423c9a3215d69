"""The Twin-Merging directory on disk.

```
OUT/
  twin.json                manifest: tasks, per-tensor layout (factors or dense, rank, shape), router settings
  shared/                  the shared expert: a normal checkpoint (from_pretrained / timm load it)
  experts/model.safetensors  per task and tensor: "<task>/<tensor>.left" (m, r) and ".right" (r, n) for
                           tensors of 2 or more dimensions (viewed as (shape[0], rest)), ".delta" for 1-D ones
  router.safetensors       the router MLP and its feature standardisation
  merge_report.json, README.md, merge_recipe.yaml
```
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.checkpoint import TensorSpec, open_checkpoint
from mergekit_lite.checkpoint.files import load_json, roots_of
from mergekit_lite.errors import UserError
from mergekit_lite.twin.compress import rank_for

FORMAT = "mergekit_lite.twin/1"
MANIFEST = "twin.json"
SHARED = "shared"
EXPERTS = "experts"
ROUTER = "router.safetensors"
TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def left_name(task: str, tensor: str) -> str:
    return f"{task}/{tensor}.left"


def right_name(task: str, tensor: str) -> str:
    return f"{task}/{tensor}.right"


def dense_name(task: str, tensor: str) -> str:
    return f"{task}/{tensor}.delta"


def tensor_layout(shape: tuple[int, ...], rank: float | int) -> dict:
    """How one tensor's exclusive knowledge is stored: factors of (shape[0], rest) or a dense 1-D delta."""
    if len(shape) < 2:
        return {"kind": "dense", "shape": list(shape)}
    rows, cols = shape[0], math.prod(shape[1:])
    return {"kind": "factors", "shape": list(shape), "rank": rank_for((rows, cols), rank)}


def delta_specs(layout: dict[str, dict], dtypes: dict[str, torch.dtype], tasks: list[str]) -> list[TensorSpec]:
    """The experts file's tensors, known before any SVD runs (so the writer can stream them)."""
    specs = []
    for task in tasks:
        for name, entry in layout.items():
            shape, dtype = entry["shape"], dtypes[name]
            if entry["kind"] == "dense":
                specs.append(TensorSpec(dense_name(task, name), dtype, tuple(shape)))
            else:
                rows, cols = shape[0], math.prod(shape[1:])
                specs.append(TensorSpec(left_name(task, name), dtype, (rows, entry["rank"])))
                specs.append(TensorSpec(right_name(task, name), dtype, (entry["rank"], cols)))
    return specs


@dataclass
class StackedDelta:
    """One tensor's exclusive knowledge for every task: factors (T, m, r) and (T, r, n), or dense (T, *shape)."""

    shape: tuple[int, ...]
    lefts: torch.Tensor | None = None
    rights: torch.Tensor | None = None
    dense: torch.Tensor | None = None


def _layout_entry(entry: object) -> bool:
    """A manifest's layout entry: dense with a shape, or factors with a shape and a positive integer rank."""
    if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in entry["shape"])):
        return False
    if entry.get("kind") == "dense":
        return True
    return entry.get("kind") == "factors" and type(entry.get("rank")) is int and entry["rank"] >= 0


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory}: not a Twin-Merging directory (no {MANIFEST}); make one with a twin recipe")
    manifest = load_json(path, roots_of(directory), MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path}: format {found!r}, this version reads {FORMAT!r}")
    tasks, tensors = manifest.get("tasks"), manifest.get("tensors")
    well_formed = (isinstance(tasks, list) and tasks and all(isinstance(t, str) and TASK_NAME.match(t) for t in tasks)
                   and isinstance(tensors, dict) and all(_layout_entry(e) for e in tensors.values()))
    if not well_formed:
        raise UserError(f"{path}: its task list or tensor layout is missing or malformed; the directory is damaged")
    return manifest


def load_deltas(directory: Path, manifest: dict, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, StackedDelta]:
    """Every tensor's stacked per-task deltas (small by construction: that is the point of the factors)."""
    ckpt = open_checkpoint(Path(directory) / EXPERTS)
    tasks = manifest["tasks"]
    try:
        stacked = {}
        for name, entry in manifest["tensors"].items():
            get = lambda key: torch.stack([ckpt.get(key(t, name)) for t in tasks]).to(device, dtype)  # noqa: E731
            shape = tuple(entry["shape"])
            if entry["kind"] == "dense":
                stacked[name] = StackedDelta(shape, dense=get(dense_name))
            else:
                stacked[name] = StackedDelta(shape, lefts=get(left_name), rights=get(right_name))
    finally:
        ckpt.close()
    return stacked


def task_weights(tasks: list[str], weights: dict[str, float]) -> torch.Tensor:
    """{task: weight} -> a vector over the directory's tasks (unnamed tasks weigh 0)."""
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; this directory has {', '.join(tasks)}")
    bad = sorted(task for task, weight in weights.items() if not math.isfinite(float(weight)))
    if bad:
        raise UserError(f"task weight of {bad[0]} is {weights[bad[0]]}; weights must be finite numbers")
    return torch.tensor([float(weights.get(task, 0.0)) for task in tasks])
