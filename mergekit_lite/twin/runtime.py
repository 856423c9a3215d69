"""Running a Twin-Merging directory: the shared model with routed layers, and the static collapse.

    from mergekit_lite.twin import TwinModel
    twin = TwinModel.load("out/twin")
    logits = twin(batch)                              # each row routed on its own
    logits = twin(batch, weights={"code": 1.0})       # a fixed task mix
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint
from mergekit_lite.checkpoint.files import refuse_overlap
from mergekit_lite.checkpoint.lock import output_lock
from mergekit_lite.checkpoint.writer import check_output_path
from mergekit_lite.errors import UserError
from mergekit_lite.layers import must_stay_positive
from mergekit_lite.models.loading import load_model
from mergekit_lite.models.tracing import trace
from mergekit_lite.twin.lanes import Lanes, lay_out, pack, split_tasks, unpack
from mergekit_lite.twin.routed import (RoutedBatchNorm2d, RoutedConv1D, RoutedConv2d, RoutedEmbedding,
                                       RoutedLayerNorm, RoutedLinear, RoutedRMSNorm, fold_norms, is_rms_norm,
                                       is_one_hot, keep_task_weights, lanes_route, routed_layers, set_route,
                                       task_order)
from mergekit_lite.twin.router import Router, SiteRouters, pooled_features_at, route_weights
from mergekit_lite.twin.store import EXPERTS, ROUTER, SHARED, StackedDelta, dense_name, left_name, load_deltas, \
    read_manifest, right_name


def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def install_routes(model: torch.nn.Module, deltas: dict[str, StackedDelta]) -> tuple[list[str], list[str]]:
    """Wrap every layer whose tensors have deltas in its routed form; returns (routed, unrouted) tensor names.
    Unrouted tensors (e.g. a ViT position embedding) keep the shared value at run time."""
    pairs = conv_norm_pairs(model)
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)

    def delta(tensor: torch.Tensor | None) -> tuple[str | None, StackedDelta | None]:
        for name in names_of.get(id(tensor), []) if tensor is not None else []:
            if name in deltas:
                return name, deltas[name]
        return None, None

    routed: set[str] = set()
    for module_name, module in list(model.named_modules()):
        wrapper, used = None, []
        if isinstance(module, torch.nn.Linear) or _is_conv1d(module) or (
                isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"):
            weight_name, weight = delta(module.weight)
            if weight is None or weight.lefts is None:
                continue
            bias_name, bias = delta(module.bias)
            kind = RoutedConv1D if _is_conv1d(module) else RoutedConv2d if isinstance(module, torch.nn.Conv2d) else RoutedLinear
            wrapper = kind(module, weight.lefts, weight.rights, bias.dense if bias is not None else None)
            used = [weight_name, bias_name]
        elif isinstance(module, torch.nn.Embedding):
            weight_name, weight = delta(module.weight)
            if weight is None or weight.lefts is None:
                continue
            wrapper, used = RoutedEmbedding(module, weight.lefts, weight.rights), [weight_name]
        elif isinstance(module, torch.nn.LayerNorm):
            (w_name, w), (b_name, b) = delta(module.weight), delta(module.bias)
            if w is None and b is None:
                continue
            wrapper = RoutedLayerNorm(module, w.dense if w is not None else None, b.dense if b is not None else None)
            used = [w_name, b_name]
        elif is_rms_norm(module):
            weight_name, weight = delta(module.weight)
            if weight is None:
                continue
            wrapper, used = RoutedRMSNorm(module, weight.dense), [weight_name]
        elif isinstance(module, torch.nn.BatchNorm2d):
            found = {key: delta(getattr(module, key)) for key in RoutedBatchNorm2d.NAMES}
            if all(d is None for _, d in found.values()):
                continue
            wrapper = RoutedBatchNorm2d(module, {key: d.dense for key, (_, d) in found.items() if d is not None})
            used = [n for n, _ in found.values()]
        if wrapper is None:
            continue
        parent, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, wrapper)
        routed.update(n for n in used if n is not None)
    fold_norms(model, pairs)
    return sorted(routed), sorted(set(deltas) - routed)


def conv_norm_pairs(model: torch.nn.Module) -> dict[str, str]:
    """Convolutions whose output nothing but one batch norm reads (conv -> norm, as in ResNets): conv name ->
    norm name, from the model's fx graph; empty for models without batch norms or that do not trace."""
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        return {}
    try:
        graph = trace(model)
    except Exception:  # torch.fx raises many kinds on untraceable code: then nothing is folded
        return {}
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), torch.nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1 \
                and isinstance(graph.get_submodule(source.target), torch.nn.Conv2d) \
                and calls[source.target] == 1 and calls[node.target] == 1:
            pairs[source.target] = node.target
    return pairs


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


def task_weights(tasks: list[str], weights: dict[str, float]) -> torch.Tensor:
    """{task: weight} -> a vector over the directory's tasks (unnamed tasks weigh 0)."""
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; this directory has {', '.join(tasks)}")
    bad = sorted(task for task, weight in weights.items() if not math.isfinite(float(weight)))
    if bad:
        raise UserError(f"task weight of {bad[0]} is {weights[bad[0]]}; weights must be finite numbers")
    return torch.tensor([float(weights.get(task, 0.0)) for task in tasks])


# Memory (bytes) that TwinModel.load lets small linear layers spend on per-task weights by default: every layer of
# a small model, the smallest layers of a GPT-2-small-sized one.
TASK_WEIGHT_BUDGET = 256 * 2**20


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


