"""The quality suite's experiments: train (cached), merge through `merge run`, score, tabulate.

Experiment 1: a shared base and domain experts, every tensor-wise method at its papers' defaults and at the
best setting on the validation split. Experiment 2: normalised held-in score against the number of experts
and the model width. Experiment 3: models trained from different initialisations (PLeaS's setting), with
plain averaging as the baseline. Experiment 4 (twin_rows.py): Twin-Merging, routed per input on a test set
mixing every domain.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

import data
import models
import twin_rows
from common import (Plan, Task, Workspace, cache_key, mean, merge_run, normalised, score_cached, text_task,
                    trained, vision_task, write_recipe)

# Method settings: the papers' defaults, then a small grid searched on the validation split.
# task arithmetic: lambda from the paper's validation range; TIES: top-20 %, lambda 1; DARE: drop 90 %;
# breadcrumbs: keep 90 % after dropping the top 1 %; DELLA: density 0.5 +- 0.1.
DEFAULTS: dict[str, dict] = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.2, "lambda": 1.0},
    "dare_ties": {"density": 0.1, "lambda": 1.0},
    "dare_linear": {"density": 0.1, "lambda": 0.3},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01, "lambda": 0.3},
    "della": {"density": 0.5, "epsilon": 0.1, "lambda": 1.0},
    "model_stock": {},
}
GRIDS: dict[str, list[dict]] = {
    "linear": [],
    "task_arithmetic": [{"lambda": v} for v in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "lambda": v} for d in (0.1, 0.2, 0.5) for v in (0.5, 1.0, 1.5)],
    "dare_ties": [{"density": d, "lambda": v} for d in (0.1, 0.3, 0.5) for v in (0.5, 1.0, 1.5)],
    "dare_linear": [{"density": d, "lambda": v} for d in (0.1, 0.3, 0.5) for v in (0.2, 0.3, 0.5)],
    "breadcrumbs": [{"density": d, "gamma": 0.01, "lambda": v} for d in (0.8, 0.9) for v in (0.2, 0.3, 0.5)],
    "della": [{"density": d, "epsilon": 0.1, "lambda": v} for d in (0.3, 0.5, 0.7) for v in (0.5, 1.0)],
    "model_stock": [],
}
SCALING_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")


# Part of every PLeaS row's cache key: bump it when a change to PLeaS changes its results, so rows are rebuilt.
PLEAS_VERSION = "heads-unmerge"
# Data-free rows also carry this one: tuning toward the combined outputs and the refinement of another domain's
# images changed them alone.
PLEAS_DATA_FREE_VERSION = "tuned-256"


def _pleas_version(setting: dict) -> str:
    return f"{PLEAS_VERSION}/{PLEAS_DATA_FREE_VERSION}" if setting.get("data_free") else PLEAS_VERSION


# ---- experiment 1 and 2: shared base, domain experts ----

def vision_models(ws: Workspace, width: float = 1.0) -> dict[str, Path]:
    """Base (all clean training images and a few of each shifted domain, from scratch), one expert per shifted domain
    fine-tuned lightly from it (batch-norm statistics frozen), and a multitask model fine-tuned the same way
    on every domain."""
    plan, root = ws.plan, ws.root / f"vision_w{width}"
    domains = plan.vision_domains
    train = {d: data.image_domain(d, "train") for d in domains}
    save = lambda m, p: models.save_vision(m, p, width)  # noqa: E731

    def base_model() -> torch.nn.Module:
        home = data.image_domain(data.HOME_DOMAIN, "train")
        mix = data.concat([home] + [data.subsample(train[d], plan.base_fraction, seed=i) for i, d in enumerate(domains)])
        return models.train_vision(models.new_vision_model(width, seed=0), mix, epochs=plan.base_epochs, lr=0.05,
                                   seed=0, weight_decay=5e-4)

    paths = {"base": trained(root / "base", base_model, save, ws.log)}

    def fine_tuned(training: data.ImageSet, seed: int) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            model = models.load_vision(paths["base"])
            return models.train_vision(model, training, epochs=plan.expert_epochs, lr=0.005, seed=seed,
                                       freeze_norm=True)
        return build

    for i, d in enumerate(domains):
        paths[d] = trained(root / f"expert_{d}", fine_tuned(train[d], seed=10 + i), save, ws.log)
    paths["multitask"] = trained(root / "multitask", fine_tuned(data.concat(list(train.values())), seed=99), save,
                                  ws.log)
    return paths


def text_models(ws: Workspace) -> dict[str, Path]:
    """Base on a mix of prose and code; an expert fine-tuned on each domain; a multitask model on all."""
    plan = ws.plan
    root = ws.root / ("text" if plan.text_width == 1.0 else f"text_w{plan.text_width}")
    train = {d: data.text_domain(d, "train") for d in plan.text_domains}
    pretrain = [data.text_domain(d, "train") for d in ("prose", "code")]

    def base_model() -> torch.nn.Module:
        return models.train_text(models.new_text_model(plan.text_width, seed=0), pretrain, steps=plan.text_base_steps,
                                 lr=3e-3, seed=0)

    paths = {"base": trained(root / "base", base_model, models.save_text, ws.log)}

    def fine_tuned(streams: list[torch.Tensor], seed: int) -> Callable[[], torch.nn.Module]:
        def build() -> torch.nn.Module:
            return models.train_text(models.load_text(paths["base"]).train(), streams, steps=plan.text_expert_steps,
                                     lr=1e-3, seed=seed)
        return build

    for i, d in enumerate(plan.text_domains):
        paths[d] = trained(root / f"expert_{d}", fine_tuned([train[d]], seed=10 + i), models.save_text, ws.log)
    paths["multitask"] = trained(root / "multitask", fine_tuned(list(train.values()), seed=99), models.save_text,
                                  ws.log)
    return paths


def ensemble_scores(task: Task, experts: list[Path], split: str) -> dict[str, float]:
    """The experts' average prediction: mean class probabilities, or the mixture of next-byte distributions."""
    if task.higher_is_better:
        loaded = [models.load_vision(p) for p in experts]
        out = {}
        for d in task.subtasks:
            images = data.image_domain(d, split)
            mean = sum(models.vision_probabilities(m, images) for m in loaded) / len(loaded)
            out[d] = models.accuracy(mean, images.labels)
        return out
    loaded = [models.load_text(p) for p in experts]
    out = {}
    for d in task.subtasks:
        windows = models.evaluation_windows(data.text_domain(d, split))
        stacked = torch.stack([models.text_log_probabilities(m, windows) for m in loaded])
        out[d] = models.loss_of(torch.logsumexp(stacked, 0) - torch.log(torch.tensor(float(len(loaded)))))
    return out


