"""The seam between the dispatcher and the three kinds of merge: a Pipeline checks a recipe, validates it against
its inputs, runs it and describes its report. Tensor-wise methods (`tensorwise.py`), PLeaS (`pleas/pipeline.py`)
and Twin-Merging (`twin/pipeline.py`) each implement it; the dispatcher (`dispatch.py`) and the CLI only speak to
this protocol. This module holds data and protocols, no computation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mergekit_lite.params import ParamSpec
from mergekit_lite.recipe import Recipe


class Progress(Protocol):
    """Where long work reports itself: bars that count tensors and bytes (nbytes > 0) or steps (nbytes 0)."""

    def start(self, tensors: int, nbytes: int, label: str) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def stop(self) -> None: ...
    def note(self, message: str) -> None: ...  # a line before a long phase: the work it has ahead


class SilentProgress:
    """A Progress that shows nothing (the library default, and `--quiet`)."""

    def start(self, tensors: int, nbytes: int, label: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def stop(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class MergeOptions:
    """How to run a merge, beside what the recipe says (the command line's flags)."""

    device: str = "auto"
    force: bool = False
    seed: int | None = None
    shard_size: str | int | None = None
    allow_pickle: bool = False
    report_path: Path | None = None
    resume: bool = False
    shard_parameters: int | None = None  # mergekit's --out-shard-size: parameters per shard (shard_size wins)
    copy_tokenizer: bool = True
    write_model_card: bool = True
    allow_crimes: bool = False  # mergekit's name: merge models whose configs name different architectures
    ray: str | None = None  # merge on Ray: "local" starts a cluster, "auto" joins RAY_ADDRESS's, else an address


@dataclass
class Validation:
    """What `merge validate` found: one line per check that passed, and warnings."""

    lines: list[str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MethodFacts:
    """What `merge methods` lists of a method and what checking a recipe's models needs; each pipeline is one."""

    name: str
    summary: str
    params: tuple[ParamSpec, ...]
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    optional_base: bool = False  # uses base_model when given, without needing one
    base_as_input: bool = False  # base_model, when given, is merged as one more input
    streams_tensors: bool = True  # reads tensors one by one: takes LoRA references (`base+adapter`) and `slices`
    runs_on_ray: bool = True  # takes `merge run --ray`


@dataclass
class DirectorySummary:
    """What `merge inspect` shows of a directory a pipeline wrote that is not one checkpoint: a line, facts for
    --json (under `key`), and the checkpoint inside to show after them."""

    key: str
    facts: dict[str, Any]
    line: str
    checkpoint: Path


class Pipeline(Protocol):
    """One kind of merge. `name`, `summary` and `params` are what `merge methods` lists; `needs_base`,
    `min_models` and `max_models` what checking a recipe's models needs."""

    name: str
    summary: str
    params: tuple[ParamSpec, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    streams_tensors: bool
    runs_on_ray: bool

    def check(self, recipe: Recipe, source: str, lines: dict[tuple, int]) -> None:
        """Refuse (RecipeError, with the line) what this method cannot take, from the recipe alone."""

    def validate(self, recipe: Recipe, allow_pickle: bool = False) -> Validation:
        """Check the recipe against its inputs (headers, models) without merging."""

    def run(self, recipe: Recipe, recipe_text: str, out: Path, options: MergeOptions,
            progress: Progress) -> dict[str, Any]:
        """Merge into `out` (published atomically) and return the report, also written there or to --report."""

    def describe(self, report: dict[str, Any]) -> list[str]:
        """Lines on what this method's part of a report says (printed by `merge run` and `merge report`)."""

    def summarise_directory(self, path: Path) -> DirectorySummary | None:
        """A directory of this pipeline's own layout, summarised; None for any other path."""
