"""Experiment 4: Twin-Merging on the experiment-1 experts, scored on a test set that mixes every domain.

The twin directory is built by `merge run` from a twin recipe (router data: each domain's training split,
written as tensor files). The mixed test set is shuffled, so every batch holds rows of several domains and
each row is routed on its own. Scores per domain are normalised as in experiment 1. Rows: the default
recipe (rank 0.1, stem feature, top-1), the same directory with soft routing over all tasks and with the true
task given (routing without errors), the final-layer feature, and a full-rank directory (no compression).
Storage ratio and inference time (routed twin over the shared model alone, same batches) are measured here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import data
import models
from common import Task, Workspace, cache_key, mean, merge_run, normalised, score_cached

SETTINGS = {  # label -> (twin recipe parameters, runtime change)
    "twin (rank 0.1, stem, top-1)": ({"rank": 0.1}, None),
    "twin, soft routing over all tasks": ({"rank": 0.1}, "soft"),
    "twin, true task given (no router)": ({"rank": 0.1}, "oracle"),
    "twin, final-layer feature": ({"rank": 0.1, "router_feature": "final"}, None),
    "twin, full rank (no compression)": ({"rank": 1.0}, None),
}
DEFAULT_SETTING = "twin (rank 0.1, stem, top-1)"  # also timed on the whole test set in one batch
QUICK = (DEFAULT_SETTING, "twin, true task given (no router)")


def mixed_inputs(task: Task, domains: tuple[str, ...], split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, domain index) of every domain's split, shuffled together with a fixed seed."""
    xs, ys, ids = [], [], []
    for index, d in enumerate(domains):
        if task.higher_is_better:
            images = data.image_domain(d, split)
            xs.append(images.images)
            ys.append(images.labels)
        else:
            windows = models.evaluation_windows(data.text_domain(d, split))
            xs.append(windows[:, :-1])
            ys.append(windows[:, 1:])
        ids.append(torch.full((len(xs[-1]),), index))
    order = torch.randperm(sum(len(x) for x in xs), generator=torch.Generator().manual_seed(0))
    return torch.cat(xs)[order], torch.cat(ys)[order], torch.cat(ids)[order]


