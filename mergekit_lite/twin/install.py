"""Installing routes into a model: every layer whose tensors have deltas swapped for its routed form, and each
conv linked to the batch norm that alone reads its output (so a task's norm folds into its filters)."""

from __future__ import annotations

import torch

from mergekit_lite.models.tracing import trace
from mergekit_lite.twin.routed import RoutedConv1D, RoutedEmbedding, RoutedLinear
from mergekit_lite.twin.routed_conv import RoutedConv2d, fold_norms
from mergekit_lite.twin.routed_norms import RoutedBatchNorm2d, RoutedLayerNorm, RoutedRMSNorm, is_rms_norm
from mergekit_lite.twin.store import StackedDelta


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
