"""The tensor-wise pipeline: every method that merges tensor by tensor (linear, task arithmetic, TIES, DARE, ...),
planned from the checkpoints' headers and streamed by the engine into an atomically published checkpoint, with
config, tokenizer, recipe, model card and report."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mergekit_lite.checkpoint import CheckpointWriter, split_lora_reference
from mergekit_lite.checkpoint.files import load_json, resume_fingerprint, roots_of
from mergekit_lite.chat_templates import output_chat_template
from mergekit_lite.checkpoint.writer import support_files
from mergekit_lite.cluster import run_merge_on_ray
from mergekit_lite.engine import MergePlan, MergeResult, run_merge
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import MergeMethod
from mergekit_lite.params import check_parameters
from mergekit_lite.pipeline import DirectorySummary, MergeOptions, MethodFacts, Progress, Validation
from mergekit_lite.ray_session import address_of
from mergekit_lite.recipe import DTYPES, Recipe
from mergekit_lite.report import (REPORT_NAME, envelope, model_card, output_files, report_bytes, write_description,
                                  write_report)
from mergekit_lite.planning import plan_with_vocabularies
from mergekit_lite.slice_plan import layer_plan_lines
from mergekit_lite.units import human_bytes

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


def _directory(path: Path) -> Path:
    """The directory of a checkpoint reference (for `base+adapter`, the base's: the adapter has no tokenizer)."""
    lora = split_lora_reference(str(path))
    path = Path(lora[0]) if lora is not None else path
    return path if path.is_dir() else path.parent


def tokenizer_dir(recipe: Recipe, plan: MergePlan) -> Path:
    """Where tokenizer files are copied from when the merge does not build its own: the base model, else the
    first model."""
    if recipe.base_model:
        return _directory(Path(recipe.base_model))
    return plan.sources.reference.directory


def plan_fingerprint(plan: MergePlan, seed: int | None, shard_bytes: int | None) -> str:
    """What an interrupted run must share with this one for its tensors to be reused."""
    inputs = [ckpt for ckpt in [plan.sources.base, *plan.sources.experts] if ckpt is not None]
    return resume_fingerprint(plan.recipe.model_dump(mode="json"), f"{seed}|{shard_bytes}",
                              [shard for ckpt in inputs for shard in ckpt.shards])


def _dtype_updates(reference: Path, dtype: str) -> dict[str, str]:
    """Record the output dtype under the key(s) this config already uses (transformers renamed it)."""
    config_file = reference / "config.json"
    keys = []
    if os.path.lexists(config_file):
        config = load_json(config_file, roots_of(reference), "config.json")
        keys = [k for k in ("torch_dtype", "dtype") if isinstance(config, dict) and k in config]
    return {key: DTYPES[dtype] for key in keys or ["torch_dtype"]}


def build_report(result: MergeResult, out_dir: Path, written_dir: Path,
                 known_digest: Callable[[str], str | None] = lambda name: None) -> dict[str, Any]:
    """Everything a user needs to trust and reproduce a tensor-wise merge; `written_dir` is where the files lie
    now. `known_digest` gives a file's sha256 when the writer already computed it."""
    plan = result.plan
    sources = plan.sources
    inputs = [
        {"role": "base" if ckpt is sources.base else "model", "path": str(ckpt.path), "format": ckpt.format,
         "shards": [p.name for p in ckpt.shards], "bytes": ckpt.total_bytes, "tensors": len(ckpt.tensors)}
        for ckpt in ([sources.base] if sources.base is not None else []) + sources.experts
    ]
    timings = result.timings
    warnings = list(plan.warnings)
    if result.resumed:
        warnings.append(f"resumed: {result.resumed} tensor(s) were kept from an interrupted run (checksums verified)")
    if result.reverted:
        warnings.append(f"{len(result.reverted)} batch-norm variance tensor(s) came out zero or negative (the merged "
                        f"model would compute NaN) and were kept from {sources.reference.path} instead, e.g. "
                        f"{result.reverted[0]!r}")
    if result.nonfinite:
        warnings.append(f"{len(result.nonfinite)} merged tensor(s) hold NaN or Inf, e.g. {result.nonfinite[0]!r}")
    return envelope(
        kind="tensorwise", method=plan.method.name, recipe=plan.recipe.as_written(), seed=result.seed,
        device=result.device, inputs=inputs, output_path=out_dir,
        files=output_files(written_dir, result.files, known_digest), tensors=len(plan.tensors),
        timings={"read": timings.read, "compute": timings.compute, "write": timings.write,
                 "waiting_for_reads": timings.wait, "first_pass": timings.prepare, "total": result.wall_seconds},
        warnings=warnings, hub_sources=plan.recipe.hub_sources,
        sections={"tensors": result.tensor_stats, **({"layer_plan": plan.layer_plan} if plan.layer_plan else {}),
                  **({"ray": _ray_section(result)} if result.nodes else {})})


def _ray_section(result: MergeResult) -> dict[str, Any]:
    """Where a Ray run's tasks ran: one merge task per shard, and the rounds of the split first pass, if any."""
    section: dict[str, Any] = {"tasks": len(result.nodes), "nodes": sorted(set(result.nodes))}
    if result.first_pass_rounds:
        section["first_pass_rounds"] = result.first_pass_rounds
    return section


def recipe_models(recipe: Recipe) -> list[str]:
    """The inputs as the recipe names them (hub ids or paths): the model card's `base_model`."""
    return [recipe.reference_of(model) for model in recipe.references()]


def tensorwise_card(result: MergeResult, recipe_text: str) -> str:
    plan = result.plan
    sources = plan.sources
    body = [f"Base model: `{sources.base.path}`", ""] if sources.base is not None else []
    body += ["Models merged:", ""] + [f"- `{ckpt.path}`" for ckpt in sources.experts]
    return model_card(title=f"Merged model ({plan.method.name})", tags=[], base_models=recipe_models(plan.recipe),
                      library="transformers" if sources.reference.kind == "transformers" else "timm",
                      intro=f"**{plan.method.name}**, {plan.method.summary}.", body=body, recipe_text=recipe_text)


def merge_tensorwise(recipe: Recipe, recipe_text: str, out: Path, options: MergeOptions,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Plan and stream a tensor-wise merge into `out`, with config, tokenizer, recipe, card and report."""
    plan, vocabularies = plan_with_vocabularies(recipe, options.allow_pickle, options.allow_crimes)
    tokenizer_source = tokenizer_dir(recipe, plan)
    support_files(tokenizer_source)  # a link out of the checkpoint or a FIFO is refused now, not after the merge
    shard_bytes = shard_bytes_for(plan, options)
    report: dict[str, Any] = {}
    inputs = [ckpt.directory for ckpt in [plan.sources.base, *plan.sources.experts] if ckpt is not None]
    template = output_chat_template(recipe.chat_template, inputs)
    if recipe.chat_template and not options.copy_tokenizer and vocabularies is None:
        plan.warnings.append("chat_template: not written, since --no-copy-tokenizer writes no tokenizer")

    def finalize(result: MergeResult, writer: CheckpointWriter) -> None:
        reference = plan.sources.reference.directory
        out_dtype = recipe.out_dtype or recipe.dtype
        updates = _dtype_updates(reference, out_dtype) if out_dtype else {}
        updates.update(plan.config_updates)
        if plan.vocab_size is not None:
            updates["vocab_size"] = plan.vocab_size
        writer.copy_config(reference, updates)
        if vocabularies is not None:  # the tokenizer the rows were aligned to, as transformers saves it
            vocabularies.tokenizer.save_pretrained(str(writer.tmp_dir))
            writer.copy_support_files(tokenizer_source, only=("generation_config.json",))
        elif options.copy_tokenizer:
            writer.copy_support_files(tokenizer_source)
        if template is not None and (vocabularies is not None or options.copy_tokenizer):
            writer.set_chat_template(template)
        write_description(writer, recipe_text, tensorwise_card(result, recipe_text) if options.write_model_card else None)
        report.update(build_report(result, out, writer.tmp_dir, writer.shard_digest))
        if options.report_path is None:
            writer.add_file(REPORT_NAME, report_bytes(report).decode())

    settings = dict(device=options.device, force=options.force, seed=options.seed, shard_bytes=shard_bytes,
                    progress=progress, finalize=finalize, resume=options.resume,
                    fingerprint=plan_fingerprint(plan, options.seed, shard_bytes))
    if options.ray is not None:
        run_merge_on_ray(plan, out, address=address_of(options.ray),
                         allow_pickle=options.allow_pickle, allow_crimes=options.allow_crimes, **settings)
    else:
        run_merge(plan, out, **settings)
    if options.report_path is not None:
        write_report(options.report_path, report)
    return report


def shard_bytes_for(plan: MergePlan, options: MergeOptions) -> int | None:
    """The largest output shard in bytes: --shard-size (bytes), else --out-shard-size (mergekit's: parameters,
    at the output's bytes per parameter), else the recipe's shard_size, else the writer's default. A size below
    every tensor's puts each in its own file: said in the report's warnings."""
    recipe = plan.recipe
    if options.shard_size is not None:
        shard_bytes = parse_size(options.shard_size)
    elif options.shard_parameters is not None:
        numel = sum(math.prod(t.shape) for t in plan.tensors)
        shard_bytes = max(1, int(options.shard_parameters * plan.total_bytes / max(numel, 1)))
    elif recipe.shard_size is not None:
        shard_bytes = parse_size(recipe.shard_size)
    else:
        return None
    if plan.tensors and shard_bytes < min(t.nbytes for t in plan.tensors):
        plan.warnings.append(f"a shard size of {shard_bytes:,} bytes is below every tensor's size: each tensor goes "
                             "in a file of its own (shard sizes count bytes, e.g. 5GB; mergekit's --out-shard-size "
                             "counts parameters, e.g. 5B)")
    return shard_bytes


def validate_tensorwise(recipe: Recipe, allow_pickle: bool = False) -> MergePlan:
    """Plan from headers alone (paths, shapes, missing tensors), and check the tokenizer source and shard size."""
    plan, _vocabularies = plan_with_vocabularies(recipe, allow_pickle)
    support_files(tokenizer_dir(recipe, plan))
    if recipe.shard_size is not None:
        parse_size(recipe.shard_size)
    return plan


def plan_text(plan: MergePlan) -> str:
    """One line on what a plan merges: models, base, tensors merged and copied, bytes."""
    merged = sum(1 for t in plan.tensors if t.merge)
    return (f"{len(plan.sources.experts)} model(s)"
            + (f" and base {plan.sources.base.path}" if plan.sources.base is not None else "")
            + f"; {len(plan.tensors)} output tensors ({merged} merged, {len(plan.tensors) - merged} copied), "
            f"{human_bytes(plan.total_bytes)}")


@dataclass(frozen=True)
class TensorwisePipeline(MethodFacts):
    """A tensor-wise method as a Pipeline."""

    method: MergeMethod | None = None

    @classmethod
    def of(cls, method: MergeMethod) -> "TensorwisePipeline":
        return cls(method.name, method.summary, method.params, method.needs_base, method.min_models,
                   method.max_models, method.optional_base, method.base_as_input, method=method)

    def check(self, recipe: Recipe, source: str, lines: dict[tuple, int]) -> None:
        check_parameters(recipe, source, lines, self)

    def validate(self, recipe: Recipe, allow_pickle: bool = False) -> Validation:
        plan = validate_tensorwise(recipe, allow_pickle)
        lines = [f"{self.name} over {plan_text(plan)}"] + layer_plan_lines(plan.layer_plan or [])
        return Validation(lines, list(plan.warnings))

    def run(self, recipe: Recipe, recipe_text: str, out: Path, options: MergeOptions,
            progress: Progress) -> dict[str, Any]:
        return merge_tensorwise(recipe, recipe_text, out, options, progress)

    def describe(self, report: dict[str, Any]) -> list[str]:
        return layer_plan_lines(report.get("layer_plan") or [])

    def summarise_directory(self, path: Path) -> DirectorySummary | None:
        """An output of a sliced merge by this method: its layer plan, then the checkpoint."""
        report_file = Path(path) / REPORT_NAME
        if not Path(path).is_dir() or not report_file.is_file():
            return None
        report = load_json(report_file, roots_of(path), REPORT_NAME)
        if not isinstance(report, dict) or report.get("method") != self.name or not report.get("layer_plan"):
            return None
        rows = report["layer_plan"]
        return DirectorySummary("layer_plan", {"slices": rows}, "\n".join(["layer plan:"] + layer_plan_lines(rows)),
                                Path(path))
