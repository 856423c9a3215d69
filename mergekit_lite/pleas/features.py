"""Activations of chosen graph nodes, captured while the traced model runs on a batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx


class _Recorder(torch.fx.Interpreter):
    def __init__(self, graph: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(graph)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.wanted:
            self.values[node.name] = value
        return value


@torch.no_grad()
def capture(graph: torch.fx.GraphModule, inputs: torch.Tensor, wanted: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(model output, {node name: its output}) for one batch."""
    recorder = _Recorder(graph, wanted)
    output = recorder.run(inputs)
    return output, recorder.values


@torch.no_grad()
def capture_hooks(model: torch.nn.Module, inputs: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
    """{"module:in" or "module:out": that module's first input or its output} for one batch, read with
    forward hooks (for models fx cannot trace)."""
    values: dict[str, torch.Tensor] = {}
    sides: dict[str, set[str]] = {}
    for key in wanted:
        name, _, side = key.rpartition(":")
        sides.setdefault(name, set()).add(side)

    def hook(name: str):
        def record(module, args, output) -> None:
            if "in" in sides[name]:
                values[f"{name}:in"] = args[0]
            if "out" in sides[name]:
                values[f"{name}:out"] = output if isinstance(output, torch.Tensor) else output[0]
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in sides]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return values


def channel_rows(values: torch.Tensor) -> torch.Tensor:
    """(rows, channels) view of an activation: channels are axis 1 of an image tensor (N, C, H, W) or of
    (N, C), and the last axis of token tensors (N, L, C)."""
    if values.dim() == 4:
        return values.permute(0, 2, 3, 1).reshape(-1, values.shape[1])
    if values.dim() == 2:
        return values
    return values.reshape(-1, values.shape[-1])


def channel_axis(values: torch.Tensor) -> int:
    return 1 if values.dim() in (2, 4) else values.dim() - 1