def run_merge_scored(ws: Workspace, task: Task, label: str, method: str, base: Path, experts: list[Path],
                     setting: dict, splits: tuple[str, ...]) -> dict:
    """Merge (cached by recipe) and score on the given splits; the merged directory is removed afterwards."""
    key = cache_key("merge", task.name, method, str(base), [str(e) for e in experts], setting, splits)

    def compute() -> dict:
        work = ws.root / "merges" / key
        work.mkdir(parents=True, exist_ok=True)
        uses_base = method not in ("linear",)
        recipe = write_recipe(work / "recipe.yaml", method, base if uses_base else None, experts, setting)
        seconds = merge_run(recipe, work / "out")
        scores = {split: task.score(work / "out", split) for split in splits}
        shutil.rmtree(work)
        return {"seconds": seconds, "scores": scores}

    return ws.cached(key, compute)


def method_rows(ws: Workspace, task: Task, paths: dict[str, Path], domains: tuple[str, ...],
                methods: tuple[str, ...], grid: bool) -> list[dict]:
    """Each method at its default setting and (with grid) at the setting best on validation."""
    base = paths["base"]
    experts = [paths[d] for d in domains]
    base_val = score_cached(ws, task, base, "val", "base")
    expert_val = {d: score_cached(ws, task, paths[d], "val", "expert")[d] for d in domains}
    rows = []
    for method in methods:
        if method == "model_stock" and len(experts) < 2:
            continue
        splits = ("val", "test") if grid else ("test",)  # the validation split only serves the grid search
        default = run_merge_scored(ws, task, "default", method, base, experts, DEFAULTS[method], splits)
        rows.append({"method": method, "setting": "default", "params": DEFAULTS[method], **default})
        if not grid or not GRIDS[method]:
            continue
        best, best_value = None, None
        for setting in GRIDS[method]:
            result = run_merge_scored(ws, task, "grid", method, base, experts, setting, ("val",))
            value = mean(normalised(task, result["scores"]["val"], base_val, expert_val))
            if best_value is None or value > best_value:
                best, best_value = setting, value
        tuned = run_merge_scored(ws, task, "best", method, base, experts, best, ("val", "test"))
        rows.append({"method": method, "setting": "best on val", "params": best, **tuned})
    return rows


