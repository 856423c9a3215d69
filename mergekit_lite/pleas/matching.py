"""Matching units of two models, partial matching, and choosing per-group ratios for a target compute.

A group's layout after partial matching with ratio r: [merged pairs | A-only units | B-only units], where the
(1 - r) * d best-correlated pairs are merged and the other units of both models are kept side by side. A
layout of units inside sections (a fused q/k/v projection) reorders that to one such run per section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@dataclass
class CrossStats:
    """Running sums for the correlation between the units of A and of B over many rows."""

    rows: int
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    cross: torch.Tensor  # sum of a_i * b_j, (d, d)

    @classmethod
    def empty(cls, width: int, device: torch.device | str = "cpu") -> "CrossStats":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(width), z(width), z(width), z(width), z(width, width))

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b: (rows, d) activations of the same inputs in A and in B."""
        a, b = a.double(), b.double()
        self.rows += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def correlation(self) -> torch.Tensor:
        n = max(self.rows, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + 1e-8)


def match(correlation: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment maximising total correlation: pairs (a_units[k], b_units[k])."""
    a_units, b_units = linear_sum_assignment(correlation.numpy(), maximize=True)
    return a_units, b_units


@dataclass
class Layout:
    """Where each unit of the merged group comes from: merged pairs, then A-only, then B-only."""

    merged_a: torch.Tensor
    merged_b: torch.Tensor
    only_a: torch.Tensor
    only_b: torch.Tensor
    pair_correlation: torch.Tensor  # correlation of each merged pair, best first
    order: torch.Tensor | None = None  # final unit order over [merged | A-only | B-only] (None: as is)

    @property
    def width(self) -> int:
        return len(self.merged_a) + len(self.only_a) + len(self.only_b)

    @property
    def merged(self) -> int:
        return len(self.merged_a)

    def combine(self, a: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
        """Values of A and B along `axis`, laid out as [mean of merged pairs | A-only | B-only]."""
        pick = lambda t, i: t.index_select(axis, i.to(t.device))  # noqa: E731
        merged = (pick(a, self.merged_a) + pick(b, self.merged_b)) / 2
        out = torch.cat([merged, pick(a, self.only_a), pick(b, self.only_b)], dim=axis)
        return out if self.order is None else pick(out, self.order)

    def origin(self) -> torch.Tensor:
        """Per merged unit: 0 merged, 1 from A only, 2 from B only."""
        origin = torch.cat([torch.zeros(self.merged, dtype=torch.long), torch.ones(len(self.only_a), dtype=torch.long),
                            torch.full((len(self.only_b),), 2, dtype=torch.long)])
        return origin if self.order is None else origin[self.order]


def identity_layout(width: int) -> Layout:
    """A frozen space (model input, model output): unit i of A is unit i of B, all merged."""
    units = torch.arange(width)
    return Layout(units, units, units[:0], units[:0], torch.ones(width))


def partial_layout(correlation: torch.Tensor, pairs: tuple[np.ndarray, np.ndarray], ratio: float) -> Layout:
    """Merge the best (1 - ratio) share of the matched pairs; keep the rest of both models' units apart."""
    a_units, b_units = (torch.as_tensor(p, dtype=torch.long) for p in pairs)
    quality = correlation[a_units, b_units]
    order = torch.argsort(quality, descending=True)
    width = len(a_units)
    keep = width - int(round(ratio * width))
    merged = order[:keep]
    apart = order[keep:]
    return Layout(a_units[merged], b_units[merged], torch.sort(a_units[apart]).values, torch.sort(b_units[apart]).values,
                  quality[merged].float())


def block_cost(out_layout: Layout, in_layout: Layout) -> int:
    """Non-zero input-output unit pairs of a layer between two layouts: merged outputs read every input, A-only
    outputs read merged and A-only inputs, B-only outputs merged and B-only inputs."""
    m_in, a_in, b_in = in_layout.merged, len(in_layout.only_a), len(in_layout.only_b)
    m_out, a_out, b_out = out_layout.merged, len(out_layout.only_a), len(out_layout.only_b)
    return m_out * (m_in + a_in + b_in) + a_out * (m_in + a_in) + b_out * (m_in + b_in)


def allocate_ratios(qualities: list[torch.Tensor], layer_costs: Callable[[list[float]], float], target: float,
                    step: float = 0.125) -> list[float]:
    """Per-group ratios that reach `target` compute (relative to one model) by unmerging, a step at a time,
    the group whose currently merged pairs match worst (a step is at least one unit: one head of a head group).
    `layer_costs(ratios)` gives the compute ratio. At 2.0 every group is unmerged: the two models side by side."""
    ratios = [0.0] * len(qualities)
    if target <= 1.0 + 1e-9:
        return ratios
    if target >= 2.0 - 1e-9:
        return [1.0] * len(qualities)
    sorted_quality = [torch.sort(q, descending=True).values for q in qualities]
    while layer_costs(ratios) < target - 1e-6:
        best, best_value = None, None
        for g, quality in enumerate(sorted_quality):
            if ratios[g] >= 1.0 - 1e-9:
                continue
            kept = len(quality) - int(round(ratios[g] * len(quality)))
            value = float(quality[:kept].mean()) if kept else float("inf")
            if best_value is None or value < best_value:
                best, best_value = g, value
        if best is None:
            break
        ratios[best] = min(1.0, ratios[best] + max(step, 1.0 / len(sorted_quality[best])))
    return ratios
