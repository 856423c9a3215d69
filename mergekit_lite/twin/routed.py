"""A linear layer that adds each task's low-rank update, weighted per input row by a router.

y = x W^T + b + sum_t w_t(x) * (x R_t^T) L_t^T, with L_t (m, r) and R_t (r, n): every row of a batch gets its own
task mix at O(T r (m + n)) per row, and no dense weight is ever rebuilt.
"""

from __future__ import annotations

import torch


class RoutedLinear(torch.nn.Module):
    def __init__(self, shared: torch.nn.Linear, lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> None:
        super().__init__()
        if len(lefts) != len(rights) or not lefts:
            raise ValueError("one (left, right) factor pair per task is needed")
        self.shared = shared
        self.register_buffer("lefts", torch.stack(lefts))  # (T, m, r)
        self.register_buffer("rights", torch.stack(rights))  # (T, r, n)
        self.route: torch.Tensor | None = None  # (batch, T), set by the caller before each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.route is None:
            return out
        if self.route.shape[0] != x.shape[0]:
            raise ValueError(f"router weights for {self.route.shape[0]} rows, input has {x.shape[0]}")
        projected = torch.einsum("b...n,trn->b...tr", x, self.rights)
        weights = self.route.view(self.route.shape[0], *([1] * (x.dim() - 2)), self.route.shape[1], 1)
        return out + torch.einsum("b...tr,tmr->b...m", projected * weights, self.lefts)


def dense_for_row(shared: torch.nn.Linear, lefts: list[torch.Tensor], rights: list[torch.Tensor],
                  route_row: torch.Tensor) -> torch.Tensor:
    """The weight one input row effectively sees: W + sum_t w_t L_t R_t (for checks and static collapse)."""
    weight = shared.weight.detach().clone()
    for w, left, right in zip(route_row.tolist(), lefts, rights):
        weight += w * (left @ right)
    return weight
