"""Permutation groups from the model graph.

A permutation group is a set of (parameter, axis) pairs whose units must move together: a layer's output
channels, the next layer's input channels, a norm's parameters, every tensor on one residual stream. They
are derived by tracing the model with torch.fx and following each tensor's channel axis through the graph
with union-find: residual adds join the streams they add; groups touching the model's input or output, or
any operation the tracer does not understand (reshapes, attention, concatenation), are frozen, never
silently broken. `check_groups` then proves the result: permuting every group at random must leave the
model's outputs unchanged.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from mergekit_lite.errors import UserError
from mergekit_lite.models.tracing import trace
from mergekit_lite.pleas.families import hand_written_spec
from mergekit_lite.pleas.spec import Group, Layer, Spec

CONV_LINEAR = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)
NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)
SHAPE_KEEPING_MODULES = (
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.LeakyReLU,
    torch.nn.Identity, torch.nn.Dropout, torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveAvgPool2d,
    torch.nn.AdaptiveMaxPool2d, torch.nn.Flatten, torch.nn.Hardswish, torch.nn.Mish,
)
SHAPE_KEEPING_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu, torch.sigmoid,
    torch.tanh, torch.nn.functional.dropout, torch.flatten, torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d, torch.nn.functional.hardswish,
}
SHAPE_KEEPING_METHODS = {"relu", "relu_", "flatten", "contiguous", "clone", "sigmoid", "tanh"}
ADDS = {operator.add, operator.iadd, torch.add}


class _Spaces:
    """Union-find over channel spaces, each with a width and a frozen flag."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int | None] = []
        self.frozen: list[bool] = []
        self.members: list[list[tuple[str, int]]] = []

    def new(self, width: int | None = None, frozen: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.frozen.append(frozen)
        self.members.append([])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.parent[b] = a
        self.members[a] += self.members[b]
        self.frozen[a] = self.frozen[a] or self.frozen[b]
        wa, wb = self.width[a], self.width[b]
        if wa is not None and wb is not None and wa != wb:
            self.frozen[a] = True  # a size mismatch means the channels are not one space: leave them alone
        self.width[a] = wa if wa is not None else wb
        return a

    def set_width(self, a: int, width: int) -> None:
        root = self.find(a)
        if self.width[root] is None:
            self.width[root] = width
        elif self.width[root] != width:
            self.frozen[root] = True

    def freeze(self, a: int) -> None:
        self.frozen[self.find(a)] = True


def permutation_spec(model: torch.nn.Module) -> Spec:
    """The model's permutation groups and conv/linear layers: a hand-written spec for the families fx cannot
    trace through (transformers decoders, timm ViTs), else from its fx graph (norms join their input's group)."""
    spec = hand_written_spec(model)
    if spec is not None:
        return spec
    if getattr(getattr(model, "config", None), "model_type", None) is not None:
        raise UserError(f"PLeaS covers Llama-style transformers decoders (Llama, Mistral, Qwen2 and others with their "
                        f"module names); {type(model).__name__} is not supported yet")
    graph = trace(model)
    modules = dict(graph.named_modules())
    spaces = _Spaces()
    space_of: dict[str, int] = {}
    layers: list[tuple[str, torch.nn.Module, str, int, int]] = []

    def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [a for a in node.all_input_nodes if a.name in space_of]

    def freeze_inputs(node: torch.fx.Node) -> None:
        for a in tensor_inputs(node):
            spaces.freeze(space_of[a.name])

    for node in graph.graph.nodes:
        if node.op == "placeholder":
            space_of[node.name] = spaces.new(frozen=True)
        elif node.op == "output":
            freeze_inputs(node)
        elif node.op == "get_attr":
            space_of[node.name] = spaces.new(frozen=True)
        elif node.op == "call_module":
            module = modules[node.target]
            inputs = tensor_inputs(node)
            if not inputs:
                space_of[node.name] = spaces.new(frozen=True)
                continue
            source = space_of[inputs[0].name]
            if isinstance(module, CONV_LINEAR) and getattr(module, "groups", 1) == 1 and len(inputs) == 1:
                spaces.set_width(source, module.weight.shape[1])
                spaces.members[spaces.find(source)].append((f"{node.target}.weight", 1))
                out = spaces.new(width=module.weight.shape[0])
                spaces.members[out].append((f"{node.target}.weight", 0))
                if module.bias is not None:
                    spaces.members[out].append((f"{node.target}.bias", 0))
                space_of[node.name] = out
                layers.append((node.target, module, node.name, source, out))
            elif isinstance(module, NORMS) and len(inputs) == 1 and _norm_is_per_channel(module):
                width = module.num_features if hasattr(module, "num_features") else module.normalized_shape[0]
                spaces.set_width(source, width)
                root = spaces.find(source)
                for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    if name != "num_batches_tracked":
                        spaces.members[root].append((f"{node.target}.{name}", 0))
                space_of[node.name] = source
            elif isinstance(module, SHAPE_KEEPING_MODULES) and len(inputs) == 1:
                space_of[node.name] = source
            else:
                freeze_inputs(node)
                space_of[node.name] = spaces.new(frozen=True)
        elif node.op in ("call_function", "call_method"):
            inputs = tensor_inputs(node)
            if not inputs:
                continue
            if node.op == "call_function" and node.target in ADDS and len(inputs) == 2:
                space_of[node.name] = spaces.union(space_of[inputs[0].name], space_of[inputs[1].name])
            elif node.op == "call_function" and node.target in ADDS and len(inputs) == 1:
                space_of[node.name] = space_of[inputs[0].name]  # adding a constant
            elif len(inputs) == 1 and ((node.op == "call_function" and node.target in SHAPE_KEEPING_FUNCTIONS)
                                       or (node.op == "call_method" and node.target in SHAPE_KEEPING_METHODS)
                                       or _is_spatial_mean(node)):
                space_of[node.name] = space_of[inputs[0].name]
            else:
                freeze_inputs(node)
                space_of[node.name] = spaces.new(frozen=True)

    roots: dict[int, Group] = {}
    for name, space in space_of.items():
        root = spaces.find(space)
        if spaces.frozen[root] or not spaces.members[root]:
            continue
        if root not in roots:
            roots[root] = Group(len(roots), spaces.width[root], sorted(set(spaces.members[root])))
        roots[root].nodes.append(name)
    group_of = lambda space: roots[spaces.find(space)].index if spaces.find(space) in roots else None  # noqa: E731
    return Spec(
        groups=list(roots.values()),
        layers=[Layer(name, module, node, group_of(src), group_of(out)) for name, module, node, src, out in layers],
        graph=graph,
    )


def _norm_is_per_channel(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.LayerNorm):
        return len(module.normalized_shape) == 1
    return True


def _is_spatial_mean(node: torch.fx.Node) -> bool:
    """x.mean((2, 3)) / x.mean(dim=(-2, -1)): a global pool over spatial axes keeps the channel axis."""
    if node.op != "call_method" or node.target != "mean":
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    return bool(dims) and all(d in (2, 3, -1, -2) for d in dims)


def permute_state(state: dict[str, torch.Tensor], spec: Spec, permutations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `state` with every group's axes reordered: new unit i is old unit permutations[g][i]."""
    out = dict(state)
    for group, order in zip(spec.groups, permutations):
        for name, axis in group.members:
            index = group.unit_order(order, name, out[name].shape[axis]).to(out[name].device)
            out[name] = out[name].index_select(axis, index)
    return out


def output_tensor(output: Any) -> torch.Tensor:
    """A model's main output: the tensor itself, or a transformers output's logits."""
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def check_groups(model: torch.nn.Module, spec: Spec, example: torch.Tensor, seed: int = 0, tolerance: float = 1e-4) -> float:
    """Permute every group at random and compare outputs; returns the largest relative difference and
    raises if it exceeds `tolerance` (the graph analysis would then be wrong for this model)."""
    gen = torch.Generator().manual_seed(seed)
    permutations = [torch.randperm(g.width, generator=gen) for g in spec.groups]
    state = model.state_dict()
    model.eval()
    reference = output_tensor(model(example))
    shuffled = permute_state(state, spec, permutations)
    try:
        model.load_state_dict(shuffled)
        changed = output_tensor(model(example))
    finally:
        model.load_state_dict(state)
    scale = reference.abs().max().clamp_min(1e-12)
    error = float((changed - reference).abs().max() / scale)
    if error > tolerance:
        raise RuntimeError(f"permuting the traced groups changed the outputs by {error:.2e}; refusing to merge")
    return error
