"""What a method's recipe parameters are and how they resolve: the spec of each parameter, the check of a recipe's
parameters against a method's specs, and a parameter's value for one tensor (per model, else recipe-wide, else
the default; filters by tensor name, gradients over the layers).

A parameter value is a scalar, a list of `{filter: substring, value: v}` (first match on the tensor name wins, an
entry without filter is the fallback), or a gradient: a list of numbers interpolated over the layer index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from mergekit_lite.checkpoint.files import same_path
from mergekit_lite.errors import RecipeError
from mergekit_lite.recipe import FilterEntry, ParamValue, Recipe, Scalar, did_you_mean, dotted_key, location

# Every parameter some mergekit method reads. mergekit ignores one that the recipe's method does not read; here
# that is a warning (a recipe written for another method, or copied from a model card), and a name outside
# this set and the method's own is an error.
MERGEKIT_PARAMETERS = frozenset({
    "weight", "density", "epsilon", "lambda", "gamma", "normalize", "rescale", "int8_mask", "t", "filter_wise",
    "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "max_iter", "tol", "scale", "alpha", "eps", "r",
    "normalize_weights",
})


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter: its type, default, allowed range, and where it is usually given."""

    name: str
    kind: type  # float, int, bool or str
    default: Any
    help: str
    scope: str = "model"  # "model" (per model, may be given globally) or "global" (recipe-wide only)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False  # no default: the recipe must give it (as mergekit requires it)

    def check(self, value: Any) -> str | None:
        """Why `value` is not acceptable, or None when it is."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind is str:
            if not isinstance(value, str):
                return "must be a string"
            if self.choices and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, not {value!r}"
        if self.kind is int and not float(value).is_integer():
            return "must be an integer"
        if value != value or value in (float("inf"), float("-inf")):
            return "must be finite"
        if self.minimum is not None:
            if self.exclusive_minimum and value <= self.minimum:
                return f"must be greater than {self.minimum:g}"
            if not self.exclusive_minimum and value < self.minimum:
                return f"must be at least {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}"
        return None


class Parameterised(Protocol):
    """What checking a recipe needs to know of a method (a tensor-wise method or a model-aware pipeline)."""

    name: str
    params: tuple[ParamSpec, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    optional_base: bool
    base_as_input: bool


def check_parameters(recipe: Recipe, source: str, lines: dict[tuple, int], method: Parameterised,
                     per_model: bool = True) -> None:
    """Known parameter names, types and ranges, model counts, base model. With `per_model` False the method
    reads its models' entries itself (tasks, data, parameters) and only the recipe-wide parameters are checked
    here."""
    where: Callable[[tuple], str] = lambda loc: location(source, lines, loc)  # noqa: E731
    known = {p.name: p for p in method.params}
    given = [(("parameters", name), name, value) for name, value in recipe.parameters.items()]
    if per_model:
        _refuse_composite_keys(recipe, where)
        for index, entry in enumerate(recipe.models):
            given += [(("models", index, "parameters", name), name, value) for name, value in entry.parameters.items()]
        for index, piece in enumerate(recipe.slices or []):
            given += [(("slices", index, "parameters", name), name, value) for name, value in piece.parameters.items()]
            for number, part in enumerate(piece.sources):
                given += [(("slices", index, "sources", number, "parameters", name), name, value)
                          for name, value in part.parameters.items()]
    for loc, name, value in given:
        spec = known.get(name)
        if spec is None:
            if name in MERGEKIT_PARAMETERS:
                recipe.warnings.append(f"{where(loc)}: {dotted_key(loc)}: {method.name} does not use {name}; ignored")
                _drop(recipe, loc)
                continue
            names = ", ".join(known) or "none"
            raise RecipeError(f"{where(loc)}: {dotted_key(loc)}: unknown parameter for {method.name}"
                              f"{did_you_mean(name, [*known, *MERGEKIT_PARAMETERS])} (known: {names})")
        if spec.scope == "global" and (loc[0] == "models" or "sources" in loc):
            recipe.warnings.append(f"{where(loc)}: {dotted_key(loc)}: {name} is recipe-wide, read from the top-level "
                                   "parameters only; ignored here")
            _drop(recipe, loc)
            continue
        if spec.kind is bool and not isinstance(value, (bool, list)) and value in (0, 1):
            recipe.warnings.append(f"{where(loc)}: {dotted_key(loc)}: {value!r} read as {bool(value)}")
            _parameters_at(recipe, loc)[name] = bool(value)
            continue
        for scalar in _scalars(value):
            problem = spec.check(scalar)
            if problem:
                raise RecipeError(f"{where(loc)}: {dotted_key(loc)}: {problem}")
    if recipe.slices is not None:
        _check_slice_models(recipe, method, where)
        return
    separate_base = method.needs_base or method.optional_base
    experts = [m for m in recipe.models if not separate_base or recipe.base_model is None
               or not same_path(m.model, recipe.base_model)]
    count = len(experts) + (1 if method.base_as_input and recipe.base_model is not None and not any(
        same_path(m.model, recipe.base_model) for m in recipe.models) else 0)
    for spec in method.params:
        if not spec.required or spec.name in recipe.parameters:
            continue
        if spec.scope == "global" or not per_model or any(spec.name not in m.parameters for m in experts):
            where_given = "under parameters" if spec.scope == "global" else "per model or under parameters"
            raise RecipeError(f"{source}: {method.name} needs {spec.name} ({spec.help}), given {where_given}")
    if method.needs_base and recipe.base_model is None:
        raise RecipeError(f"{source}: {method.name} needs base_model")
    if count < method.min_models:
        raise RecipeError(f"{where(('models',))}: {method.name} needs at least {method.min_models} model(s) besides the base")
    if method.max_models is not None and count > method.max_models:
        raise RecipeError(f"{where(('models',))}: {method.name} takes at most {method.max_models} model(s) besides the base")


def _check_slice_models(recipe: Recipe, method: Parameterised, where: Callable[[tuple], str]) -> None:
    """Per slice: its base among its sources where the method needs one, and the method's model count."""
    for index, piece in enumerate(recipe.slices):
        base = piece.base_model or recipe.base_model
        has_base = base is not None and any(same_path(s.model, base) for s in piece.sources)
        if method.needs_base and not has_base:
            raise RecipeError(f"{where(('slices', index))}: slices[{index}]: {method.name} needs base_model among the "
                              "slice's sources (the layers the others are measured against)")
        separate = (method.needs_base or method.optional_base) and has_base
        count = sum(1 for s in piece.sources if not (separate and same_path(s.model, base)))
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            raise RecipeError(f"{where(('slices', index, 'sources'))}: slices[{index}]: {method.name} takes at least "
                              f"{method.min_models}{most} source(s) besides the base; this slice has {count}")
        for spec in method.params:
            missing = spec.required and spec.name not in recipe.parameters and spec.name not in piece.parameters
            if missing and (spec.scope == "global" or any(spec.name not in s.parameters for s in piece.sources)):
                raise RecipeError(f"{where(('slices', index))}: {method.name} needs {spec.name} ({spec.help})")


