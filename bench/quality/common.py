"""What every part of the quality suite shares: its plan and cached workspace, training cache, merging through the
command line, cache keys, scoring tasks and the normalised score."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import data
import models

PER_MODEL = ("density", "gamma", "epsilon", "weight")  # recipe parameters given per model, not globally


@dataclass
class Plan:
    """How big the suite is: the full run, or the quick one CI runs."""

    quick: bool
    vision_domains: tuple[str, ...]
    text_domains: tuple[str, ...]
    base_fraction: float = 0.02  # of each shifted domain's training images seen by the vision base
    base_epochs: int = 10
    expert_epochs: int = 4
    scratch_epochs: int = 15
    text_base_steps: int = 300
    text_expert_steps: int = 100
    text_width: float = 1.0
    grid: bool = True
    expert_counts: tuple[int, ...] = (2, 4, 6, 8)
    widths: tuple[float, ...] = (0.5, 1.0, 2.0)
    width_experts: int = 4

    @classmethod
    def full(cls) -> "Plan":
        shifted = tuple(d for d in data.IMAGE_DOMAINS if d != data.HOME_DOMAIN)
        return cls(False, shifted, tuple(data.TEXT_DOMAINS))

    @classmethod
    def fast(cls) -> "Plan":
        return cls(True, ("invert", "rotate"), ("prose", "unicode"), base_epochs=3, expert_epochs=2,
                   scratch_epochs=2, text_base_steps=40, text_expert_steps=20, text_width=0.5, grid=False,
                   expert_counts=(), widths=(), width_experts=0)


@dataclass
class Workspace:
    root: Path
    plan: Plan
    results: dict = field(default_factory=dict)
    log: Callable[[str], None] = print

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    def load(self) -> None:
        if self.results_file.exists():
            self.results = json.loads(self.results_file.read_text())

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=True))
        tmp.replace(self.results_file)

    def cached(self, key: str, compute: Callable[[], dict]) -> dict:
        if key not in self.results:
            self.results[key] = compute()
            self.save()
        return self.results[key]


def trained(directory: Path, train: Callable[[], torch.nn.Module], save: Callable[[torch.nn.Module, Path], Path],
             log: Callable[[str], None]) -> Path:
    """A trained checkpoint, cached: built in a sibling directory and renamed, so a half-trained model
    never looks finished."""
    if (directory / "config.json").exists():
        return directory
    started = time.perf_counter()
    model = train()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)
    tmp.rename(directory)
    log(f"  trained {directory.name} in {time.perf_counter() - started:.0f} s")
    return directory


# ---- merging through the command line ----

def write_recipe(path: Path, method: str, base: Path | None, experts: list[Path], setting: dict) -> Path:
    per_model = {k: v for k, v in setting.items() if k in PER_MODEL}
    global_params = {k: v for k, v in setting.items() if k not in PER_MODEL}
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for expert in experts:
        lines.append(f"  - model: {expert}")
        if per_model:
            lines.append(f"    parameters: {json.dumps(per_model)}")
    if global_params:
        lines.append(f"parameters: {json.dumps(global_params)}")
    lines.append("dtype: float32")
    path.write_text("\n".join(lines) + "\n")
    return path


def merge_run(recipe: Path, out: Path) -> float:
    """`merge run RECIPE OUT --force --quiet` in this process (the CLI's own entry); returns seconds."""
    from mergekit_lite.cli import app

    started = time.perf_counter()
    try:
        app(["run", str(recipe), str(out), "--force", "--quiet"], prog_name="merge", standalone_mode=False)
    except SystemExit as stop:
        if stop.code:
            raise RuntimeError(f"merge run {recipe} failed with exit code {stop.code}") from None
    return time.perf_counter() - started


def cache_key(*parts) -> str:
    """A cache key; a checkpoint directory among the parts counts with its weights' modification time, so a
    retrained model never reuses the scores of the one it replaced."""
    def stamp(part):
        if isinstance(part, (list, tuple)):
            return [stamp(p) for p in part]
        if isinstance(part, str) and (Path(part) / "config.json").exists():
            weights = Path(part) / "model.safetensors"
            return [part, weights.stat().st_mtime_ns if weights.exists() else None]
        return part

    return hashlib.sha1(json.dumps([stamp(p) for p in parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- scoring ----

@dataclass
class Task:
    """Scores a checkpoint directory on named subtasks of one split; higher_is_better for accuracy."""

    name: str
    subtasks: tuple[str, ...]
    score: Callable[[Path, str], dict[str, float]]  # (checkpoint dir, split) -> {subtask: score}
    higher_is_better: bool


def vision_task(domains: tuple[str, ...], labels: tuple[int, ...] | None = None) -> Task:
    sets = {(d, s): data.image_domain(d, s, labels) for d in domains for s in ("val", "test")}

    def score(directory: Path, split: str) -> dict[str, float]:
        model = models.load_vision(directory)
        return {d: models.accuracy(models.vision_probabilities(model, sets[(d, split)]), sets[(d, split)].labels)
                for d in domains}

    return Task("vision", domains, score, True)


def text_task(domains: tuple[str, ...]) -> Task:
    windows = {(d, s): models.evaluation_windows(data.text_domain(d, s)) for d in domains for s in ("val", "test")}

    def score(directory: Path, split: str) -> dict[str, float]:
        model = models.load_text(directory)
        return {d: models.loss_of(models.text_log_probabilities(model, windows[(d, split)])) for d in domains}

    return Task("text", domains, score, False)


def normalised(task: Task, scores: dict[str, float], base: dict[str, float], experts: dict[str, float]) -> dict[str, float]:
    """Accuracy: merged / expert. Loss: the fraction of the base-to-expert gap closed."""
    if task.higher_is_better:
        return {t: scores[t] / experts[t] for t in scores}
    return {t: (base[t] - scores[t]) / (base[t] - experts[t]) for t in scores}


def score_cached(ws: Workspace, task: Task, directory: Path, split: str, tag: str) -> dict[str, float]:
    return ws.cached(cache_key("score", task.name, str(directory), split, tag, task.subtasks), lambda: task.score(directory, split))


def mean(values: dict[str, float] | list[float]) -> float:
    items = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(items) / len(items)
