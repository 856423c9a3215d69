"""What a tensor-wise merge method is: its parameters and a pure function of float32 tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch


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


@dataclass
class MergeInputs:
    """Everything a method sees for one tensor, already float32 on the compute device."""

    name: str
    base: torch.Tensor | None
    experts: list[torch.Tensor]
    model_params: list[dict[str, Any]]  # per expert, resolved for this tensor
    params: dict[str, Any]  # recipe-wide, resolved for this tensor
    seed: int = 0
    prepared: Any = None  # whatever the method's whole-model pass computed

    def per_model(self, key: str) -> list[Any]:
        return [p[key] for p in self.model_params]


@dataclass
class MergeOutput:
    tensor: torch.Tensor
    kept_fraction: list[float] | None = None  # per expert, after sparsification
    sign_agreement: float | None = None  # fraction of entries where no kept expert disagrees with the elected sign


# A whole-model pass: called with a function that yields, tensor by tensor, (name, base, experts, model_params).
ModelPass = Callable[[Callable[[], Iterator[tuple[str, torch.Tensor, list[torch.Tensor], list[dict]]]], dict], Any]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    summary: str
    merge: Callable[[MergeInputs], MergeOutput]
    params: tuple[ParamSpec, ...] = ()
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # uses the seed
    prepare: ModelPass | None = None  # optional first pass over the whole model
    needs_prepare: Callable[[dict], bool] = field(default=lambda params: False)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> Iterable[str]:
        return (p.name for p in self.params)


WEIGHT = ParamSpec("weight", float, 1.0, "scale of this model's contribution (negative subtracts it)")
DENSITY = ParamSpec(
    "density", float, 1.0, "fraction of this model's task vector to keep", minimum=0.0, maximum=1.0, exclusive_minimum=True
)
LAMBDA = ParamSpec("lambda", float, 1.0, "global scale applied to the merged task vector", scope="global")
INT8_MASK = ParamSpec("int8_mask", bool, False, "accepted for mergekit recipes; masks are always exact here", scope="global")


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, "divide by the sum of the (agreeing) weights", scope="global")


def rescale_param(default: bool) -> ParamSpec:
    return ParamSpec("rescale", bool, default, "divide kept entries by their keep probability", scope="global")
