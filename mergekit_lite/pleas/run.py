"""`merge run` for a PLeaS recipe: load both models, build the data, merge, write a checkpoint and report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mergekit_lite.chat_templates import output_chat_template
from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec
from mergekit_lite.checkpoint.reader import run_fingerprint
from mergekit_lite.device import resolve_device
from mergekit_lite.errors import RecipeError
from mergekit_lite.models.data import data_batches, example_inputs, generic_shape
from mergekit_lite.models.loading import is_transformers, load_model, read_config
from mergekit_lite.pipeline import MergeOptions, Progress
from mergekit_lite.pleas.graph import check_groups, permutation_spec
from mergekit_lite.pleas.method import PleasOptions, check_same_structure, pleas_merge
from mergekit_lite.recipe import Recipe
from mergekit_lite.report import (REPORT_NAME, envelope, model_card, output_files, report_bytes, write_description,
                                  write_report)

DATA_FREE_TUNE_STEPS = 300
TASK_SAMPLES, DATA_FREE_SAMPLES = 1000, 256
DATA_FREE_WARNING = ("data-free: matching, least squares and tuning saw synthetic inputs only; the report's match "
                     "quality and output gap are measured on them and do not predict accuracy on the task (pairs "
                     "trained apart can merge far worse than with task data); check the merged model on task data")


def tune_steps(params: dict[str, Any]) -> int:
    """`tune_steps` as given, else 300 for a data-free merge (inputs cost nothing there and the layer-wise fit
    on them leaves the most to close) and 0 with task data (the published method, and the speed figure)."""
    given = params.get("tune_steps")
    if given is not None:
        return int(given)
    return DATA_FREE_TUNE_STEPS if params.get("data_free") else 0


def sample_count(params: dict[str, Any]) -> int:
    """`samples` as given, else 1000 inputs with task data and 256 data-free: a data-free input is refined by
    forward and backward passes of both models, most of a data-free merge's time, and 256 refined inputs merged
    as well as 1000 on the pairs measured (bench/RESULTS.md)."""
    given = params.get("samples")
    if given is not None:
        return int(given)
    return DATA_FREE_SAMPLES if params.get("data_free") else TASK_SAMPLES


def options_from(params: dict[str, Any], device: torch.device | str = "cpu", seed: int = 0) -> PleasOptions:
    return PleasOptions(target_width=float(params["target_width"]), ridge=float(params["ridge"]),
                        norm_statistics=str(params["norm_statistics"]), least_squares=bool(params["least_squares"]),
                        label_spaces=str(params["label_spaces"]), device=str(device),
                        tune_steps=tune_steps(params), tune_lr=float(params["tune_lr"]), seed=seed)


def check_generic_inputs(recipe: Recipe, data_free: bool, path: Path) -> None:
    """Data-free generic images need a size the config records or `data.shape`; say so before any work."""
    data = recipe.data.model_dump() if recipe.data else {}
    config = read_config(path)
    generic = data.get("kind") == "generic" or (data_free and not data.get("path"))
    if generic and not is_transformers(config):
        generic_shape(data, config, path)


def check_models(recipe: Recipe, allow_pickle: bool = False) -> dict[str, Any]:
    """What `merge validate` checks for PLeaS: both models build, have the same permutation groups, and
    permuting every group at random leaves the first model's outputs unchanged; the data path exists."""
    paths = [Path(entry.model) for entry in recipe.models]
    check_generic_inputs(recipe, bool(recipe.parameters.get("data_free", False)), paths[0])
    models = [load_model(p, allow_pickle=allow_pickle, transformers_ok=True) for p in paths]
    specs = [permutation_spec(m) for m in models]
    check_same_structure(specs[0], specs[1])
    error = check_groups(models[0], specs[0], example_inputs(read_config(paths[0]), 2))
    if recipe.data is not None and recipe.data.path is not None and not Path(recipe.data.path).exists():
        raise RecipeError(f"data.path {recipe.data.path}: not found")
    return {"groups": len(specs[0].groups), "units": sum(g.width for g in specs[0].groups if not g.blocks),
            "heads": sum(g.width for g in specs[0].groups if g.blocks),
            "layers": len(specs[0].layers), "self_check": error}


