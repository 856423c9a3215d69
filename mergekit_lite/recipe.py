"""YAML recipe -> validated Recipe, in mergekit's format; resolves a parameter's value for one tensor.

A parameter value is a scalar, a list of `{filter: substring, value: v}` (first match on the tensor name
wins, an entry without filter is the fallback), or a gradient: a list of numbers interpolated over the
layer index.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_lite.checkpoint.files import same_path
from mergekit_lite.errors import RecipeError
from mergekit_lite.methods import MergeMethod, get_method

Scalar = Union[bool, int, float, str]


class FilterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, list[float]]


ParamValue = Union[Scalar, list[FilterEntry], list[float]]


class DataSource(BaseModel):
    """Inputs for model-aware methods: a tensor file, an image folder, a text file (tokenised with the
    checkpoint's tokenizer), or generic inputs made by the tool."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    kind: str | None = None  # tensors | images | text | generic (inferred from path when absent)
    key: str | None = None  # tensor name inside a .safetensors / .pt file
    shape: list[int] | None = None  # one input's shape for generic inputs (default: from the model's config)
    length: int | None = None  # tokens per text window (default: 128, capped by the model's context)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    task: str | None = None  # twin: the task this expert was fine-tuned for
    data: DataSource | None = None  # twin: inputs of that task (router training)

    @field_validator("model")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        if "+" in value and not Path(value).exists():
            raise ValueError("LoRA references (model+lora) are not supported; merge the adapter into the model first")
        return value


class SharedMerge(BaseModel):
    """twin: the tensor-wise merge that makes the shared expert (per-model parameters stay under models)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str = "task_arithmetic"
    parameters: dict[str, ParamValue] = Field(default_factory=lambda: {"lambda": 0.3})


class Recipe(BaseModel):
    """A merge recipe. mergekit keys run unchanged; `output`, `seed`, `shard_size`, `device` are ours."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    name: str | None = None
    output: str | None = None
    seed: int | None = None
    shard_size: str | int | None = None
    device: str | None = None
    allow_pickle: bool | None = None  # refused when true: pickles are allowed by the command-line flag alone
    chat_template: str | None = None
    data: DataSource | None = None
    shared_merge: SharedMerge | None = None

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError("must be between 0 and 2**63 - 1")
        return value

    @field_validator("allow_pickle")
    @classmethod
    def _pickles_by_flag_only(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("pickled files are allowed only by the command-line flag --allow-pickle, never by a "
                             "recipe (a recipe may come from someone else)")
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r}; use one of {', '.join(DTYPES)}")
        return value


DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _line_map(node: yaml.Node, path: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    """Line number (1-based) of every key and item in a composed YAML document, by its path."""
    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            lines[child] = key.start_mark.line + 1
            _line_map(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, path + (index,), lines)
    return lines


def _where(source: str, lines: dict[tuple, int], loc: tuple) -> str:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return f"{source}:{lines[loc[:cut]]}"
    return source


def _dotted(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union-branch labels (e.g. 'float', 'list[FilterEntry]') from an error location."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("bool", "int", "float", "str")))


# A recipe is a few kilobytes; even one listing hundreds of models with gradients is far below these.
MAX_RECIPE_BYTES = 1024 * 1024
MAX_RECIPE_NODES = 100_000  # after expanding YAML aliases: a ten-line alias bomb expands to billions
MAX_RECIPE_DEPTH = 64


def read_recipe_text(path: str | Path) -> str:
    """The recipe's text, read once (it may come from a pipe, which reads empty the second time)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror or exc}") from exc
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: more than {MAX_RECIPE_BYTES:,} bytes; not a recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: cannot read recipe: not UTF-8 text (byte {exc.start})") from None


def load_recipe(path: str | Path) -> tuple[Recipe, dict[tuple, int], str]:
    """Parse and validate a recipe file; errors name the file, line and key. Returns the text too."""
    text = read_recipe_text(path)
    recipe, lines = parse_recipe(text, str(path))
    return recipe, lines, text


def _check_expansion(node: yaml.Node, source: str) -> None:
    """Refuse documents whose aliases expand past MAX_RECIPE_NODES nodes or nest past MAX_RECIPE_DEPTH, before
    anything walks the expanded tree (node counts are memoised per node, so the check itself stays linear)."""
    sizes: dict[int, tuple[int, int]] = {}

    def measure(item: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{source}:{item.start_mark.line + 1}: nested more than {MAX_RECIPE_DEPTH} levels deep")
        known = sizes.get(id(item))
        if known is not None:
            return known
        count, deepest = 1, 0
        children = (item.value if isinstance(item, yaml.SequenceNode) else
                    [part for pair in item.value for part in pair] if isinstance(item, yaml.MappingNode) else [])
        for child in children:
            child_count, child_depth = measure(child, depth + 1)
            count, deepest = count + child_count, max(deepest, child_depth + 1)
            if count > MAX_RECIPE_NODES:
                raise RecipeError(f"{source}: expands to more than {MAX_RECIPE_NODES:,} values (YAML aliases?); "
                                  "not a recipe")
        if depth + deepest > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{source}:{item.start_mark.line + 1}: nested more than {MAX_RECIPE_DEPTH} levels deep")
        sizes[id(item)] = (count, deepest)
        return count, deepest

    measure(node, 0)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, except that exponent numbers without a dot (1e-9, 5E3) are floats, as in YAML 1.2
    and JSON, instead of strings."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_recipe(text: str, source: str = "<recipe>") -> tuple[Recipe, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=_RecipeLoader)
        if node is not None:
            _check_expansion(node, source)
        data = yaml.load(text, Loader=_RecipeLoader)
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with at least merge_method and models")
    lines = _line_map(node) if node is not None else {}
    if "slices" in data:
        raise RecipeError(f"{_where(source, lines, ('slices',))}: 'slices' (layer stacking) is not supported; use 'models'")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _clean_loc(tuple(first["loc"]))
        key = _dotted(loc) or "recipe"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        raise RecipeError(f"{_where(source, lines, loc)}: {key}: {message}") from exc
    check_parameters(recipe, source, lines)
    return recipe, lines


def check_parameters(recipe: Recipe, source: str, lines: dict[tuple, int]) -> MergeMethod:
    """Method-specific checks: known parameter names, types and ranges, model counts, base model."""
    where = lambda loc: _where(source, lines, loc)  # noqa: E731
    try:
        method = get_method(recipe.merge_method)
    except RecipeError as exc:
        raise RecipeError(f"{where(('merge_method',))}: {exc}") from None
    known = {p.name: p for p in method.params}
    given = [(("parameters", name), name, value) for name, value in recipe.parameters.items()]
    if method.check_recipe is None:
        _refuse_composite_keys(recipe, where)
        for index, entry in enumerate(recipe.models):
            given += [(("models", index, "parameters", name), name, value) for name, value in entry.parameters.items()]
    for loc, name, value in given:
        spec = known.get(name)
        if spec is None:
            names = ", ".join(known) or "none"
            raise RecipeError(f"{where(loc)}: {_dotted(loc)}: unknown parameter for {method.name} (known: {names})")
        if spec.scope == "global" and loc[0] == "models":
            raise RecipeError(f"{where(loc)}: {_dotted(loc)}: {name} is recipe-wide; put it under top-level parameters")
        for scalar in _scalars(value):
            problem = spec.check(scalar)
            if problem:
                raise RecipeError(f"{where(loc)}: {_dotted(loc)}: {problem}")
    experts = [m for m in recipe.models if not method.needs_base or recipe.base_model is None
               or not same_path(m.model, recipe.base_model)]
    if method.needs_base and recipe.base_model is None:
        raise RecipeError(f"{source}: {method.name} needs base_model")
    if len(experts) < method.min_models:
        raise RecipeError(f"{where(('models',))}: {method.name} needs at least {method.min_models} model(s) besides the base")
    if method.max_models is not None and len(experts) > method.max_models:
        raise RecipeError(f"{where(('models',))}: {method.name} takes at most {method.max_models} model(s) besides the base")
    if method.check_recipe is not None:
        method.check_recipe(recipe, source, lines)
    return method


def _refuse_composite_keys(recipe: Recipe, where) -> None:
    """task, per-model data and shared_merge belong to twin recipes; elsewhere they would be silently ignored."""
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


def resolve_value(value: ParamValue, tensor_name: str, layer: int | None, num_layers: int) -> Scalar:
    """The value of a parameter for one tensor: filters by name, gradients by layer position."""
    if not isinstance(value, list):
        return value
    if value and isinstance(value[0], FilterEntry):
        for entry in value:
            if entry.filter is None or entry.filter in tensor_name:
                return resolve_value(entry.value, tensor_name, layer, num_layers)
        raise RecipeError(f"no filter entry matches tensor {tensor_name!r} and there is no fallback entry without filter")
    return gradient_value([float(v) for v in value], tensor_name, layer, num_layers)


def gradient_value(points: list[float], tensor_name: str, layer: int | None, num_layers: int) -> float:
    """Interpolate a gradient list over the layers: the first point at layer 0, the last at the last layer.

    Tensors outside the layers take an end point: embeddings the first, everything else (final norm,
    output head) the last.
    """
    if len(points) == 1:
        return points[0]
    if layer is None:
        return points[0] if is_input_embedding(tensor_name) else points[-1]
    position = layer / max(num_layers - 1, 1) * (len(points) - 1)
    low = min(int(math.floor(position)), len(points) - 2)
    frac = position - low
    return points[low] * (1 - frac) + points[low + 1] * frac


def is_input_embedding(tensor_name: str) -> bool:
    lowered = tensor_name.lower()
    return any(key in lowered for key in ("embed", "wte", "wpe"))


def is_embedding(tensor_name: str) -> bool:
    """Input embeddings and output heads: the tensors whose rows follow the vocabulary."""
    return is_input_embedding(tensor_name) or "lm_head" in tensor_name.lower()


def recipe_params(recipe: Recipe, method: MergeMethod, model_index: int | None, tensor_name: str, layer: int | None,
                  num_layers: int) -> dict[str, Scalar]:
    """Every parameter of `method` for one tensor: per-model value, else recipe-wide, else the default."""
    entry = recipe.models[model_index].parameters if model_index is not None else {}
    resolved = {}
    for spec in method.params:
        if model_index is not None and spec.scope == "global":
            continue
        if model_index is None and spec.scope == "model":
            continue
        raw = entry.get(spec.name, recipe.parameters.get(spec.name, spec.default))
        value = resolve_value(raw, tensor_name, layer, num_layers)
        resolved[spec.name] = spec.kind(value) if spec.kind in (int, float) and value is not None else value
    return resolved
