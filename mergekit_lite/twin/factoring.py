"""Twin-Merging's compression stage: every expert's difference to the shared expert, tensor by tensor, written
into `experts/` as low-rank factors (matrices) or dense (1-D deltas). Locally, or on Ray tasks that each factor a
group of tensors and write them at their offsets in the partial directory, as a tensor-wise merge on Ray does."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mergekit_lite.checkpoint import Checkpoint, CheckpointWriter, open_checkpoint
from mergekit_lite.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardFileWriter
from mergekit_lite.device import resolve_device
from mergekit_lite.engine import RowWriter
from mergekit_lite.errors import RecipeError
from mergekit_lite.hub import local_reference, pinned
from mergekit_lite.pipeline import Progress
from mergekit_lite.ray_session import address_of, as_completed, connect, import_ray, remote_task
from mergekit_lite.recipe import Recipe
from mergekit_lite.twin.compress import low_rank
from mergekit_lite.twin.ranks import ratio_for_budget
from mergekit_lite.twin.store import EXPERTS, SHARED, delta_specs, dense_name, left_name, right_name, tensor_layout

METADATA = {"merged_with": "mergekit_lite twin"}
TASKS_PER_CPU = 4  # groups of tensors per CPU of the cluster: small enough to balance, large enough to amortise


def _delta(ckpt: Checkpoint, name: str, shared_tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One expert's difference to the shared expert for one tensor, float32 on `device`."""
    if name not in ckpt.tensors:
        raise RecipeError(f"{ckpt.path}: tensor {name!r} is missing (the shared expert has it)")
    return ckpt.get(name, device).float() - shared_tensor


def float_names(shared: Checkpoint) -> list[str]:
    return [n for n, info in shared.tensors.items() if info.dtype.is_floating_point]


def budget_ratio(shared: Checkpoint, tasks: list[str], storage: float, factor_dtype: torch.dtype) -> float:
    """The rank ratio whose factors (in `factor_dtype`) and dense 1-D deltas fit `storage` x the dense deltas."""
    names = float_names(shared)
    matrices = [n for n in names if len(shared.tensors[n].shape) >= 2]
    dense_bytes = len(tasks) * sum(shared.tensors[n].nbytes for n in names)
    vector_bytes = len(tasks) * sum(shared.tensors[n].nbytes for n in names if n not in matrices)
    shapes = [(shared.tensors[n].shape[0], math.prod(shared.tensors[n].shape[1:])) for n in matrices]
    return ratio_for_budget(shapes, len(tasks), factor_dtype.itemsize, storage * dense_bytes - vector_bytes)


def spec_names(entry: dict, tasks: list[str], name: str) -> list[str]:
    """The tensors the experts file holds for one shared tensor, in the order they are written."""
    if entry["kind"] == "dense":
        return [dense_name(task, name) for task in tasks]
    return [part for task in tasks for part in (left_name(task, name), right_name(task, name))]


def storage_facts(specs: list, dense_bytes: int, layout: dict[str, dict]) -> dict[str, Any]:
    """Bytes the factors take (the experts file's planned tensors) against the dense deltas they stand for."""
    stored = sum(spec.nbytes for spec in specs)
    return {"stored_bytes": stored, "dense_delta_bytes": dense_bytes, "ratio": stored / dense_bytes if dense_bytes else 0.0,
            "factored_tensors": sum(1 for e in layout.values() if e["kind"] == "factors"),
            "dense_tensors": sum(1 for e in layout.values() if e["kind"] == "dense")}


def _open_inputs(shared_dir: Path, references: list[str], allow_pickle: bool) -> tuple[Checkpoint, list[Checkpoint]]:
    """The shared expert and the experts (hub ids, pinned by the driver, resolved in this machine's cache)."""
    experts = [open_checkpoint(local_reference(reference, allow_pickle), allow_pickle=allow_pickle)
               for reference in references]
    return open_checkpoint(shared_dir), experts