# Task lanes are used when each task's rows cost at most this many multiply-adds in the average routed conv;
# above it every layer's per-task calls run near the kernels' peak and lanes would only add padding. On the CPU
# (8 tasks): the quality suite's ResNet at 256 rows (3e6 a task) and a ResNet-50 at 32 and 64 px (2.5e7-5e7) gain
# from lanes; a ResNet-50 at 160 px with 2-4 rows a task (8e7-1.6e8) runs at 1.1-1.2x the shared model without.
LANE_GROUP_MACS = 6e7


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
                 top_k: int, unrouted: list[str], sequence_max: bool = False) -> None:
        super().__init__()
        if isinstance(router, Router):
            router = SiteRouters([feature], [router])
        self.model, self.router, self.tasks = model, router, list(tasks)
        self.top_k, self.unrouted = top_k, unrouted  # the feature sites live in self.router.sites
        self.sequence_max = sequence_max  # directories written before it pooled maxima have no such setting
        self.kept_task_weights = {"layers": 0, "bytes": 0}  # set by load (keep_task_weights)
        self.routed = routed_layers(model)  # found once: each batch sets their route
        self._row_macs: dict[tuple, float] = {}  # input shape -> multiply-adds a row in the average routed conv
        lane_layers = (RoutedConv2d, RoutedBatchNorm2d, RoutedLinear)
        self.uses_lanes: bool | None = None if any(isinstance(m, RoutedConv2d) for m in self.routed) and \
            all(type(m) in lane_layers for m in self.routed) else False

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             task_weight_budget: int = TASK_WEIGHT_BUDGET) -> "TwinModel":
        """The shared model with routed layers and the router, on `device`. `task_weight_budget` (bytes) bounds the
        memory that the smallest linear layers may spend on keeping each task's own weight for top-1 rows
        (faster than the factors there); 0 keeps none. Convolutions keep their per-task filters regardless."""
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
                   unrouted, settings.get("sequence_max") is True).eval()
        twin.kept_task_weights = {"layers": kept_weights[0], "bytes": kept_weights[1]}
        return twin

    @torch.no_grad()
    def route(self, inputs, **kwargs) -> torch.Tensor:
        """Per-row task weights (batch, T) from the shared model's feature (no routes applied)."""
        set_route(self.routed, None)
        features = pooled_features_at(self.model, self.router.sites, inputs, sequence_max=self.sequence_max, **kwargs)
        return route_weights(self.router(features), self.top_k)

    def forward(self, inputs, weights: torch.Tensor | dict[str, float] | None = None, **kwargs):
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
        (lanes.split_tasks), or tasks with many rows each in large convolutions (LANE_GROUP_MACS)."""
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
        if size is not None and sum(rest) / sum(1 for n in rest if n) * self._conv_macs_per_row(inputs) > LANE_GROUP_MACS:
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


def collapse(directory: str | Path, weights: dict[str, float], out: str | Path, force: bool = False) -> dict:
    """A plain checkpoint for one fixed task mix: shared + sum_t w_t V_t, streamed tensor by tensor, in the shared
    checkpoint's layout (config and tokenizer copied), so it loads like the source models."""
    directory, out = Path(directory), Path(out)
    manifest = read_manifest(directory)
    vector = task_weights(manifest["tasks"], weights)
    check_output_path(out, force)
    refuse_overlap(out, [directory], "output")
    with output_lock(out):
        return _collapse(directory, manifest, weights, vector, out, force)


def _collapse(directory: Path, manifest: dict, weights: dict[str, float], vector: torch.Tensor, out: Path,
              force: bool) -> dict:
    shared = open_checkpoint(directory / SHARED)
    experts = open_checkpoint(directory / EXPERTS)
    kept: list[str] = []
    try:
        specs = [TensorSpec(name, info.dtype, tuple(info.shape)) for name, info in shared.tensors.items()]
        with CheckpointWriter(out, specs, force=force, metadata={"merged_with": "mergekit_lite twin-collapse"}) as writer:
            for name in shared.tensors:
                tensor = shared.get(name)
                entry = manifest["tensors"].get(name)
                if entry is not None:
                    mix = torch.zeros(tensor.shape, dtype=torch.float32)
                    for task, w in zip(manifest["tasks"], vector.tolist()):
                        if w == 0.0:
                            continue
                        if entry["kind"] == "dense":
                            mix += w * experts.get(dense_name(task, name)).float()
                        else:
                            left, right = experts.get(left_name(task, name)).float(), experts.get(right_name(task, name)).float()
                            mix += w * (left @ right).view(tensor.shape)
                    mixed = tensor.float() + mix
                    if must_stay_positive(name) and not bool((mixed > 0).all()):
                        kept.append(name)  # the shared expert's variances: the mix would make the model compute NaN
                    else:
                        tensor = mixed.to(tensor.dtype)
                writer.write(name, tensor)
            writer.copy_config(directory / SHARED)
            writer.copy_support_files(directory / SHARED)
            mix_record = {"twin": str(directory), "weights": {t: float(weights.get(t, 0.0)) for t in manifest["tasks"]}}
            writer.add_file("twin_collapse.json", json.dumps(mix_record, indent=2) + "\n")
    finally:
        shared.close()
        experts.close()
    warnings = [f"{len(kept)} batch-norm variance tensor(s) would come out zero or negative under this mix and were "
                f"kept from the shared expert, e.g. {kept[0]!r}"] if kept else []
    return {"path": str(out), "tensors": len(specs), "weights": mix_record["weights"], "warnings": warnings}
