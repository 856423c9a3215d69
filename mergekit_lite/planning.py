"""Planning a tensor-wise merge from a checked recipe: layer slices, or models (with the output tokenizer built
first when the recipe asks for one). Used by the local run and by every Ray task, which plans the same merge
again from the same recipe and headers."""

from __future__ import annotations

from mergekit_lite.engine import MergePlan, plan_merge
from mergekit_lite.errors import RecipeError
from mergekit_lite.recipe import Recipe
from mergekit_lite.slice_plan import plan_slices
from mergekit_lite.vocab_build import Vocabularies, build_vocabularies


def plan_with_vocabularies(recipe: Recipe, allow_pickle: bool = False, allow_crimes: bool = False
                           ) -> tuple[MergePlan, Vocabularies | None]:
    """The merge plan; with `tokenizer_source` or a `tokenizer:` block, the output tokenizer is built first and
    embedding rows are aligned to it by token."""
    if recipe.slices is not None:
        if recipe.vocabulary_source is not None:
            raise RecipeError("tokenizer_source (or a tokenizer block) with slices is not supported yet; merge with "
                              "models:, or leave the tokenizer to be copied from the base")
        return plan_slices(recipe, allow_pickle, allow_crimes), None
    vocabularies = build_vocabularies(recipe) if recipe.vocabulary_source is not None else None
    plan = plan_merge(recipe, allow_pickle=allow_pickle, allow_crimes=allow_crimes, vocabularies=vocabularies)
    return plan, vocabularies
