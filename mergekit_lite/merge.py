"""The library entry point behind `merge run`: recipe file in, published checkpoint and report out."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_lite.checkpoint import CheckpointWriter
from mergekit_lite.checkpoint.files import (check_report_target, load_json, real, refuse_overlap,
                                            resume_fingerprint, roots_of)
from mergekit_lite.checkpoint.lock import output_lock
from mergekit_lite.checkpoint.writer import check_output_path, support_files
from mergekit_lite.engine import MergePlan, MergeResult, Progress, plan_merge, run_merge
from mergekit_lite.errors import RecipeError, UserError
from mergekit_lite.methods import get_method
from mergekit_lite.recipe import Recipe, load_recipe, recipe_params
from mergekit_lite.report import build_report, model_card, write_report

REPORT_NAME = "merge_report.json"
RECIPE_NAME = "merge_recipe.yaml"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(value: str | int) -> int:
    """'5GB', '500MiB' or a number of bytes -> bytes."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise RecipeError(f"shard_size {value!r} is not a size like 5GB, 500MB or 1048576")
        unit = (match.group(2) or "").upper().removesuffix("B")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise RecipeError(f"shard_size {value!r} must be positive")
    return size


@dataclass
class MergeOptions:
    device: str = "auto"
    force: bool = False
    seed: int | None = None
    shard_size: str | int | None = None
    allow_pickle: bool = False
    report_path: Path | None = None
    resume: bool = False


def resolve_output(recipe: Recipe, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if recipe.output:
        return Path(recipe.output)
    raise UserError("no output directory: give OUT_DIR on the command line or an 'output:' key in the recipe")


def tokenizer_dir(recipe: Recipe, plan: MergePlan) -> Path:
    """Where tokenizer files come from: tokenizer_source (base or a path), else base_model, else the first model."""
    source = recipe.tokenizer_source
    if source in (None, "base"):
        if recipe.base_model:
            return _directory(Path(recipe.base_model))
        if source == "base":
            raise RecipeError("tokenizer_source: base needs base_model")
        return plan.sources.reference.directory
    if source == "union":
        raise RecipeError("tokenizer_source: union (merging vocabularies) is not supported; name base or a model path")
    path = Path(source)
    if not path.exists():
        raise RecipeError(f"tokenizer_source {source!r}: no such directory")
    return _directory(path)


def recipe_inputs(recipe: Recipe) -> list[str]:
    """Every path a recipe reads: models, base, tokenizer source, data."""
    paths = [entry.model for entry in recipe.models] + ([recipe.base_model] if recipe.base_model else [])
    if recipe.tokenizer_source not in (None, "base", "union"):
        paths.append(recipe.tokenizer_source)
    data = [recipe.data] + [entry.data for entry in recipe.models]
    return paths + [item.path for item in data if item is not None and item.path]


def guard_paths(inputs: list[str], out: Path, force: bool, report_path: Path | None) -> None:
    """Before any work: the output may be written, is apart from every input (so --force cannot delete one),
    and --report is new or an earlier report."""
    check_output_path(out, force)
    refuse_overlap(out, inputs, "output")
    if report_path is not None:
        refuse_overlap(report_path, inputs, "report")
        if real(report_path) == real(out) or real(report_path).is_relative_to(real(out)):
            raise UserError(f"{report_path}: --report lies in the output directory; leave --report out to write it there")
        check_report_target(report_path)



def _directory(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def merge_recipe_file(recipe_path: str | Path, out_dir: str | Path | None, options: MergeOptions,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Validate, plan, merge and publish; returns the report (also written to the output or --report). The output
    is locked from here to its publication: a second run on it is refused at once."""
    recipe, _lines, recipe_text = load_recipe(recipe_path)
    out = resolve_output(recipe, out_dir)
    guard_paths(recipe_inputs(recipe), out, options.force, options.report_path)
    with output_lock(out):
        method = get_method(recipe.merge_method)
        if method.runner is not None:
            params = recipe_params(recipe, method, None, "", None, 0)
            return method.runner(recipe, recipe_text, out, params, options, progress)
        return merge_tensorwise(recipe, recipe_text, out, options, progress)


def merge_tensorwise(recipe: Recipe, recipe_text: str, out: Path, options: MergeOptions,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Plan and stream a tensor-wise merge into `out`, with config, tokenizer, recipe, card and report."""
    plan = plan_merge(recipe, allow_pickle=options.allow_pickle)
    tokenizer_source = tokenizer_dir(recipe, plan)
    support_files(tokenizer_source)  # a link out of the checkpoint or a FIFO is refused now, not after the merge
    shard = options.shard_size if options.shard_size is not None else recipe.shard_size
    report: dict[str, Any] = {}

    def finalize(result: MergeResult, writer: CheckpointWriter) -> None:
        reference = plan.sources.reference.directory
        out_dtype = recipe.out_dtype or recipe.dtype
        writer.copy_config(reference, _dtype_updates(reference, out_dtype) if out_dtype else None)
        writer.copy_support_files(tokenizer_source)
        writer.add_file(RECIPE_NAME, recipe_text)
        writer.add_file("README.md", model_card(result, recipe_text))
        report.update(build_report(result, out, writer.tmp_dir, writer.shard_digest))
        if options.report_path is None:
            writer.add_file(REPORT_NAME, json.dumps(report, indent=2) + "\n")

    shard_bytes = parse_size(shard) if shard is not None else None
    run_merge(plan, out, device=options.device, force=options.force, seed=options.seed, shard_bytes=shard_bytes,
              progress=progress, finalize=finalize, resume=options.resume,
              fingerprint=plan_fingerprint(plan, options.seed, shard_bytes))
    if options.report_path is not None:
        write_report(options.report_path, report)
    return report


def plan_fingerprint(plan: MergePlan, seed: int | None, shard_bytes: int | None) -> str:
    """What an interrupted run must share with this one for its tensors to be reused."""
    inputs = [ckpt for ckpt in [plan.sources.base, *plan.sources.experts] if ckpt is not None]
    return resume_fingerprint(plan.recipe.model_dump(mode="json"), f"{seed}|{shard_bytes}",
                              [shard for ckpt in inputs for shard in ckpt.shards])


def _dtype_updates(reference: Path, dtype: str) -> dict[str, str]:
    """Record the output dtype under the key(s) this config already uses (transformers renamed it)."""
    from mergekit_lite.recipe import DTYPES

    config_file = reference / "config.json"
    keys = []
    if os.path.lexists(config_file):
        config = load_json(config_file, roots_of(reference), "config.json")
        keys = [k for k in ("torch_dtype", "dtype") if isinstance(config, dict) and k in config]
    return {key: DTYPES[dtype] for key in keys or ["torch_dtype"]}


def validate_recipe_file(recipe_path: str | Path, allow_pickle: bool = False) -> tuple[Recipe, MergePlan]:
    """Check a recipe and its inputs (paths, shapes, missing tensors) from headers alone; merges nothing."""
    recipe, _, _ = load_recipe(recipe_path)
    planned = recipe
    if recipe.merge_method == "twin":  # its shared expert is a tensor-wise merge; every task's data must exist
        from mergekit_lite.twin.build import check_data_paths, shared_recipe

        check_data_paths(recipe)
        planned = shared_recipe(recipe)
    plan = plan_merge(planned, allow_pickle=allow_pickle)
    support_files(tokenizer_dir(recipe, plan))
    if recipe.shard_size is not None:
        parse_size(recipe.shard_size)
    return recipe, plan
