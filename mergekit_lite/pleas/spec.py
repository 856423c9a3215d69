"""Permutation specs as plain data: groups of units that move together, the layers that read and write them, and
how a model's activations are read (from its fx graph or by forward hooks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from mergekit_lite.pleas.features import capture, capture_hooks


@dataclass
class Group:
    """One permutation group: its width, its members, and the activations whose channel axis carries it.

    A block group (attention heads) permutes whole blocks: `width` counts blocks, and each member's axis holds
    `segments` sections (3 for a fused q/k/v projection) of `width` equal blocks, which move together."""

    index: int
    width: int
    members: list[tuple[str, int]] = field(default_factory=list)  # (parameter or buffer name, axis)
    nodes: list[str] = field(default_factory=list)  # activations (fx node or hook names) whose channels are this group
    blocks: bool = False
    segments: dict[str, int] = field(default_factory=dict)  # member name -> sections along its axis (default 1)
    # attention heads: (the query projection, whose token count is the sequence length; query units per block)
    attention: tuple[str, int] | None = None

    def unit_order(self, order: torch.Tensor, name: str, size: int) -> torch.Tensor:
        """Index along a member's axis (of `size`) for a group order: the order itself, or its blocks unrolled."""
        return expand_blocks(order, size, self.width, self.segments.get(name, 1)) if self.blocks else order


def expand_blocks(order: torch.Tensor, size: int, blocks: int, segments: int = 1) -> torch.Tensor:
    """Unit indices along an axis of `size` made of `segments` sections of `blocks` equal blocks, for a block
    order (new block i is old block order[i], in every section)."""
    block = size // (segments * blocks)
    units = (order.long().unsqueeze(1) * block + torch.arange(block)).flatten()
    return torch.cat([units + s * blocks * block for s in range(segments)])


@dataclass
class Layer:
    """A conv or linear module with the groups on its input and output channels (None: frozen)."""

    name: str
    module: torch.nn.Module
    node: str
    input_group: int | None
    output_group: int | None


@dataclass
class Spec:
    """Groups and layers of one model, and how to read its activations: from the fx graph's nodes, or (for a
    hand-written spec) from forward hooks named "module:in" / "module:out"."""

    groups: list[Group]
    layers: list[Layer]
    graph: torch.fx.GraphModule | None
    model: torch.nn.Module | None = None
    # the norm gains before an output head tied to the input embeddings: that head cannot be solved or halved,
    # so each model's private units there are halved instead (the logits stay the mean of both models')
    halve_private: list[str] = field(default_factory=list)

    def activations(self, batch: torch.Tensor, wanted: set[str]) -> dict[str, torch.Tensor]:
        if self.graph is not None:
            return capture(self.graph, batch, wanted)[1]
        return capture_hooks(self.model, batch, wanted)

    def layer_input(self, layer: Layer) -> str:
        """The name of the activation a layer reads."""
        if self.graph is None:
            return f"{layer.name}:in"
        node = next(n for n in self.graph.graph.nodes if n.name == layer.node)
        return node.all_input_nodes[0].name