def run_recipe(recipe: Recipe, recipe_text: str, out: Path, params: dict[str, Any], options: MergeOptions,
               progress: Progress | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load both models, build the data, merge, and write the checkpoint, card and report."""
    started = time.perf_counter()
    log = log if log is not None else getattr(progress, "note", lambda message: None)
    force, seed, report_path = options.force, options.seed, options.report_path
    paths = [Path(entry.model) for entry in recipe.models]
    if recipe.base_model is not None:
        raise RecipeError("pleas merges two models from any initialisation; it takes no base_model")
    device = resolve_device(options.device if options.device != "auto" or recipe.device is None else recipe.device)
    check_generic_inputs(recipe, bool(params["data_free"]), paths[0])
    phases: dict[str, float] = {}
    models = [load_model(p, allow_pickle=options.allow_pickle, transformers_ok=True).to(device) for p in paths]
    config = read_config(paths[0])
    seed = seed if seed is not None else (recipe.seed if recipe.seed is not None else 0)
    batches, described = data_batches(recipe.data.model_dump() if recipe.data else None, models[0], config,
                                      sample_count(params), int(params["batch_size"]), seed,
                                      bool(params["data_free"]), model_dir=paths[0], statistics_of=models,
                                      statistics_steps=int(params["data_free_steps"]),
                                      allow_pickle=options.allow_pickle, timings=phases, progress=progress)
    loaded = time.perf_counter()
    result = pleas_merge(models[0], models[1], batches, options_from(params, device, seed), log=log, progress=progress)
    merged_at = time.perf_counter()
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    specs = [TensorSpec(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
    source_config = dict(config)
    outputs = result.report["outputs"]
    if outputs["label_spaces"] == "separate" and outputs["from_a"] is not None:
        classes = outputs["from_a"] + outputs["from_b"]  # the merged head: A's classes, then B's
        if "mergekit_lite_mlp" in source_config:
            source_config["mergekit_lite_mlp"] = [*source_config["mergekit_lite_mlp"][:-1], classes]
        else:
            source_config["num_classes"] = classes
            if isinstance(source_config.get("model_args"), dict):
                source_config["model_args"] = {**source_config["model_args"], "num_classes": classes}
    source_config["pleas"] = {
        "sources": [str(p) for p in paths], "target_width": result.report["target_width"],
        "compute_ratio": result.report["compute_ratio"],
        "group_widths": [g["merged_width"] for g in result.report["groups"]],
        "source_group_widths": [g["width"] for g in result.report["groups"]],
    }
    fingerprint = run_fingerprint(recipe.model_dump(mode="json"), f"{seed}", [str(p) for p in paths], options.allow_pickle)
    with CheckpointWriter(out, specs, force=force, metadata={"merged_with": "mergekit_lite pleas"},
                          resume=options.resume, fingerprint=fingerprint) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.add_file("config.json", json.dumps(source_config, indent=2) + "\n")
        source_dir = paths[0] if paths[0].is_dir() else paths[0].parent
        if options.copy_tokenizer:
            writer.copy_support_files(source_dir)  # tokenizer and generation files of a transformers model
            template = output_chat_template(recipe.chat_template, [p if p.is_dir() else p.parent for p in paths])
            if template is not None:
                writer.set_chat_template(template)
        write_description(writer, recipe_text,
                          _card(recipe, result.report, recipe_text) if options.write_model_card else None)
        refine = phases.get("refine", 0.0)
        report = envelope(
            kind="pleas", method="pleas", recipe=recipe.as_written(), seed=seed, device=device,
            inputs=[{"role": "model", "path": str(p)} for p in paths], output_path=out,
            files=output_files(writer.tmp_dir, writer.files, writer.shard_digest), tensors=len(state),
            timings={"read": loaded - started - refine, "refine": refine, "compute": merged_at - loaded,
                     "write": time.perf_counter() - merged_at, "total": time.perf_counter() - started},
            warnings=list(recipe.warnings) + ([DATA_FREE_WARNING] if "data-free" in described else []),
            sections={"data": {"source": described, "samples": sum(len(b) for b in batches)}, "pleas": result.report},
            hub_sources=recipe.hub_sources)
        if report_path is None:
            writer.add_file(REPORT_NAME, report_bytes(report).decode())
    if report_path is not None:
        write_report(report_path, report)
    return report


def _card(recipe: Recipe, report: dict, recipe_text: str) -> str:
    models = [recipe.reference_of(entry.model) for entry in recipe.models]
    body = ["Models merged:", ""] + [f"- `{model}`" for model in models]
    body += ["", f"Compute relative to one source model: {report['compute_ratio']:.3f} (target {report['target_width']}); "
             f"parameters: {report['parameter_ratio']:.3f}x.", "",
             "Load it with `mergekit_lite.pleas.load_model(path, transformers_ok=True)` (module shapes follow the "
             "weights; at width 1.0 it also loads with the source model's own loader)."]
    return model_card(title="Merged model (PLeaS)", tags=["pleas"], library=None,
                      intro="permutations and least squares, two models of one architecture.", body=body,
                      recipe_text=recipe_text, base_models=models)