def experiment_one(ws: Workspace, task: Task, paths: dict[str, Path], domains: tuple[str, ...]) -> dict:
    """References and every method on one shared-base setting; all figures on the test split."""
    test = lambda p, tag: score_cached(ws, task, p, "test", tag)  # noqa: E731
    base = test(paths["base"], "base")
    expert_scores = {d: test(paths[d], "expert") for d in domains}
    own = {d: expert_scores[d][d] for d in domains}
    references = [{"name": "base", "scores": base}]
    references += [{"name": f"expert {d}", "scores": expert_scores[d]} for d in domains]
    references.append({"name": "ensemble of experts",
                       "scores": ws.cached(cache_key("ensemble", task.name, [str(paths[d]) for d in domains], "test"),
                                           lambda: ensemble_scores(task, [paths[d] for d in domains], "test"))})
    references.append({"name": "multitask", "scores": test(paths["multitask"], "multitask")})
    methods = tuple(DEFAULTS)
    rows = method_rows(ws, task, paths, domains, methods, ws.plan.grid)
    for entry in references + rows:
        scores = entry["scores"]["test"] if "seconds" in entry else entry["scores"]
        entry["test"] = scores
        entry["normalised"] = normalised(task, scores, base, own)
        entry["average"] = mean(scores)
        entry["normalised_average"] = mean(entry["normalised"])
    margins = expert_margins(task, base, expert_scores, domains)
    return {"task": task.name, "domains": list(domains), "higher_is_better": task.higher_is_better,
            "references": references, "methods": rows, "margins": margins}


def expert_margins(task: Task, base: dict, experts: dict, domains: tuple[str, ...]) -> list[dict]:
    """Per domain: how much its expert beats the base there, and how it does on the other domains."""
    sign = 1.0 if task.higher_is_better else -1.0
    out = []
    for d in domains:
        others = [o for o in domains if o != d]
        out.append({
            "domain": d,
            "expert_own": experts[d][d],
            "base_own": base[d],
            "gain_own": sign * (experts[d][d] - base[d]),
            "expert_others": mean([experts[d][o] for o in others]) if others else None,
            "other_experts_here": mean([experts[o][d] for o in others]) if others else None,
        })
    return out


def experiment_two(ws: Workspace) -> dict:
    """Normalised held-in score against the number of experts, and against model width (vision)."""
    plan = ws.plan
    counts = []
    paths = vision_models(ws, 1.0)
    for count in plan.expert_counts:
        domains = plan.vision_domains[:count]
        counts.append(_scaling_point(ws, paths, domains, {"experts": count, "width": 1.0}))
    widths = []
    for width in plan.widths:
        at_width = vision_models(ws, width) if width != 1.0 else paths
        domains = plan.vision_domains[: plan.width_experts]
        widths.append(_scaling_point(ws, at_width, domains, {"experts": len(domains), "width": width}))
    return {"by_experts": counts, "by_width": widths}


def _scaling_point(ws: Workspace, paths: dict[str, Path], domains: tuple[str, ...], where: dict) -> dict:
    task = vision_task(domains)
    base = score_cached(ws, task, paths["base"], "test", "base")
    own = {d: score_cached(ws, task, paths[d], "test", "expert")[d] for d in domains}
    point = dict(where, base=mean(normalised(task, base, base, own)), methods={})
    for method in SCALING_METHODS:
        result = run_merge_scored(ws, task, "default", method, paths["base"], [paths[d] for d in domains],
                                  DEFAULTS[method], ("val", "test"))
        point["methods"][method] = mean(normalised(task, result["scores"]["test"], base, own))
    return point


# ---- experiment 3: different initialisations ----

SCRATCH_PAIRS = {"same task": (None, None), "label split": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))}


