"""mergekit's `slices:` planned into the engine's tensor plans: output layers are the slices' layers in order,
renumbered; a slice with one source copies its layers (stacking, "frankenmerges"), one with several merges them
layer by layer with the recipe's method. Tensors outside the layers come from the first slice's sources
(embeddings) or the last slice's (final norm, output head), as in mergekit. Layers are found from tensor names
(the first number in a name), so any naming scheme with numbered layers works (Llama, Mistral, Qwen2, GPT-2).

Parameters resolve per source (its `parameters`), then per slice, then recipe-wide; a gradient runs over each
slice's own layers (its first layer takes the first point, its last the last), and tensors outside the layers
take the first point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mergekit_lite.checkpoint import Checkpoint, open_reference
from mergekit_lite.checkpoint.files import same_path
from mergekit_lite.engine import (MergePlan, Sources, TensorInputs, TensorPlan, check_same_architecture,
                                  output_dtype)
from mergekit_lite.errors import RecipeError, UserError
from mergekit_lite.layers import CONFIG_LAYER_KEYS, count_layers, is_input_embedding, must_stay_positive, split_layer
from mergekit_lite.methods import MergeMethod, get_method
from mergekit_lite.params import resolve_params
from mergekit_lite.recipe import Recipe, SliceEntry


@dataclass(frozen=True)
class OutputLayer:
    """One output layer: which slice it comes from, its position there, and each source's layer for it."""

    index: int
    piece: int
    position: int
    length: int
    source_layers: tuple[int, ...]


def layer_map(slices: list[SliceEntry]) -> list[OutputLayer]:
    """The output layers, in order: each slice's layers renumbered after the previous slice's."""
    out: list[OutputLayer] = []
    for number, piece in enumerate(slices):
        length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
        for position in range(length):
            layers = tuple(source.layer_range[0] + position for source in piece.sources)
            out.append(OutputLayer(len(out), number, position, length, layers))
    return out


def gradient_position(layer: OutputLayer) -> tuple[int, int]:
    """(layer, layer count) for a gradient over the slice: mergekit puts a one-layer slice at its last point."""
    return (layer.position, layer.length) if layer.length > 1 else (1, 2)


def describe_layers(slices: list[SliceEntry], recipe: Recipe) -> list[dict[str, Any]]:
    """The layer plan as the report and `merge validate` show it: output layers and where they come from."""
    rows, start = [], 0
    for piece in slices:
        length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
        rows.append({"output_layers": [start, start + length],
                     "sources": [{"model": recipe.reference_of(s.model), "layers": list(s.layer_range)}
                                 for s in piece.sources]})
        start += length
    return rows


def layer_plan_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        first, stop = row["output_layers"]
        sources = " + ".join(f"{s['model']} layers {s['layers'][0]}-{s['layers'][1] - 1}" for s in row["sources"])
        lines.append(f"output layers {first}-{stop - 1} <- {sources}")
    return lines


def _base_of(piece: SliceEntry, recipe: Recipe, method: MergeMethod) -> str | None:
    base = piece.base_model or recipe.base_model
    return base if (method.needs_base or method.optional_base) and base is not None else None


