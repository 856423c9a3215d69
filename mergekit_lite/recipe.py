"""YAML recipe -> Recipe, in mergekit's format, with the line of every key: parsing and locating only. What a
method's parameters mean and how they resolve per tensor is `params.py`; which method checks a recipe is the
dispatcher's (`dispatch.py`)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mergekit_lite.checkpoint.lora import split_lora_reference
from mergekit_lite.errors import RecipeError

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


class TokenSource(BaseModel):
    """Where a token's row comes from, besides a model reference: a zero row, or another token's row of a model."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero", "model_token"]
    model: str | None = None
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> "TokenSource":
        if self.kind == "model_token":
            if self.model is None:
                raise ValueError("model_token needs model")
            if (self.token_id is None) == (self.token is None):
                raise ValueError("model_token needs exactly one of token_id and token")
            if self.token_id is not None and self.token_id < 0:
                raise ValueError("token_id must be at least 0")
        return self


class TokenEntry(BaseModel):
    """A `tokenizer.tokens` entry: the row a token gets where a model lacks it (and, with force, everywhere)."""

    model_config = ConfigDict(extra="forbid")
    source: Union[str, TokenSource, None] = None
    force: bool = False


class TokenizerBlock(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary and how rows for its tokens are found."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"  # union | base | a model reference
    tokens: dict[str, TokenEntry] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=1 << 20)


class SliceSource(BaseModel):
    """One model's layers [first, last) in a slice."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _forward_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError("must be [first, last) with 0 <= first < last")
        return value


class SliceEntry(BaseModel):
    """A run of output layers: one source's layers copied (stacking), or several sources' merged layer by layer."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    base_model: str | None = None
    residual_weight: float | None = None  # in mergekit's format, and unused there too

    @model_validator(mode="after")
    def _equal_lengths(self) -> "SliceEntry":
        lengths = {source.layer_range[1] - source.layer_range[0] for source in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"every source of a slice must span as many layers (here {sorted(lengths)})")
        return self


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
    slices: list[SliceEntry] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    name: str | None = None
    output: str | None = None
    seed: int | None = None
    shard_size: str | int | None = None
    device: str | None = None
    allow_pickle: bool | None = None  # refused when true: pickles are allowed by the command-line flag alone
    chat_template: str | None = None
    data: DataSource | None = None
    shared_merge: SharedMerge | None = None
    # what checking found harmless but worth saying (keys mergekit accepts that this merge does not use)
    _warnings: list[str] = PrivateAttr(default_factory=list)
    # hub ids resolved to local snapshots: {reference, repo_id, revision, commit, path} each
    _hub_sources: list[dict[str, str]] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return self._warnings

    @property
    def hub_sources(self) -> list[dict[str, str]]:
        return self._hub_sources

    def reference_of(self, path: str | Path | None) -> str | None:
        """The reference the recipe was written with (a hub id) for a path it was resolved to, else the path."""
        if path is None:
            return None
        lora = split_lora_reference(str(path))
        if lora is not None:
            return "+".join(str(self.reference_of(side)) for side in lora)
        for source in self._hub_sources:
            if Path(source["path"]) == Path(path):
                return source["reference"]
        return str(path)

    def as_written(self) -> dict:
        """The recipe as JSON data, hub ids as the user wrote them rather than the snapshots they resolved to."""
        data = self.model_dump(mode="json", exclude_none=True)
        for entry in data.get("models", []):
            entry["model"] = self.reference_of(entry["model"])
        for piece in data.get("slices", []):
            for entry in piece["sources"]:
                entry["model"] = self.reference_of(entry["model"])
        for key in ("base_model", "tokenizer_source"):
            if data.get(key) not in (None, "base", "union"):
                data[key] = self.reference_of(data[key])
        return data

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

    @model_validator(mode="after")
    def _one_tokenizer_setting(self) -> "Recipe":
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give tokenizer_source or a tokenizer block (its source), not both")
        if self.slices is not None and self.models:
            raise ValueError("give models or slices, not both")
        if self.slices is not None and not self.slices:
            raise ValueError("slices: give at least one slice")
        return self

    def references(self) -> list[str]:
        """Every model the recipe names, in order, each once (base_model first)."""
        names = ([self.base_model] if self.base_model else []) + [entry.model for entry in self.models]
        names += [source.model for piece in self.slices or [] for source in piece.sources]
        names += [piece.base_model for piece in self.slices or [] if piece.base_model]
        return list(dict.fromkeys(names))

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from (union, base or a model), when the merge writes its own
        tokenizer and aligns embedding rows by token; None: the tokenizer is copied as it is."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

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


def location(source: str, lines: dict[tuple, int], loc: tuple) -> str:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return f"{source}:{lines[loc[:cut]]}"
    return source


def dotted_key(loc: tuple) -> str:
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


def parse_recipe_text(text: str, source: str = "<recipe>") -> tuple[Recipe, dict[tuple, int]]:
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
    ignored = [key for key in IGNORED_KEYS if key in data]
    data = {key: value for key, value in data.items() if key not in IGNORED_KEYS}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _clean_loc(tuple(first["loc"]))
        key = dotted_key(loc) or "recipe"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(loc[-1]), _keys_at(loc))
        elif first["type"] == "missing":
            message = "required key is missing"
        raise RecipeError(f"{location(source, lines, loc)}: {key}: {message}") from exc
    recipe.warnings.extend(f"{location(source, lines, (key,))}: {key}: ignored (mergekit ignores it too)"
                           for key in ignored)
    return recipe, lines


# Top-level keys of published mergekit recipes that mergekit itself ignores: a warning, not an error.
IGNORED_KEYS = ("model_name",)


def did_you_mean(word: str, choices: list[str]) -> str:
    """' (did you mean x?)' for a near spelling among `choices`, else ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


def _keys_at(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` was found."""
    models = {"models": ModelEntry, "data": DataSource, "shared_merge": SharedMerge, "slices": SliceEntry,
              "tokenizer": TokenizerBlock}
    model = models.get(str(loc[0]), Recipe) if len(loc) > 1 else Recipe
    if len(loc) > 3 and loc[0] == "slices" and loc[2] == "sources":
        model = SliceSource
    if len(loc) > 3 and loc[0] == "models" and loc[2] == "data":
        model = DataSource
    return list(model.model_fields)