def factor_tensor(name: str, shared: Checkpoint, experts: list[Checkpoint], tasks: list[str], entry: dict, dtype: torch.dtype, seed: int,
                  device: torch.device, writer: RowWriter) -> dict[str, Any]:
    """Factor (or keep dense) every task's delta of one tensor into `writer`; the tensor's report row."""
    base = shared.get(name, device).float()
    row: dict[str, Any] = {"name": name, "shape": entry["shape"]}
    residuals, norms = [], []
    for task, ckpt in zip(tasks, experts):
        delta = _delta(ckpt, name, base, device)
        norms.append(float(delta.norm()))
        if entry["kind"] == "dense":
            writer.write_rows(dense_name(task, name), 0, delta.to(dtype).cpu())
            continue
        factors = low_rank(delta.reshape(delta.shape[0], -1), entry["rank"], seed)
        writer.write_rows(left_name(task, name), 0, factors.left.to(dtype).cpu())
        writer.write_rows(right_name(task, name), 0, factors.right.to(dtype).cpu())
        residuals.append(factors.residual_energy)
    row.update(kind=entry["kind"], delta_norm=norms)
    if entry["kind"] == "factors":
        row.update(rank=entry["rank"], residual_energy=residuals)
    return row


def factor_group(shared_dir: str, expert_references: list[str], allow_pickle: bool, tasks: list[str], names: list[str],
                 layout: dict[str, dict], dtypes: dict[str, torch.dtype], seed: int, device: str, tmp_dir: str
                 ) -> dict[str, Any]:
    """One Ray task: factor the tensors `names` into the experts' shard files that the driver laid out (from the
    whole `layout` and `dtypes`, the same headers). Hub ids (pinned to the driver's commits) resolve in this
    node's own cache."""
    started = time.perf_counter()
    shared, experts = _open_inputs(Path(shared_dir), expert_references, allow_pickle)
    writer = ShardFileWriter(Path(tmp_dir), delta_specs(layout, dtypes, tasks), DEFAULT_SHARD_BYTES, METADATA)
    try:
        rows = [factor_tensor(name, shared, experts, tasks, layout[name], dtypes[name], seed, resolve_device(device),
                              writer) for name in names]
    finally:
        writer.close()
        for ckpt in [shared, *experts]:
            ckpt.close()
    node = import_ray().get_runtime_context().get_node_id()
    return {"rows": rows, "crcs": writer.crcs, "node": node, "seconds": time.perf_counter() - started}