def _parameters_at(recipe: Recipe, loc: tuple) -> dict[str, ParamValue]:
    """The parameters mapping a parameter's location points into (top level, one model's, a slice's or one of
    its sources')."""
    if loc[0] == "parameters":
        return recipe.parameters
    if loc[0] == "models":
        return recipe.models[loc[1]].parameters
    piece = recipe.slices[loc[1]]
    return piece.sources[loc[3]].parameters if loc[2] == "sources" else piece.parameters


def _drop(recipe: Recipe, loc: tuple) -> None:
    """Remove an ignored parameter, so that the merge and its report see only what is used."""
    del _parameters_at(recipe, loc)[loc[-1]]


def _refuse_composite_keys(recipe: Recipe, where: Callable[[tuple], str]) -> None:
    """task, per-model data and shared_merge belong to recipes whose method reads them (twin); elsewhere they
    would be silently ignored."""
    if recipe.shared_merge is not None:
        raise RecipeError(f"{where(('shared_merge',))}: shared_merge: only a twin recipe has a shared merge")
    for index, entry in enumerate(recipe.models):
        for key in ("task", "data"):
            if getattr(entry, key) is not None:
                raise RecipeError(f"{where(('models', index, key))}: models[{index}].{key}: only twin recipes name a "
                                  "task and its data per model")


def _scalars(value: ParamValue) -> list[Scalar]:
    if isinstance(value, list):
        out: list[Scalar] = []
        for item in value:
            out += _scalars(item.value) if isinstance(item, FilterEntry) else [item]
        return out
    return [value]


def resolve_value(value: ParamValue, tensor_name: str, layer: int | None, num_layers: int) -> Scalar | None:
    """The value of a parameter for one tensor: filters by name (a substring of it, or `*`, or no filter: the
    first that matches), gradients by layer position; None when no filter matches, as in mergekit."""
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], FilterEntry):
        for entry in value:
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return resolve_value(entry.value, tensor_name, layer, num_layers)
        return None  # no entry matches: the caller falls through (per model -> recipe-wide -> default)
    return gradient_value([float(v) for v in value], tensor_name, layer, num_layers)


def gradient_value(points: list[float], tensor_name: str, layer: int | None, num_layers: int) -> float:
    """Interpolate a gradient list over the layers: the first point at layer 0, the last at the last layer.

    Tensors outside the layers (embeddings, final norm, output head) take the first point, as in mergekit, which
    reads them at position 0.
    """
    if len(points) == 1 or layer is None:
        return points[0]
    position = layer / max(num_layers - 1, 1) * (len(points) - 1)
    low = min(int(math.floor(position)), len(points) - 2)
    frac = position - low
    return points[low] * (1 - frac) + points[low + 1] * frac


def recipe_params(recipe: Recipe, method: Parameterised, model_index: int | None, tensor_name: str, layer: int | None,
                  num_layers: int, as_model: bool = False) -> dict[str, Scalar]:
    """Every parameter of `method` for one tensor: per-model value, else recipe-wide, else the default; a filter
    list with no entry for this tensor falls through to the next of these. With no model index, the recipe-wide
    parameters, or (`as_model`) the per-model ones of an input without a model entry."""
    entry = recipe.models[model_index].parameters if model_index is not None else {}
    return resolve_params(method, [entry, recipe.parameters], tensor_name, layer, num_layers,
                          per_model=model_index is not None or as_model)


def resolve_params(method: Parameterised, levels: list[dict[str, ParamValue]], tensor_name: str, layer: int | None,
                   num_layers: int, per_model: bool) -> dict[str, Scalar]:
    """The method's per-model (or recipe-wide) parameters for one tensor, from the first of `levels` (most
    specific first: a model's, a slice's, the recipe's) whose value applies to it, else the defaults."""
    resolved = {}
    for spec in method.params:
        if per_model and spec.scope == "global":
            continue
        if not per_model and spec.scope == "model":
            continue
        value = None
        for level in levels:
            if spec.name in level:
                value = resolve_value(level[spec.name], tensor_name, layer, num_layers)
                if value is not None:
                    break
        if value is None:
            value = spec.default
        resolved[spec.name] = spec.kind(value) if spec.kind in (int, float) and value is not None else value
    return resolved
