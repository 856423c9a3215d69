"""`merge()` and `validate()`: the library's entry points, and what the `merge` command calls. A recipe may be a
path to a YAML file, a dict of its keys (as YAML would give them), or a Recipe; it is checked exactly as the
command line checks it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergekit_lite.dispatch import load_recipe, merge_recipe, parse_recipe, validate_recipe
from mergekit_lite.errors import RecipeError
from mergekit_lite.pipeline import MergeOptions, Progress, Validation
from mergekit_lite.recipe import Recipe

RecipeLike = str | Path | dict[str, Any] | Recipe


def _checked(recipe: RecipeLike) -> tuple[Recipe, str]:
    """(checked Recipe, its YAML text) from any of the forms a caller may hold."""
    if isinstance(recipe, (str, Path)):
        parsed, _, text = load_recipe(recipe)
        return parsed, text
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="json", exclude_none=True)
    if not isinstance(recipe, dict):
        raise RecipeError(f"a recipe is a path, a dict or a Recipe, not {type(recipe).__name__}")
    text = yaml.safe_dump(recipe, sort_keys=False)
    parsed, _ = parse_recipe(text, "<recipe>")
    return parsed, text


def merge(recipe: RecipeLike, out: str | Path | None = None, *, device: str = "auto", force: bool = False,
          seed: int | None = None, shard_size: str | int | None = None, allow_pickle: bool = False,
          report_path: str | Path | None = None, resume: bool = False, shard_parameters: int | None = None,
          copy_tokenizer: bool = True, write_model_card: bool = True, allow_crimes: bool = False,
          ray: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Merge what the recipe names into `out` (or the recipe's `output:`), published atomically; returns the
    report (also written as out/merge_report.json, or to `report_path`). The keyword arguments are `merge run`'s
    flags; errors raise mergekit_lite.errors.UserError (RecipeError, CheckpointError) with one clear line."""
    parsed, text = _checked(recipe)
    options = MergeOptions(device=device, force=force, seed=seed, shard_size=shard_size, allow_pickle=allow_pickle,
                           report_path=Path(report_path) if report_path is not None else None, resume=resume,
                           shard_parameters=shard_parameters, copy_tokenizer=copy_tokenizer,
                           write_model_card=write_model_card, allow_crimes=allow_crimes, ray=ray)
    return merge_recipe(parsed, text, out, options, progress)


def validate(recipe: RecipeLike, *, allow_pickle: bool = False) -> Validation:
    """Check a recipe and its inputs without merging; returns what passed (`lines`) and `warnings`."""
    parsed, _ = _checked(recipe)
    return validate_recipe(parsed, allow_pickle)