def tensor_groups(names: list[str], nbytes: dict[str, int], count: int) -> list[list[str]]:
    """`names` in order, cut into about `count` runs of similar bytes (each at least one tensor)."""
    target = max(1, sum(nbytes[n] for n in names) // max(1, count))
    groups: list[list[str]] = [[]]
    held = 0
    for name in names:
        if groups[-1] and held + nbytes[name] > target:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += nbytes[name]
    return [group for group in groups if group]


def compress(directory: Path, recipe: Recipe, tasks: list[str], rank: float | None, storage_share: float,
             factor_dtype: torch.dtype, seed: int, device: torch.device, progress: Progress, allow_pickle: bool,
             resume: bool, fingerprint: str, log: Callable[[str], None] = lambda message: None, ray_address: str | None = None
             ) -> tuple[dict[str, dict], list[dict], dict[str, Any], list[str]]:
    """Factor every expert's difference to the shared expert into directory/experts: matrices as factors in
    `factor_dtype` at `rank` (or the ratio the storage budget allows), 1-D deltas dense in their own dtype; with
    `ray_address` ("local", "auto" or an address) on Ray tasks. With `resume`, tensors an interrupted run already
    factored (checksums verified) are kept. Returns the layout, per-tensor rows, storage facts and the Ray nodes."""
    shared = open_checkpoint(directory / SHARED)
    try:
        names = float_names(shared)
        nbytes = {name: shared.tensors[name].nbytes for name in names}
        ratio = rank if rank is not None else budget_ratio(shared, tasks, storage_share, factor_dtype)
        layout = {name: tensor_layout(tuple(shared.tensors[name].shape), ratio) for name in names}
        dtypes = {name: shared.tensors[name].dtype if layout[name]["kind"] == "dense" else factor_dtype
                  for name in names}
    finally:
        shared.close()
    specs = delta_specs(layout, dtypes, tasks)
    matrices = sum(1 for entry in layout.values() if entry["kind"] == "factors")
    where = " on Ray" if ray_address is not None else ""
    log(f"compressing{where}: {matrices} matrices x {len(tasks)} tasks as factors at rank ratio {ratio:.3g} "
        f"({sum(spec.nbytes for spec in specs) / 2**20:.1f} MiB to write)")
    storage = {**storage_facts(specs, len(tasks) * sum(nbytes.values()), layout),
               "rank_ratio": ratio, "factor_dtype": str(factor_dtype).removeprefix("torch.")}
    rows: dict[str, dict] = {}
    nodes: list[str] = []
    progress.start(len(names), sum(nbytes.values()), "compressing exclusive knowledge" + where)
    try:
        with CheckpointWriter(directory / EXPERTS, specs, metadata=METADATA, force=resume, resume=resume,
                              fingerprint=fingerprint) as writer:
            todo = []
            for name in names:
                written = spec_names(layout[name], tasks, name)
                if all(spec in writer.completed for spec in written):
                    rows[name] = writer.completed[written[-1]]
                    progress.advance(nbytes[name])
                else:
                    todo.append(name)

            def keep(row: dict[str, Any]) -> None:
                written = spec_names(layout[row["name"]], tasks, row["name"])
                for spec in written[:-1]:
                    writer.record(spec, {})
                writer.record(written[-1], row)
                rows[row["name"]] = row
                progress.advance(nbytes[row["name"]])

            if ray_address is None:
                _factor_here(directory, [entry.model for entry in recipe.models], allow_pickle, tasks, todo, layout, dtypes, seed, device,
                             writer, keep)
            else:
                references = [entry.model for entry in pinned(recipe).models]
                args = (str(directory / SHARED), references, allow_pickle, tasks)
                nodes = _factor_on_ray(ray_address, args, todo, nbytes, layout, dtypes, seed, device, writer, keep)
        return layout, [rows[name] for name in names], storage, nodes
    finally:
        progress.stop()


def _factor_here(directory: Path, expert_paths: list[str], allow_pickle: bool, tasks: list[str], names: list[str],
                 layout: dict, dtypes: dict, seed: int, device: torch.device, writer: CheckpointWriter, keep: Callable[[dict], None]) -> None:
    shared, experts = _open_inputs(directory / SHARED, expert_paths, allow_pickle)
    try:
        for name in names:
            keep(factor_tensor(name, shared, experts, tasks, layout[name], dtypes[name], seed, device, writer))
    finally:
        for ckpt in [shared, *experts]:
            ckpt.close()


def _factor_on_ray(address: str, args: tuple, names: list[str], nbytes: dict[str, int], layout: dict, dtypes: dict,
                   seed: int, device: torch.device, writer: CheckpointWriter, keep: Callable[[dict], None]
                   ) -> list[str]:
    """Factor `names` on Ray tasks (groups of tensors), checking in each task's tensors as it finishes."""
    ray = import_ray()
    connect(ray, address_of(address), __name__)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    task_device = "cpu" if device.type == "cpu" else "auto"  # each node uses its own accelerator when it has one
    remote = remote_task(ray, factor_group)
    layout_ref, dtypes_ref = ray.put(layout), ray.put(dtypes)
    pending = {remote.remote(*args, group, layout_ref, dtypes_ref, seed, task_device, str(writer.tmp_dir)): group
               for group in tensor_groups(names, nbytes, TASKS_PER_CPU * cpus)}
    nodes = []
    for _group, result in as_completed(ray, pending):
        nodes.append(result["node"])
        for row in result["rows"]:
            for spec in spec_names(layout[row["name"]], list(args[3]), row["name"]):
                writer.accept(spec, result["crcs"][spec])
            keep(row)
    return nodes
