"""A linear layer that adds each task's low-rank update, weighted per input row by a router.

y = x W^T + b + sum_t w_t(x) * (x R_t^T) L_t^T, with L_t (m, r) and R_t (r, n): every row of a batch gets its own
task mix at O(T r (m + n)) per row, and no dense weight is ever rebuilt.
"""

from __future__ import annotations

import torch


class RoutedLinear(torch.nn.Module):
    def __init__(self, shared: torch.nn.Linear, lefts: list[torch.Tensor], rights: list[torch.Tensor],
                 bias_deltas: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        if len(lefts) != len(rights) or not lefts:
            raise ValueError("one (left, right) factor pair per task is needed")
        self.shared = shared
        self.register_buffer("lefts", torch.stack(lefts))  # (T, m, r)
        self.register_buffer("rights", torch.stack(rights))  # (T, r, n)
        self.register_buffer("bias_deltas", torch.stack(bias_deltas) if bias_deltas else None)  # (T, m), dense
        self.route: torch.Tensor | None = None  # (batch, T), set by the caller before each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.route is None:
            return out
        if self.route.shape[0] != x.shape[0]:
            raise ValueError(f"router weights for {self.route.shape[0]} rows, input has {x.shape[0]}")
        projected = torch.einsum("b...n,trn->b...tr", x, self.rights)
        weights = self.route.view(self.route.shape[0], *([1] * (x.dim() - 2)), self.route.shape[1], 1)
        out = out + torch.einsum("b...tr,tmr->b...m", projected * weights, self.lefts)
        if self.bias_deltas is not None:
            out = out + (self.route @ self.bias_deltas).view(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return out


def route_linears(model: torch.nn.Module, shared: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                  rank: float | int, seed: int = 0) -> dict[str, object]:
    """Replace every nn.Linear of `model` (holding the shared weights) by a RoutedLinear whose per-task
    factors compress (expert - shared); returns, per layer, the factors' residual energies. Other tensors keep
    the shared values."""
    from mergekit_lite.twin.compress import low_rank, rank_for

    energies: dict[str, object] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        key = f"{name}.weight"
        factors = [low_rank(e[key] - shared[key], rank_for(tuple(shared[key].shape), rank), seed) for e in experts]
        biases = [e[f"{name}.bias"] - shared[f"{name}.bias"] for e in experts] if module.bias is not None else None
        routed = RoutedLinear(module, [f.left for f in factors], [f.right for f in factors], biases)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, routed)
        energies[name] = [f.residual_energy for f in factors]
    return energies


def set_route(model: torch.nn.Module, route: torch.Tensor | None) -> None:
    """Give every routed layer the per-row task weights (batch, T) for the next forward pass."""
    for module in model.modules():
        if isinstance(module, RoutedLinear):
            module.route = route


def dense_for_row(shared: torch.nn.Linear, lefts: list[torch.Tensor], rights: list[torch.Tensor],
                  route_row: torch.Tensor) -> torch.Tensor:
    """The weight one input row effectively sees: W + sum_t w_t L_t R_t (for checks and static collapse)."""
    weight = shared.weight.detach().clone()
    for w, left, right in zip(route_row.tolist(), lefts, rights):
        weight += w * (left @ right)
    return weight
