"""Running a Twin-Merging directory: the shared model with routed layers, each input row routed on its own.

    from mergekit_lite.twin import TwinModel
    twin = TwinModel.load("out/twin")
    logits = twin(batch)                              # each row routed on its own
    logits = twin(batch, weights={"code": 1.0})       # a fixed task mix
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergekit_lite.errors import UserError
from mergekit_lite.models.loading import load_model
from mergekit_lite.twin.install import install_routes
from mergekit_lite.twin.lanes import Lanes, lay_out, pack, split_tasks, unpack
from mergekit_lite.twin.policy import DEFAULT_POLICY, RuntimePolicy
from mergekit_lite.twin.route import is_one_hot, lanes_route, routed_layers, set_route, task_order
from mergekit_lite.twin.routed import RoutedLinear, keep_task_weights
from mergekit_lite.twin.routed_conv import RoutedConv2d
from mergekit_lite.twin.routed_norms import RoutedBatchNorm2d
from mergekit_lite.twin.router import Router, SiteRouters, pooled_features_at, route_weights
from mergekit_lite.twin.store import ROUTER, SHARED, load_deltas, read_manifest, task_weights


def _batch_major(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _rows_in_order(out, index: torch.Tensor, batch: int):
    """A model's output with its batch rows taken in `index` order: tensors, tuples, dicts and transformers
    outputs (a key/value cache is reordered in place)."""
    if _batch_major(out, batch):
        return out.index_select(0, index.to(out.device))
    if hasattr(out, "reorder_cache"):
        out.reorder_cache(index)
        return out
    if isinstance(out, dict):
        values = {key: _rows_in_order(value, index, batch) for key, value in out.items()}
        return values if type(out) is dict else type(out)(**values)
    if isinstance(out, (tuple, list)):
        return type(out)(_rows_in_order(value, index, batch) for value in out)
    return out




@dataclass
class LanePlan:
    """A top-1 batch on lanes: the tasks that run alone (task, its rows), and the other rows with their lanes."""

    alone: list[tuple[int, torch.Tensor]]
    rest: torch.Tensor | None  # rows on lanes; None: every row (no task alone), or no lanes
    lanes: Lanes | None


def same_outputs(got: torch.Tensor, reference: torch.Tensor) -> bool:
    """Equal up to the rounding of a different kernel (grouped vs plain convolutions) in the tensors' dtype."""
    if got.shape != reference.shape or got.dtype != reference.dtype:
        return False
    tolerance = 1e-3 if reference.dtype == torch.float32 else 3e-2
    scale = float(reference.nan_to_num().abs().max()) if reference.numel() else 0.0
    return torch.allclose(got, reference, rtol=tolerance, atol=tolerance * max(scale, 1.0), equal_nan=True)




def _router_of(settings: dict, tasks: int, path: Path, directory: Path) -> Router | SiteRouters:
    """The router(s) a manifest describes: one site (`feature` a name) or several (`feature` a list)."""
    sites, sizes = settings.get("feature"), settings.get("features")
    if isinstance(sites, str) and type(sizes) is int:
        router = Router(sizes, tasks, settings.get("dropout", 0.1))
    elif (isinstance(sites, list) and isinstance(sizes, list) and len(sites) == len(sizes) > 0
          and all(isinstance(x, str) for x in sites) and all(type(n) is int and n > 0 for n in sizes)):
        router = SiteRouters(sites, [Router(n, tasks, settings.get("dropout", 0.1)) for n in sizes])
    else:
        raise UserError(f"{directory}: the manifest's router settings are malformed; the directory is damaged")
    try:
        router.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(f"{path}: does not hold the router the manifest describes ({str(exc).splitlines()[0]})") from None
    return router


