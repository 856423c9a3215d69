"""Running a Twin-Merging directory: the shared model with routed layers, and the static collapse.

    from mergekit_lite.twin import TwinModel
    twin = TwinModel.load("out/twin")
    logits = twin(batch)                              # each row routed on its own
    logits = twin(batch, weights={"code": 1.0})       # a fixed task mix
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergekit_lite.errors import UserError
from mergekit_lite.twin.routed import (RoutedBatchNorm2d, RoutedConv1D, RoutedConv2d, RoutedEmbedding,
                                       RoutedLayerNorm, RoutedLinear, RoutedRMSNorm, fold_norms, is_rms_norm,
                                       keep_task_weights, routed_layers, set_route, task_order)
from mergekit_lite.twin.router import Router, pooled_features, route_weights
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
    from mergekit_lite.pleas.graph import trace

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
    return torch.tensor([float(weights.get(task, 0.0)) for task in tasks])


# Memory (bytes) that TwinModel.load lets small linear layers spend on per-task weights by default: every layer of
# a small model, the smallest layers of a GPT-2-small-sized one.
TASK_WEIGHT_BUDGET = 256 * 2**20


class TwinModel(torch.nn.Module):
    """The shared model with routed layers and the router; call it like the model itself."""

    def __init__(self, model: torch.nn.Module, router: Router, tasks: list[str], feature: str, top_k: int,
                 unrouted: list[str]) -> None:
        super().__init__()
        self.model, self.router, self.tasks = model, router, list(tasks)
        self.feature, self.top_k, self.unrouted = feature, top_k, unrouted
        self.kept_task_weights = {"layers": 0, "bytes": 0}  # set by load (keep_task_weights)
        self.routed = routed_layers(model)  # found once: each batch sets their route

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             task_weight_budget: int = TASK_WEIGHT_BUDGET) -> "TwinModel":
        """The shared model with routed layers and the router, on `device`. `task_weight_budget` (bytes) bounds the
        memory that the smallest linear layers may spend on keeping each task's own weight for top-1 rows
        (faster than the factors there); 0 keeps none. Convolutions keep their per-task filters regardless."""
        from safetensors.torch import load_file

        from mergekit_lite.pleas.sources import load_model

        if task_weight_budget < 0:
            raise UserError(f"task_weight_budget is a number of bytes, 0 or more (got {task_weight_budget})")
        directory = Path(directory)
        manifest = read_manifest(directory)
        model = load_model(directory / SHARED, transformers_ok=True).to(device)
        _, unrouted = install_routes(model, load_deltas(directory, manifest, device))
        kept_weights = keep_task_weights(model, task_weight_budget)
        settings = manifest["router"]
        router = Router(settings["features"], len(manifest["tasks"]), settings.get("dropout", 0.1))
        router.load_state_dict(load_file(str(directory / ROUTER)))
        model.requires_grad_(False)  # an inference runtime: per-task filters and norms can then be kept
        twin = cls(model, router.to(device).eval(), manifest["tasks"], settings["feature"], settings["top_k"],
                   unrouted).eval()
        twin.kept_task_weights = {"layers": kept_weights[0], "bytes": kept_weights[1]}
        return twin

    @torch.no_grad()
    def route(self, inputs, **kwargs) -> torch.Tensor:
        """Per-row task weights (batch, T) from the shared model's feature (no routes applied)."""
        set_route(self.routed, None)
        features = pooled_features(self.model, self.feature, inputs, **kwargs)
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
    from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint

    directory, out = Path(directory), Path(out)
    manifest = read_manifest(directory)
    vector = task_weights(manifest["tasks"], weights)
    shared = open_checkpoint(directory / SHARED)
    experts = open_checkpoint(directory / EXPERTS)
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
                    tensor = (tensor.float() + mix).to(tensor.dtype)
                writer.write(name, tensor)
            writer.copy_config(directory / SHARED)
            writer.copy_support_files(directory / SHARED)
            mix_record = {"twin": str(directory), "weights": {t: float(weights.get(t, 0.0)) for t in manifest["tasks"]}}
            writer.add_file("twin_collapse.json", json.dumps(mix_record, indent=2) + "\n")
    finally:
        shared.close()
        experts.close()
    return {"path": str(out), "tensors": len(specs), "weights": mix_record["weights"]}