def router_data(task: Task, domains: tuple[str, ...], root: Path, samples: int) -> dict[str, Path]:
    """Each domain's training inputs as a tensor file (images, or byte windows of the model's context)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for d in domains:
        path = root / f"{d}.safetensors"
        if not path.exists():
            if task.higher_is_better:
                inputs = data.image_domain(d, "train").images
            else:
                tokens = data.text_domain(d, "train")
                gen = torch.Generator().manual_seed(1)
                starts = torch.randint(0, len(tokens) - models.CONTEXT, (samples,), generator=gen)
                inputs = torch.stack([tokens[s: s + models.CONTEXT] for s in starts.tolist()])
            save_file({"inputs": inputs.contiguous()}, str(path))
        files[d] = path
    return files


def write_twin_recipe(path: Path, base: Path, experts: dict[str, Path], files: dict[str, Path], params: dict) -> Path:
    lines = ["merge_method: twin", f"base_model: {base}", "models:"]
    for d, expert in experts.items():
        lines += [f"  - model: {expert}", f"    task: {d}", f"    data: {{path: {files[d]}}}"]
    settings = {"router_samples": 256, "router_epochs": 60, "router_feature": "stem", **params}
    lines += ["shared_merge: {merge_method: task_arithmetic, parameters: {lambda: 0.3}}",
              f"parameters: {json.dumps(settings)}", "dtype: float32"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _per_domain(task: Task, outputs: list[torch.Tensor], targets: torch.Tensor, ids: torch.Tensor,
                domains: tuple[str, ...]) -> dict[str, float]:
    out = torch.cat(outputs)
    scores = {}
    for index, d in enumerate(domains):
        rows = ids == index
        if task.higher_is_better:
            scores[d] = float((out[rows].argmax(-1) == targets[rows]).float().mean())
        else:
            logp = out[rows].log_softmax(-1).gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
            scores[d] = float(-logp.mean())
    return scores


@torch.no_grad()
def evaluate(task: Task, directory: Path, domains: tuple[str, ...], change: str | None, batch: int,
             whole_set_timing: bool = False, timing_repeats: int = 25) -> dict:
    """Scores on the mixed test set, router accuracy there, and the routed/shared inference time ratio (on one
    batch; with `whole_set_timing` also on the whole test set at once, where each task has more rows)."""
    from mergekit_lite.models.loading import load_model
    from mergekit_lite.twin import TwinModel

    twin = TwinModel.load(directory)
    if change == "soft":
        twin.top_k = 0
    shared = load_model(directory / "shared", transformers_ok=True)
    inputs, targets, ids = mixed_inputs(task, domains, "test")
    logits = (lambda r: r) if task.higher_is_better else (lambda r: r.logits)
    outputs, picked = [], []
    for start in range(0, len(inputs), batch):
        x = inputs[start: start + batch]
        if change == "oracle":
            weights = torch.nn.functional.one_hot(ids[start: start + batch], len(domains)).float()
        else:
            weights = twin.route(x)
        picked.append(weights.argmax(-1))
        outputs.append(logits(twin(x, weights=weights)))
    scores = _per_domain(task, outputs, targets, ids, domains)
    router_accuracy = float((torch.cat(picked) == ids).float().mean())
    result = {"scores": scores, "router_test_accuracy": router_accuracy,
              "overhead": overhead(twin, shared, inputs[:batch], logits, timing_repeats) if change != "oracle" else None}
    if whole_set_timing:
        result["overhead_whole_set"] = overhead(twin, shared, inputs, logits, repeats=9)
    return result


def overhead(twin, shared, x: torch.Tensor, logits, repeats: int = 25) -> dict:
    """Wall time of the routed twin (router included) over the shared model alone, same batch, the two run in
    turn (bench/twin_overhead.py's paired_ms). Images also against the shared model in channels-last memory
    format, its fastest layout on a CPU (the twin runs its convolutions channels-last on task lanes)."""
    import copy

    from twin_overhead import paired_ms

    shared_ms, twin_ms, ratio = paired_ms(lambda: logits(shared(x)), lambda: logits(twin(x)), repeats)
    result = {"shared_ms": shared_ms, "twin_ms": twin_ms, "ratio": ratio, "batch": len(x)}
    if x.dim() == 4:
        fast = copy.deepcopy(shared).to(memory_format=torch.channels_last)
        fast_x = x.contiguous(memory_format=torch.channels_last)
        fast_ms, twin_ms, ratio = paired_ms(lambda: logits(fast(fast_x)), lambda: logits(twin(x)), repeats)
        result["channels_last"] = {"shared_ms": fast_ms, "twin_ms": twin_ms, "ratio": ratio}
    return result


def experiment_four(ws: Workspace, task: Task, paths: dict[str, Path], domains: tuple[str, ...]) -> dict:
    base_scores = score_cached(ws, task, paths["base"], "test", "base")
    own = {d: score_cached(ws, task, paths[d], "test", "expert")[d] for d in domains}
    files = router_data(task, domains, ws.root / "twin_data" / task.name, samples=256)
    batch = 256 if task.higher_is_better else 32
    rows = []
    labels = QUICK if ws.plan.quick else tuple(SETTINGS)
    merges: dict[str, tuple[Path, float, dict]] = {}  # rows that differ only at run time share one merge

    def merged(params: dict) -> tuple[Path, float, dict]:
        """The twin directory of `params` (built on first use), its merge time and its report."""
        key = cache_key("twin-merge", task.name, str(paths["base"]), [str(paths[d]) for d in domains], params)
        if key not in merges:
            work = ws.root / "merges" / key
            work.mkdir(parents=True, exist_ok=True)
            recipe = write_twin_recipe(work / "recipe.yaml", paths["base"], {d: paths[d] for d in domains}, files, params)
            seconds = merge_run(recipe, work / "out")
            merges[key] = (work, seconds, json.loads((work / "out" / "merge_report.json").read_text()))
        return merges[key]

    for label in labels:
        params, change = SETTINGS[label]
        whole = label == DEFAULT_SETTING and not ws.plan.quick  # the quick plan (CI) skips the slow whole-set timing
        key = cache_key("twin/18", task.name, str(paths["base"]), [str(paths[d]) for d in domains], params, change, batch)

        def compute(params=params, change=change, whole=whole) -> dict:
            work, seconds, report = merged(params)
            result = evaluate(task, work / "out", domains, change, batch, whole_set_timing=whole,
                              timing_repeats=5 if ws.plan.quick else 25)
            twin = report["twin"]
            return {**result, "seconds": seconds, "storage_ratio": twin["storage"]["ratio"],
                    "stored_bytes": twin["storage"]["stored_bytes"], "router_val_accuracy": twin["router"]["accuracy_val"],
                    "residual_energy_mean": mean([e for t in twin["tensors"] for e in t.get("residual_energy", [])] or [0.0])}

        row = dict(ws.cached(key, compute))
        row["name"] = label
        row["normalised"] = normalised(task, row["scores"], base_scores, own)
        row["normalised_average"] = mean(row["normalised"])
        row["average"] = mean(row["scores"])
        rows.append(row)
    for work, _, _ in merges.values():
        shutil.rmtree(work)
    return {"task": task.name, "domains": list(domains), "higher_is_better": task.higher_is_better, "rows": rows}
