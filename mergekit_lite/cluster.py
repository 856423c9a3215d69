"""Tensor-wise merges on a Ray cluster (`merge run --ray [ADDRESS]`).

The driver plans the merge and lays out the output's shard files (headers, sizes) in the partial directory as a
local run does; one Ray task per output shard then plans the same merge again from the same recipe and headers,
merges that shard's tensors with the local engine's code and writes their bytes at their offsets; the driver
checks in each tensor's checksum, journals it for --resume, seals the shards, writes the index, card and report
and publishes the output atomically. A whole-model first pass runs on the same tasks in rounds whose answers the
driver reduces (`MergeMethod.split_model_pass`). The bytes are the local run's: each tensor's math and seeds do not depend on
where or in which order it runs. Inputs and the output must lie on a file system every node sees.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec
from mergekit_lite.checkpoint.writer import DEFAULT_SHARD_BYTES, ShardFileWriter, check_output_path
from mergekit_lite.device import resolve_device
from mergekit_lite.engine import (
    MergePlan, MergeResult, Timings, choose_seed, first_pass, merge_named, model_pass_part, needs_model_pass,
)
from mergekit_lite.hub import pinned, resolve_hub_ids
from mergekit_lite.pipeline import Progress, SilentProgress
from mergekit_lite.planning import plan_with_vocabularies
from mergekit_lite.ray_session import as_completed, connect, import_ray, remote_task
from mergekit_lite.recipe import Recipe

def _replan(recipe_data: dict[str, Any], allow_pickle: bool, allow_crimes: bool) -> MergePlan:
    """The driver's plan, made again inside a task from the same recipe and headers; hub ids, pinned to the
    driver's commits, resolve in this node's own cache."""
    recipe = Recipe.model_validate(recipe_data)
    resolve_hub_ids(recipe, allow_pickle)
    plan, _ = plan_with_vocabularies(recipe, allow_pickle, allow_crimes)
    return plan


def answer_round(recipe_data: dict[str, Any], allow_pickle: bool, allow_crimes: bool, names: list[str], device: str,
                 seed: int, question: Any) -> Any:
    """One task of the split whole-model pass: this shard's answer to one round's question."""
    plan = _replan(recipe_data, allow_pickle, allow_crimes)
    try:
        return model_pass_part(plan, names, device, seed, question)
    finally:
        plan.close()


def first_pass_on_ray(ray: Any, plan: MergePlan, groups: list[list[str]], task_args: tuple, device: str, seed: int,
                      progress: Progress) -> tuple[Any, float, int]:
    """The method's whole-model pass (None when it has none), its seconds and its rounds on Ray: split over one
    task per shard in rounds whose answers the driver reduces, when the method can split it; else run here (0)."""
    if not needs_model_pass(plan):
        return None, 0.0, 0
    split = plan.method.split_model_pass
    if split is None:
        return (*first_pass(plan, device, seed, progress), 0)
    started = time.perf_counter()
    remote = remote_task(ray, answer_round)
    size = {t.name: t.nbytes for t in plan.tensors}
    question, finished, round_number = None, False, 0
    while not finished:
        round_number += 1
        progress.start(len(plan.tensors), plan.total_bytes, f"first pass over the model on Ray, round {round_number}")
        answers = []
        tasks = {remote.remote(*task_args, names, device, seed, question): names for names in groups}
        for names, answer in as_completed(ray, tasks):
            answers.append(answer)
            progress.advance(sum(size[name] for name in names))
        progress.stop()
        finished, question = split.reduce(question, answers)
    return question, time.perf_counter() - started, round_number


def merge_shard(recipe_data: dict[str, Any], allow_pickle: bool, allow_crimes: bool, names: list[str],
                tmp_dir: str, max_shard_bytes: int, metadata: dict[str, str], device: str, seed: int,
                model_state: Any) -> dict[str, Any]:
    """One task: plan the merge again, merge the tensors `names` of one shard into the shard file, flush it."""
    started = time.perf_counter()
    plan = _replan(recipe_data, allow_pickle, allow_crimes)
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
    connect(ray, address, __name__)
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
    remote = remote_task(ray, merge_shard)
    entries: dict[str, dict[str, Any]] = {}
    nodes: list[str] = []
    try:
        with writer:
            recipe_data = pinned(recipe).model_dump(mode="json")
            task_args = (recipe_data, allow_pickle, allow_crimes)
            groups = [[spec.name for spec in shard] for shard in writer.shards]
            model_state, timings.prepare, rounds = first_pass_on_ray(ray, plan, groups, task_args, task_device,
                                                                     seed, progress)
            state_ref = ray.put(model_state)
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
                    task = remote.remote(*task_args, todo, str(writer.tmp_dir),
                                         max_shard_bytes, metadata, task_device, seed, state_ref)
                    pending[task] = todo
            for _names, result in as_completed(ray, pending):
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
                                      nonfinite, resumed=len(writer.completed), reverted=reverted, nodes=nodes,
                                      first_pass_rounds=rounds)
            if finalize is not None:
                finalize(result_info, writer)
    finally:
        progress.stop()
        plan.close()
    result_info.wall_seconds = time.perf_counter() - started
    return result_info