class _Planner:
    """Builds the tensor plans of a sliced recipe from the opened models' headers."""

    def __init__(self, recipe: Recipe, method: MergeMethod, opened: dict[str, Checkpoint]) -> None:
        self.recipe, self.method, self.opened = recipe, method, opened
        self.slices = recipe.slices
        self.layers = layer_map(self.slices)
        self.tensors: list[TensorPlan] = []

    def _check_ranges(self) -> None:
        for number, piece in enumerate(self.slices):
            for part in piece.sources:
                ckpt = self.opened[part.model]
                count = count_layers(ckpt.config, ckpt.tensors)
                if part.layer_range[1] > count:
                    raise RecipeError(f"slices[{number}]: {part.model} has {count} layers; layer_range "
                                      f"{list(part.layer_range)} reaches past them")

    def _add(self, name: str, piece: SliceEntry, sources: list[tuple[str, str]], position: tuple[int, int] | None
             ) -> None:
        """One output tensor `name` from (model reference, tensor name) of each of the slice's sources."""
        infos = []
        for reference, source_name in sources:
            info = self.opened[reference].tensors.get(source_name)
            if info is None:
                raise UserError(f"{reference}: has no tensor {source_name!r}, which the slice needs for {name!r}")
            infos.append(info)
        first = infos[0]
        for (reference, source_name), info in zip(sources[1:], infos[1:]):
            if info.shape != first.shape or info.dtype.is_floating_point != first.dtype.is_floating_point:
                raise UserError(f"{reference}: tensor {source_name!r} is {list(info.shape)} but {sources[0][0]} has "
                                f"{list(first.shape)} for {name!r}; the slices' models differ in architecture or size")
        base_reference = _base_of(piece, self.recipe, self.method)
        base, experts, params_of = None, [], []
        for part, (reference, source_name) in zip(piece.sources, sources):
            if base is None and base_reference is not None and same_path(reference, base_reference):
                base = (self.opened[reference], source_name)
                continue
            experts.append((self.opened[reference], source_name))
            params_of.append((part.parameters, source_name))
        layer, count = position if position is not None else (None, 0)
        plan = TensorPlan(name=name, shape=first.shape, dtype=output_dtype(self.recipe, first.dtype),
                          merge=first.dtype.is_floating_point and first.numel > 0, positive=must_stay_positive(name),
                          inputs=TensorInputs(base, experts))
        if plan.merge:
            plan.model_params = [resolve_params(self.method, [own, piece.parameters, self.recipe.parameters],
                                                source_name, layer, count, per_model=True)
                                 for own, source_name in params_of]
            plan.params = resolve_params(self.method, [piece.parameters, self.recipe.parameters], name, layer, count,
                                         per_model=False)
        self.tensors.append(plan)

    def plan(self, reference: Checkpoint) -> list[TensorPlan]:
        self._check_ranges()
        outside = [name for name in reference.tensors if split_layer(name) is None]
        first_piece, last_piece = self.slices[0], self.slices[-1]
        for name in outside:
            if is_input_embedding(name):
                self._add(name, first_piece, [(s.model, name) for s in first_piece.sources], None)
        for layer in self.layers:
            piece = self.slices[layer.piece]
            lead = self.opened[piece.sources[0].model]
            for name in lead.tensors:
                parts = split_layer(name)
                if parts is None or parts[1] != layer.source_layers[0]:
                    continue
                before, _, after = parts
                sources = [(s.model, f"{before}{number}{after}") for s, number in zip(piece.sources, layer.source_layers)]
                self._add(f"{before}{layer.index}{after}", piece, sources, gradient_position(layer))
        for name in outside:
            if not is_input_embedding(name):
                self._add(name, last_piece, [(s.model, name) for s in last_piece.sources], None)
        return self.tensors


def config_updates(reference: Checkpoint, slices: list[SliceEntry], opened: dict[str, Checkpoint]) -> dict[str, Any]:
    """The output config's layer count, and every per-layer list in it rebuilt for the output's layers."""
    config = reference.config or {}
    layers = layer_map(slices)
    updates: dict[str, Any] = {key: len(layers) for key in CONFIG_LAYER_KEYS if isinstance(config.get(key), int)}
    source_count = count_layers(config, reference.tensors)
    for key, value in config.items():
        if not isinstance(value, list) or len(value) != source_count or key in updates:
            continue
        rebuilt = []
        for layer in layers:
            lead = opened[slices[layer.piece].sources[0].model].config or {}
            values = lead.get(key) if isinstance(lead.get(key), list) else value
            rebuilt.append(values[layer.source_layers[0]] if layer.source_layers[0] < len(values) else value[-1])
        updates[key] = rebuilt
    return updates


def plan_slices(recipe: Recipe, allow_pickle: bool = False, allow_crimes: bool = False) -> MergePlan:
    """Open every model the slices name and plan the output tensor by tensor, from headers alone."""
    method = get_method(recipe.merge_method)
    if method.needs_model_pass(recipe.parameters):
        raise RecipeError(f"slices: {method.name} with a whole-model first pass (trim_scope: model) needs the same "
                          "models for every tensor; use models: or trim_scope: tensor")
    references = [r for r in recipe.references() if r != recipe.base_model or any(
        same_path(s.model, r) for piece in recipe.slices for s in piece.sources)]
    opened: dict[str, Checkpoint] = {}
    try:
        for reference in references:
            opened[reference] = open_reference(reference, allow_pickle=allow_pickle)
        for piece in recipe.slices:  # the same model spelled two ways is opened once under each spelling
            for part in piece.sources:
                opened.setdefault(part.model, open_reference(part.model, allow_pickle=allow_pickle))
        first = opened[recipe.slices[0].sources[0].model]
        reference = next((c for r, c in opened.items() if recipe.base_model and same_path(r, recipe.base_model)), first)
        warnings: list[str] = list(recipe.warnings)
        for ckpt in opened.values():
            if ckpt is not reference:
                check_same_architecture(reference, ckpt, allow_crimes, warnings)
        tensors = _Planner(recipe, method, opened).plan(reference)
        distinct = {id(ckpt): ckpt for ckpt in opened.values()}  # checkpoints compare by value: keep by identity
        checkpoints = [reference] + [c for c in distinct.values() if c is not reference]
        sources = Sources(base=None, experts=checkpoints, entry_of_expert=[None] * len(checkpoints))
        plan = MergePlan(recipe, method, sources, tensors, len(layer_map(recipe.slices)), warnings,
                         resolve_params(method, [recipe.parameters], "", None, 0, per_model=False))
        plan.config_updates = config_updates(reference, recipe.slices, opened)
        plan.layer_plan = describe_layers(recipe.slices, recipe)
        return plan
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise
