"""The dispatcher behind `merge run` and `merge validate`: read the recipe once, pick the pipeline its method
belongs to, let it check the recipe, then validate or run it. Names no method: each pipeline says which it is."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mergekit_lite.chat_templates import check_chat_template
from mergekit_lite.checkpoint.files import check_report_target, real, refuse_overlap
from mergekit_lite.checkpoint.lora import split_lora_reference
from mergekit_lite.checkpoint.lock import output_lock
from mergekit_lite.checkpoint.writer import check_output_path
from mergekit_lite.errors import RecipeError, UserError
from mergekit_lite.hub import resolve_hub_ids
from mergekit_lite.methods import METHODS
from mergekit_lite.pipeline import DirectorySummary, MergeOptions, Pipeline, Progress, SilentProgress, Validation
from mergekit_lite.recipe import Recipe, location, parse_recipe_text, read_recipe_text
from mergekit_lite.tensorwise import TensorwisePipeline

# Methods that load whole models live in packages named after them, which bring scipy, torch.fx and model code
# along; each is imported the first time a recipe or a report names its method, so a tensor-wise merge starts
# without them.
WHOLE_MODEL_PIPELINES = ("mergekit_lite.pleas.pipeline", "mergekit_lite.twin.pipeline")


class PipelineRegistry(Mapping[str, Pipeline]):
    """Method name -> its pipeline: tensor-wise ones built at once, the others imported when first asked for
    (each module's PIPELINE, whose method is named after the package holding it)."""

    def __init__(self, ready: dict[str, Pipeline], deferred: tuple[str, ...]) -> None:
        self._ready = dict(ready)
        self._deferred = {module.split(".")[-2]: module for module in deferred}

    def __getitem__(self, name: str) -> Pipeline:
        if name not in self._ready and name in self._deferred:
            pipeline = importlib.import_module(self._deferred[name]).PIPELINE
            if pipeline.name != name:
                raise TypeError(f"{self._deferred[name]} holds the {pipeline.name!r} pipeline, not {name!r}")
            self._ready[name] = pipeline
        return self._ready[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._ready, *(name for name in self._deferred if name not in self._ready)])

    def __len__(self) -> int:
        return len(self._ready.keys() | self._deferred.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._ready or name in self._deferred


PIPELINES = PipelineRegistry({name: TensorwisePipeline.of(method) for name, method in METHODS.items()},
                             WHOLE_MODEL_PIPELINES)


def pipeline_for(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise RecipeError(f"unknown merge_method {name!r}; available: {', '.join(sorted(PIPELINES))}") from None


def parse_recipe(text: str, source: str = "<recipe>") -> tuple[Recipe, dict[tuple, int]]:
    """A recipe's text -> Recipe, checked by its method's pipeline; errors name the source, line and key."""
    recipe, lines = parse_recipe_text(text, source)
    try:
        pipeline = pipeline_for(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"{location(source, lines, ('merge_method',))}: {exc}") from None
    if not pipeline.streams_tensors and recipe.slices is not None:
        raise RecipeError(f"{location(source, lines, ('slices',))}: {recipe.merge_method} loads whole models; "
                          "slices are for tensor-wise methods")
    pipeline.check(recipe, source, lines)
    if recipe.chat_template:
        try:
            check_chat_template(recipe.chat_template)
        except RecipeError as exc:
            raise RecipeError(f"{location(source, lines, ('chat_template',))}: {exc}") from None
    if not pipeline.streams_tensors:
        _refuse_adapters(recipe, source, lines)
    return recipe, lines


def _refuse_adapters(recipe: Recipe, source: str, lines: dict[tuple, int]) -> None:
    """Methods that run the models load them whole: a LoRA reference is applied first, by a tensor-wise merge."""
    references = [(("models", index, "model"), entry.model) for index, entry in enumerate(recipe.models)]
    references.append((("base_model",), recipe.base_model))
    for loc, reference in references:
        if reference is not None and split_lora_reference(reference) is not None:
            raise RecipeError(f"{location(source, lines, loc)}: {recipe.merge_method} loads whole models and does not "
                              f"apply LoRA adapters ({reference}); write the adapted model first with a linear merge "
                              "of that one reference, then name its output here")


def load_recipe(path: str | Path) -> tuple[Recipe, dict[tuple, int], str]:
    """Parse and check a recipe file; returns the text too."""
    text = read_recipe_text(path)
    recipe, lines = parse_recipe(text, str(path))
    return recipe, lines, text


def resolve_output(recipe: Recipe, out_dir: str | Path | None) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if recipe.output:
        return Path(recipe.output)
    raise UserError("no output directory: give OUT_DIR on the command line or an 'output:' key in the recipe")


def recipe_inputs(recipe: Recipe) -> list[str]:
    """Every path a recipe reads: models, base, tokenizer source, data."""
    references = recipe.references()
    paths = [path for reference in references for path in (split_lora_reference(reference) or (reference,))]
    if recipe.vocabulary_source not in (None, "base", "union"):
        paths.append(recipe.vocabulary_source)
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


def merge_recipe_file(recipe_path: str | Path, out_dir: str | Path | None, options: MergeOptions,
                      progress: Progress | None = None) -> dict[str, Any]:
    """Check, merge and publish; returns the report (also written to the output or --report). The output is
    locked from here to its publication: a second run on it is refused at once."""
    recipe, _lines, recipe_text = load_recipe(recipe_path)
    return merge_recipe(recipe, recipe_text, out_dir, options, progress)


def merge_recipe(recipe: Recipe, recipe_text: str, out_dir: str | Path | None, options: MergeOptions,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Merge a checked recipe (its text is kept beside the output)."""
    out = resolve_output(recipe, out_dir)
    pipeline = pipeline_for(recipe.merge_method)
    if options.ray is not None and not pipeline.runs_on_ray:
        raise UserError(f"--ray: {recipe.merge_method} merges whole models in one process; run it without --ray")
    resolve_hub_ids(recipe, options.allow_pickle)
    guard_paths(recipe_inputs(recipe), out, options.force, options.report_path)
    with output_lock(out):
        return pipeline.run(recipe, recipe_text, out, options, progress or SilentProgress())


def validate_recipe(recipe: Recipe, allow_pickle: bool = False) -> Validation:
    """Check a recipe against its inputs (paths, shapes, missing tensors; models, for the pipelines that run them)
    without merging."""
    resolve_hub_ids(recipe, allow_pickle)
    found = pipeline_for(recipe.merge_method).validate(recipe, allow_pickle)
    found.warnings = list(recipe.warnings) + [w for w in found.warnings if w not in recipe.warnings]
    return found


def validate_recipe_file(recipe_path: str | Path, allow_pickle: bool = False) -> Validation:
    recipe, _, _ = load_recipe(recipe_path)
    return validate_recipe(recipe, allow_pickle)


def describe_report(report: dict[str, Any]) -> list[str]:
    """The lines a report's method adds to `merge run` and `merge report` (none for an unknown method)."""
    pipeline = PIPELINES.get(str(report.get("method")))
    return pipeline.describe(report) if pipeline is not None else []


def summarise_directory(path: Path) -> DirectorySummary | None:
    """A directory one of the pipelines lays out its own way (e.g. Twin-Merging's), else None."""
    for pipeline in PIPELINES.values():
        summary = pipeline.summarise_directory(path)
        if summary is not None:
            return summary
    return None