class TwinModel(torch.nn.Module):
    """The shared model with routed layers and the router; call it like the model itself.

    Top-1 batches of a convolutional net on the CPU run packed into task lanes (lanes.py): the whole model once,
    with grouped convolutions, instead of every layer splitting the batch by task (a task holding most of the
    batch runs alone first, on its own filters). The first such batch runs both ways and lanes are used from
    then on only if the outputs agree (`uses_lanes`: None until then)."""

    lane_devices = ("cpu",)  # where lanes were measured to pay; add "cuda" to try them there

    def __init__(self, model: torch.nn.Module, router: Router | SiteRouters, tasks: list[str], feature: str | list[str],
                 top_k: int, unrouted: list[str], sequence_max: bool = False,
                 policy: RuntimePolicy = DEFAULT_POLICY) -> None:
        super().__init__()
        if isinstance(router, Router):
            router = SiteRouters([feature], [router])
        self.model, self.router, self.tasks = model, router, list(tasks)
        self.top_k, self.unrouted = top_k, unrouted  # the feature sites live in self.router.sites
        self.sequence_max = sequence_max  # directories written before it pooled maxima have no such setting
        self.kept_task_weights = {"layers": 0, "bytes": 0}  # set by load (keep_task_weights)
        self.routed = routed_layers(model)  # found once: each batch sets their route
        self.policy = policy
        self._row_macs: dict[tuple, float] = {}  # input shape -> multiply-adds a row in the average routed conv
        lane_layers = (RoutedConv2d, RoutedBatchNorm2d, RoutedLinear)
        self.uses_lanes: bool | None = None if any(isinstance(m, RoutedConv2d) for m in self.routed) and \
            all(type(m) in lane_layers for m in self.routed) else False

    @property
    def policy(self) -> RuntimePolicy:
        return self._policy

    @policy.setter
    def policy(self, value: RuntimePolicy) -> None:
        """The CPU cost bounds, for this model and every routed conv in it."""
        self._policy = value
        for layer in self.routed:
            if isinstance(layer, RoutedConv2d):
                layer.policy = value

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             task_weight_budget: int | None = None, policy: RuntimePolicy = DEFAULT_POLICY) -> "TwinModel":
        """The shared model with routed layers and the router, on `device`. `task_weight_budget` (bytes) bounds the
        memory that the smallest linear layers may spend on keeping each task's own weight for top-1 rows
        (faster than the factors there; default: the policy's); 0 keeps none. Convolutions keep their per-task
        filters regardless. `policy`: the runtime's CPU cost bounds."""
        if task_weight_budget is None:
            task_weight_budget = policy.task_weight_budget
        if task_weight_budget < 0:
            raise UserError(f"task_weight_budget is a number of bytes, 0 or more (got {task_weight_budget})")
        directory = Path(directory)
        manifest = read_manifest(directory)
        model = load_model(directory / SHARED, transformers_ok=True).to(device)
        _, unrouted = install_routes(model, load_deltas(directory, manifest, device))
        kept_weights = keep_task_weights(model, task_weight_budget)
        settings = manifest["router"]
        router = _router_of(settings, len(manifest["tasks"]), directory / ROUTER, directory)
        model.requires_grad_(False)  # an inference runtime: per-task filters and norms can then be kept
        twin = cls(model, router.to(device).eval(), manifest["tasks"], settings["feature"], settings["top_k"],
                   unrouted, settings.get("sequence_max") is True, policy).eval()
        twin.kept_task_weights = {"layers": kept_weights[0], "bytes": kept_weights[1]}
        return twin

    @torch.no_grad()
    def route(self, inputs: Any, **kwargs: Any) -> torch.Tensor:
        """Per-row task weights (batch, T) from the shared model's feature (no routes applied)."""
        set_route(self.routed, None)
        features = pooled_features_at(self.model, self.router.sites, inputs, sequence_max=self.sequence_max, **kwargs)
        return route_weights(self.router(features), self.top_k)

    def forward(self, inputs: Any, weights: torch.Tensor | dict[str, float] | None = None, **kwargs: Any) -> Any:
        batch = inputs.shape[0]
        if weights is None:
            weights = self.route(inputs, **kwargs)
        elif isinstance(weights, dict):
            weights = task_weights(self.tasks, weights)
        weights = torch.as_tensor(weights, dtype=torch.float32).to(inputs.device)
        if weights.dim() == 1:
            weights = weights.unsqueeze(0).expand(batch, -1)
        plan = self._lane_plan(inputs, weights, kwargs)
        if plan is not None:
            if self.uses_lanes:
                return self._run_planned(inputs, weights, plan)
            reference = self._run(inputs, weights, kwargs)
            try:
                self.uses_lanes = same_outputs(self._run_planned(inputs, weights, plan), reference)
            except Exception:  # a layer that cannot take lanes (shapes, channel counts): the per-layer path stays
                self.uses_lanes = False
            return reference
        return self._run(inputs, weights, kwargs)

    def _lane_plan(self, inputs, weights: torch.Tensor, kwargs: dict) -> LanePlan | None:
        """How this batch runs on lanes, or None when lanes do not apply: not a conv net of lane-ready layers (or
        it failed the check), extra inputs, not an image-like float tensor, a training model, soft or
        single-task rows, a mix too uneven to pad even with its largest tasks run on their own
        (lanes.split_tasks), or tasks with many rows each in large convolutions (`policy.lane_group_macs`)."""
        if self.uses_lanes is False or kwargs or not isinstance(inputs, torch.Tensor) or inputs.dim() < 3 \
                or not inputs.is_floating_point() or inputs.device.type not in self.lane_devices \
                or self.model.training or not is_one_hot(weights):
            return None
        task_of_row = weights.argmax(-1)
        counts = torch.bincount(task_of_row, minlength=weights.shape[1]).tolist()
        if sum(1 for n in counts if n) < 2:
            return None
        split = split_tasks(counts)
        if split is None:
            return None
        alone, size = split
        rest = [n if task not in alone else 0 for task, n in enumerate(counts)]
        if size is not None and sum(rest) / sum(1 for n in rest if n) * self._conv_macs_per_row(inputs) > self.policy.lane_group_macs:
            return None
        if not alone:
            return LanePlan([], None, lay_out(task_of_row, len(counts), size))
        runs_alone = [(task, (task_of_row == task).nonzero().flatten()) for task in alone]
        if size is None:
            return LanePlan(runs_alone, None, None)
        rest_rows = torch.isin(task_of_row, torch.tensor(alone, device=task_of_row.device), invert=True).nonzero().flatten()
        return LanePlan(runs_alone, rest_rows, lay_out(task_of_row.index_select(0, rest_rows), len(counts), size))

    def _run_planned(self, inputs: torch.Tensor, weights: torch.Tensor, plan: LanePlan) -> torch.Tensor:
        """The tasks that run alone, each on its own filters for the whole model, then the rest on lanes; the
        outputs put back in row order."""
        if not plan.alone:
            return self._run_on_lanes(inputs, weights, plan.lanes)
        parts = [(rows, None) for _, rows in plan.alone] + ([(plan.rest, plan.lanes)] if plan.lanes else [])
        out = None
        for rows, lanes in parts:
            x, w = inputs.index_select(0, rows), weights.index_select(0, rows)
            y = self._run(x, w, {}) if lanes is None else self._run_on_lanes(x, w, lanes)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"task lanes need a model that returns a tensor, not {type(y).__name__}")
            if out is None:
                out = y.new_empty((len(inputs), *y.shape[1:]))
            out.index_copy_(0, rows, y)
        return out

    def _conv_macs_per_row(self, inputs: torch.Tensor) -> float:
        """Multiply-adds of one input row in the average routed convolution, found once per input shape by
        running one row through the shared model."""
        key = tuple(inputs.shape[1:])
        if key not in self._row_macs:
            macs = []

            def count(conv, _, out):
                macs.append(conv.shared.weight.numel() * out.shape[-2] * out.shape[-1])

            convs = [m for m in self.routed if isinstance(m, RoutedConv2d)]
            hooks = [conv.register_forward_hook(count) for conv in convs]
            try:
                with torch.no_grad():
                    self.model(inputs[:1])
            finally:
                for hook in hooks:
                    hook.remove()
            self._row_macs[key] = sum(macs) / max(len(macs), 1)
        return self._row_macs[key]

    def _run_on_lanes(self, inputs: torch.Tensor, weights: torch.Tensor, lanes: Lanes) -> torch.Tensor:
        route = lanes_route(weights, lanes)
        for module in self.routed:
            module.route = route
        try:
            out = self.model(pack(inputs, lanes))
        finally:
            set_route(self.routed, None)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"task lanes need a model that returns a tensor, not {type(out).__name__}")
        return unpack(out, lanes).contiguous()

    def _run(self, inputs, weights: torch.Tensor, kwargs: dict):
        """The per-layer path: rows grouped by task, each routed layer serving every task's rows."""
        batch = inputs.shape[0]
        order = task_order(weights)
        if order is not None:  # rows grouped by task inside the model, handed back in the caller's order
            pick = lambda value: value.index_select(0, order) if _batch_major(value, batch) else value  # noqa: E731
            inputs, weights = pick(inputs), pick(weights)
            kwargs = {key: pick(value) for key, value in kwargs.items()}
        set_route(self.routed, weights)
        try:
            out = self.model(inputs, **kwargs)
        finally:
            set_route(self.routed, None)
        return out if order is None else _rows_in_order(out, torch.argsort(order), batch)