def scratch_pair(root: Path, plan: Plan, labels_pair: tuple, log: Callable[[str], None]) -> list[Path]:
    """Two vision models trained from scratch with seeds 1 and 2 on the clean digits (each on its own labels,
    or all of them), cached under `root`."""
    paths = []
    for seed, labels in zip((1, 2), labels_pair):
        training = data.image_domain("clean", "train", labels)
        tag = "all" if labels is None else "".join(map(str, labels))
        build = (lambda training=training, seed=seed: models.train_vision(
            models.new_vision_model(seed=seed), training, epochs=plan.scratch_epochs, lr=0.05, seed=seed,
            weight_decay=5e-4))
        paths.append(trained(root / f"seed{seed}_{tag}", build, lambda m, p: models.save_vision(m, p), log))
    return paths


def experiment_three(ws: Workspace) -> dict:
    """Pairs of models trained from scratch with different seeds: on the same task, and on the two halves of
    the labels (each model still has a ten-way head). Joint accuracy over all labels of the clean digits."""
    root = ws.root / "different_init"
    save = lambda m, p: models.save_vision(m, p)  # noqa: E731
    task = vision_task(("clean",))
    out = {}
    for name, labels_pair in SCRATCH_PAIRS.items():
        paths = scratch_pair(root, ws.plan, labels_pair, ws.log)
        rows = [{"name": "model A", "accuracy": score_cached(ws, task, paths[0], "test", "A")["clean"]},
                {"name": "model B", "accuracy": score_cached(ws, task, paths[1], "test", "B")["clean"]}]
        ensemble = ws.cached(cache_key("ensemble", task.name, [str(p) for p in paths], "test"),
                             lambda: ensemble_scores(task, paths, "test"))
        rows.append({"name": "ensemble", "accuracy": ensemble["clean"]})
        averaged = run_merge_scored(ws, task, "default", "linear", paths[0], paths, {}, ("test",))
        rows.append({"name": "averaging (linear)", "accuracy": averaged["scores"]["test"]["clean"],
                     "seconds": averaged["seconds"]})
        for label, setting in pleas_settings(ws, root).items():
            result = run_pleas_scored(ws, task, paths, setting)
            rows.append({"name": label, "accuracy": result["scores"]["test"]["clean"], "seconds": result["seconds"],
                         "compute_ratio": result["compute_ratio"]})
        out[name] = rows
    out["label split, separate 5-way heads"] = _separate_heads(ws, root, save)
    return out


def experiment_three_text(ws: Workspace) -> list[dict]:
    """Two byte-level Llamas trained from scratch with different seeds on the same prose and code: averaging,
    permutation only, PLeaS at several widths, and data-free PLeaS (random token ids). Test loss per domain."""
    from safetensors.torch import save_file

    plan, root = ws.plan, ws.root / "different_init_text"
    domains = ("prose", "code")
    task = text_task(domains)
    streams = [data.text_domain(d, "train") for d in domains]
    paths = []
    for seed in (1, 2):
        build = (lambda seed=seed: models.train_text(models.new_llama_text_model(seed=seed), streams,
                                                     steps=plan.text_base_steps, lr=3e-3, seed=seed))
        paths.append(trained(root / f"llama_seed{seed}", build, models.save_text, ws.log))
    rows = [{"name": "model A", "scores": score_cached(ws, task, paths[0], "test", "A")},
            {"name": "model B", "scores": score_cached(ws, task, paths[1], "test", "B")},
            {"name": "ensemble", "scores": ws.cached(cache_key("ensemble", task.name, [str(p) for p in paths], "test"),
                                                     lambda: ensemble_scores(task, paths, "test"))}]
    averaged = run_merge_scored(ws, task, "default", "linear", paths[0], paths, {}, ("test",))
    rows.append({"name": "averaging (linear)", "scores": averaged["scores"]["test"], "seconds": averaged["seconds"]})
    tokens = root / "pleas_tokens.safetensors"
    if not tokens.exists():  # unlabeled training windows of both domains
        windows = [models.evaluation_windows(s, 500)[:, :-1] for s in streams]
        save_file({"tokens": torch.cat(windows).contiguous()}, str(tokens))
    with_data = {"data": {"path": str(tokens), "key": "tokens"}}
    settings = {"permutation only (1.0x)": {**with_data, "least_squares": False, "target_width": 1.0}}
    for width in (1.0, 1.25, 1.5, 2.0):
        settings[f"PLeaS {width}x"] = {**with_data, "target_width": width}
    settings["PLeaS 1.0x, tuned 300 steps"] = {**with_data, "target_width": 1.0, "tune_steps": 300}
    settings["PLeaS data-free 1.0x (random token ids)"] = {"data": {"kind": "generic"}, "data_free": True,
                                                           "target_width": 1.0}
    settings["PLeaS data-free 1.0x (random token ids, not tuned)"] = {"data": {"kind": "generic"}, "data_free": True,
                                                                      "target_width": 1.0, "tune_steps": 0}
    for label, setting in settings.items():
        key = cache_key("pleas-text", _pleas_version(setting), [str(p) for p in paths], setting)
        result = ws.cached(key, lambda setting=setting: _pleas_merge(
            ws, paths, setting, lambda out: {"scores": task.score(out, "test")}))
        rows.append({"name": label, **result})
    return rows


