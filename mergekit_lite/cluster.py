"""Tensor-wise merges on a Ray cluster (`merge run --ray [ADDRESS]`).

The driver plans the merge and lays out the output's shard files (headers, sizes) in the partial directory as a
local run does; one Ray task per output shard then plans the same merge again from the same recipe and headers,
merges that shard's tensors with the local engine's code and writes their bytes at their offsets; the driver
checks in each tensor's checksum, journals it for --resume, seals the shards, writes the index, card and report
and publishes the output atomically. The bytes are the local run's: each tensor's math and seeds do not depend on
where or in which order it runs. Inputs and the output must lie on a file system every node sees.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec
from mergekit_lite.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardFileWriter, check_output_path
from mergekit_lite.device import resolve_device
from mergekit_lite.engine import MergePlan, MergeResult, Timings, choose_seed, first_pass, merge_named
from mergekit_lite.errors import UserError
from mergekit_lite.pipeline import Progress, SilentProgress
from mergekit_lite.planning import plan_with_vocabularies
from mergekit_lite.recipe import Recipe

TASK_RETRIES = 3  # a task whose worker dies is run again (it rewrites the same bytes)


def import_ray() -> Any:
    """Ray, an optional extra: without it, one line saying what to install."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'mergekit_lite[ray]' (or pip install ray)") from None
    return ray


PROBE_SECONDS = 5.0


def check_reachable(address: str | None) -> None:
    """Refuse at once an address nothing answers on (Ray itself retries for minutes): `auto` needs RAY_ADDRESS,
    and `host:port` (or `ray://host:port`) a listening port."""
    if address is None:
        return
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            raise UserError("--ray auto: RAY_ADDRESS is not set; give the head's HOST:PORT, or --ray alone for a "
                            "cluster on this machine")
        if address == "auto":
            return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: not an address; give HOST:PORT (the Ray head's GCS port), auto or nothing")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); is the Ray head "
                        "running, and is this its address?") from None


def connect(ray: Any, address: str | None) -> None:
    """Join the cluster at `address` (`auto`: the one RAY_ADDRESS names), or start a local one."""
    if ray.is_initialized():
        return
    check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local cluster"
        raise UserError(f"--ray {where}: cannot connect: {str(exc).splitlines()[0] if str(exc) else exc}") from exc


def merge_shard(recipe_data: dict[str, Any], allow_pickle: bool, allow_crimes: bool, names: list[str],
                tmp_dir: str, max_shard_bytes: int, metadata: dict[str, str], device: str, seed: int,
                model_state: Any) -> dict[str, Any]:
    """One task: plan the merge again, merge the tensors `names` of one shard into the shard file, flush it."""
    started = time.perf_counter()
    recipe = Recipe.model_validate(recipe_data)
    plan, _ = plan_with_vocabularies(recipe, allow_pickle, allow_crimes)
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    writer = ShardFileWriter(Path(tmp_dir), specs, max_shard_bytes, metadata)
    try:
        entries = merge_named(plan, names, writer, device, seed, model_state)
    finally:
        writer.close()
        plan.close()
    node = import_ray().get_runtime_context().get_node_id()
    return {"entries": entries, "crcs": writer.crcs, "node": node, "seconds": time.perf_counter() - started}


def run_merge_on_ray(plan: MergePlan, out_dir: Path, *, address: str | None, allow_pickle: bool = False,
                     allow_crimes: bool = False, device: str = "auto", force: bool = False, seed: int | None = None,
                     shard_bytes: int | None = None, progress: Progress | None = None,
                     finalize: Callable[[MergeResult, CheckpointWriter], None] | None = None, resume: bool = False,
                     fingerprint: str = "") -> MergeResult:
    """`engine.run_merge`, with each output shard merged by a Ray task; same output, report and --resume."""
    ray = import_ray()
    progress = progress or SilentProgress()
    recipe, method = plan.recipe, plan.method
    check_output_path(out_dir, force)
    connect(ray, address)
    dev = resolve_device(device if device != "auto" or recipe.device is None else recipe.device)
    task_device = "cpu" if dev.type == "cpu" else "auto"  # each node uses its own accelerator when it has one
    seed = choose_seed(seed, recipe)
    started = time.perf_counter()
    timings = Timings()
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    metadata = {"merged_with": f"mergekit_lite {method.name}"}
    max_shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES
    writer = CheckpointWriter(out_dir, specs, max_shard_bytes=max_shard_bytes, force=force, metadata=metadata,
                              resume=resume, fingerprint=fingerprint)
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")(merge_shard)
    entries: dict[str, dict[str, Any]] = {}
    nodes: list[str] = []
    try:
        with writer:
            model_state, timings.prepare = first_pass(plan, str(dev), seed, progress)
            state_ref = ray.put(model_state)
            recipe_data = recipe.model_dump(mode="json")
            size = {t.name: t.nbytes for t in plan.tensors}
            progress.start(len(plan.tensors), plan.total_bytes, f"merging with {method.name} on Ray")
            pending = {}
            for shard in writer.shards:
                names = [spec.name for spec in shard]
                todo = [name for name in names if name not in writer.completed]
                for name in names:
                    if name in writer.completed:
                        entries[name] = writer.completed[name]
                        progress.advance(size[name])
                if todo:
                    task = remote.remote(recipe_data, allow_pickle, allow_crimes, todo, str(writer.tmp_dir),
                                         max_shard_bytes, metadata, task_device, seed, state_ref)
                    pending[task] = todo
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                names = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
                    if isinstance(cause, UserError):
                        raise cause from None
                    raise
                nodes.append(result["node"])
                for entry in result["entries"]:
                    writer.accept(entry["name"], result["crcs"].get(entry["name"], 0))
                    kept = {key: value for key, value in entry.items() if key != "nonfinite"}
                    writer.record(entry["name"], kept)
                    entries[entry["name"]] = entry
                    progress.advance(size[entry["name"]])
            stats = [{k: v for k, v in entries[t.name].items() if k != "nonfinite"} for t in plan.tensors]
            nonfinite = [t.name for t in plan.tensors if entries[t.name].get("nonfinite")]
            reverted = [t.name for t in plan.tensors if entries[t.name].get("kept_from") is not None]
            result_info = MergeResult(plan, stats, timings, dev, seed, writer.files, time.perf_counter() - started,
                                      nonfinite, resumed=len(writer.completed), reverted=reverted, nodes=nodes)
            if finalize is not None:
                finalize(result_info, writer)
    finally:
        progress.stop()
        plan.close()
    result_info.wall_seconds = time.perf_counter() - started
    return result_info