def _separate_heads(ws: Workspace, root: Path, save) -> list[dict]:
    """Model A knows digits 0-4 and model B digits 5-9, each with its own five-way head. The joint prediction
    reads A's outputs as digits 0-4 and B's as 5-9: PLeaS's merged head predicts over that union."""
    plan = ws.plan
    halves = ((1, (0, 1, 2, 3, 4)), (2, (5, 6, 7, 8, 9)))
    paths = []
    for seed, labels in halves:
        training = data.image_domain("clean", "train", labels)
        training = data.ImageSet(training.images, training.labels - labels[0])
        build = (lambda training=training, seed=seed: models.train_vision(
            models.new_vision_model(seed=seed, classes=5), training, epochs=plan.scratch_epochs, lr=0.05, seed=seed,
            weight_decay=5e-4))
        paths.append(trained(root / f"seed{seed}_head{labels[0]}", build, save, ws.log))
    test = data.image_domain("clean", "test")

    def joint(probabilities: torch.Tensor) -> float:
        return models.accuracy(probabilities, test.labels)

    def alone(path: Path, offset: int) -> float:
        predicted = models.vision_probabilities(models.load_vision(path), test).argmax(-1) + offset
        return float((predicted == test.labels).float().mean())

    def compute() -> list[dict]:
        from mergekit_lite.pleas import load_model

        rows = [{"name": "model A", "accuracy": alone(paths[0], 0)}, {"name": "model B", "accuracy": alone(paths[1], 5)}]
        both = torch.cat([models.vision_probabilities(models.load_vision(p), test) for p in paths], dim=1)
        rows.append({"name": "ensemble", "accuracy": joint(both)})
        for label, setting in pleas_settings(ws, root).items():
            setting = {**setting, "label_spaces": "separate"}
            key = cache_key("pleas-heads", _pleas_version(setting), [str(p) for p in paths], setting)
            score = lambda out: {"accuracy": joint(models.vision_probabilities(load_model(out), test))}  # noqa: E731
            result = ws.cached(key, lambda setting=setting: _pleas_merge(ws, paths, setting, score))
            rows.append({"name": label, **result})
        return rows

    return compute()


def pleas_settings(ws: Workspace, root: Path) -> dict[str, dict]:
    """PLeaS rows: permutation only, PLeaS at several widths, and data-free PLeaS. Data: unlabeled training
    images of the clean digits (both tasks' inputs); data-free: generic images made by the tool (refined to the
    models' batch-norm statistics, 200 steps by default), or digits from another domain (the noisy ones).

    The quick plan (CI) only shows that each path runs: PLeaS at 1.0x, with and without data, on few inputs and
    steps (data-free merges on another domain's images are tested on their own, in tests/test_pleas.py)."""
    from safetensors.torch import save_file

    inputs = root / "pleas_inputs.safetensors"
    if not inputs.exists():
        save_file({"images": data.image_domain("clean", "train").images.contiguous()}, str(inputs))
    with_data = {"data": {"path": str(inputs), "key": "images"}, **({"samples": 200} if ws.plan.quick else {})}
    generic = {"data": {"kind": "generic", "shape": [1, data.IMAGE_SIZE, data.IMAGE_SIZE]}, "data_free": True}
    settings = {"permutation only (1.0x)": {**with_data, "least_squares": False, "target_width": 1.0}}
    if ws.plan.quick:
        settings["PLeaS 1.0x"] = {**with_data, "target_width": 1.0}
        settings["PLeaS data-free 1.0x (generic inputs)"] = {**generic, "target_width": 1.0, "data_free_steps": 10,
                                                             "tune_steps": 20, "samples": 64}
        return settings
    for width in (1.0, 1.25, 1.5, 2.0):
        settings[f"PLeaS {width}x"] = {**with_data, "target_width": width}
    settings["PLeaS 1.0x, tuned 300 steps"] = {**with_data, "target_width": 1.0, "tune_steps": 300}
    settings["PLeaS data-free 1.0x (generic inputs)"] = {**generic, "target_width": 1.0}
    other = root / "pleas_other_domain.safetensors"
    if not other.exists():
        save_file({"images": data.image_domain("noise", "train").images.contiguous()}, str(other))
    settings["PLeaS data-free 1.0x (noisy-digit inputs)"] = {"data": {"path": str(other), "key": "images"},
                                                           "data_free": True, "target_width": 1.0}
    settings["PLeaS data-free 1.0x (generic inputs, not tuned)"] = {**generic, "target_width": 1.0, "tune_steps": 0}
    settings["PLeaS data-free 1.5x (generic inputs)"] = {**generic, "target_width": 1.5}
    return settings


def _pleas_merge(ws: Workspace, paths: list[Path], setting: dict, score: Callable[[Path], dict]) -> dict:
    """`merge run` on a PLeaS recipe for two checkpoints; `score(out_dir)` adds the scores; the merged
    directory is removed afterwards."""
    work = ws.root / "merges" / cache_key("pleas-run", [str(p) for p in paths], setting)
    work.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in setting.items() if k != "data"}
    if not params.get("data_free"):
        params.setdefault("samples", 1000)  # data-free rows take the tool's own default (256 refined inputs)
    lines = ["merge_method: pleas", "models:"] + [f"  - model: {p}" for p in paths]
    lines += [f"data: {json.dumps(setting['data'])}", f"parameters: {json.dumps(params)}"]
    recipe = work / "recipe.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    seconds = merge_run(recipe, work / "out")
    report = json.loads((work / "out" / "merge_report.json").read_text())
    result = {"seconds": seconds, "compute_ratio": report["pleas"]["compute_ratio"], **score(work / "out")}
    shutil.rmtree(work)
    return result


def run_pleas_scored(ws: Workspace, task: Task, paths: list[Path], setting: dict) -> dict:
    """A PLeaS merge (cached), scored on the test split."""
    parts = ["pleas", _pleas_version(setting), task.name, [str(p) for p in paths], setting]
    if setting.get("data", {}).get("kind") == "generic":
        parts.append("batch-norm-matched")  # generic inputs are refined to the models' statistics
    key = cache_key(*parts)
    return ws.cached(key, lambda: _pleas_merge(ws, paths, setting,
                                               lambda out: {"scores": {"test": pleas_task_score(task, out)}}))


def pleas_task_score(task: Task, directory: Path) -> dict[str, float]:
    """A PLeaS output may be wider than its sources: load it with the tool's loader, score like the others."""
    from mergekit_lite.pleas import load_model

    model = load_model(directory)
    out = {}
    for d in task.subtasks:
        images = data.image_domain(d, "test")
        out[d] = models.accuracy(models.vision_probabilities(model, images), images.labels)
    return out


# ---- the whole suite ----

def run(ws: Workspace) -> dict:
    ws.load()
    plan = ws.plan
    started = time.perf_counter()
    report: dict = {"quick": plan.quick}
    ws.log("experiment 1 (vision): shared base, domain experts")
    vision = vision_models(ws)
    report["vision"] = experiment_one(ws, vision_task(plan.vision_domains), vision, plan.vision_domains)
    ws.log("experiment 1 (text): shared base, domain experts")
    text = text_models(ws)
    report["text"] = experiment_one(ws, text_task(plan.text_domains), text, plan.text_domains)

    ws.log("experiment 4: Twin-Merging on a mixed test set")
    report["twin"] = {"vision": twin_rows.experiment_four(ws, vision_task(plan.vision_domains), vision, plan.vision_domains),
                      "text": twin_rows.experiment_four(ws, text_task(plan.text_domains), text, plan.text_domains)}
    if plan.expert_counts or plan.widths:
        ws.log("experiment 2: number of experts and width")
        report["scaling"] = experiment_two(ws)
    ws.log("experiment 3: different initialisations")
    report["different_init"] = experiment_three(ws)
    if not plan.quick:
        ws.log("experiment 3 (text): byte-level Llamas from different initialisations")
        report["different_init_text"] = experiment_three_text(ws)
    report["seconds"] = time.perf_counter() - started
    return report
