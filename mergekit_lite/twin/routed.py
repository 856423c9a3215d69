"""Layers that add each task's exclusive knowledge, weighted per input row by a router.

Every routed layer wraps the shared layer and holds, per task, either low-rank factors of its weight delta
(left L_t (m, r), right R_t (r, n) of the delta viewed as 2-D) or dense deltas of 1-D tensors. Before a forward
pass the caller sets `route`, a (batch, T) tensor of task weights. A task's update is applied only to the rows
that give it weight, at O(r (m + n)) per row, so a sparse (top-k) route costs k low-rank products per row, and no
dense weight is rebuilt. When every row has the same weights (a fixed mix) the update runs once on the batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

RowUpdate = Callable[[torch.Tensor, int], torch.Tensor]  # (input rows, task) -> that task's output update


def add_routed(out: torch.Tensor, x: torch.Tensor, route: torch.Tensor, update: RowUpdate) -> torch.Tensor:
    """out + sum_t route[:, t] * update(x, t), each task computed only on the rows that route to it."""
    if route.shape[0] != x.shape[0] and x.shape[0] != 1:
        raise ValueError(f"router weights for {route.shape[0]} rows, input has {x.shape[0]}")
    route = route.to(out.dtype)
    if bool((route == route[:1]).all()):  # one mix for the whole batch
        for task in route[0].nonzero().flatten().tolist():
            out = out + route[0, task] * update(x, task)
        return out
    if x.shape[0] != route.shape[0]:  # an input shared by the batch (e.g. position ids): each row gets its own
        x = x.expand(route.shape[0], *x.shape[1:])
        out = out.expand(route.shape[0], *out.shape[1:])
    out = out.clone()
    for task in range(route.shape[1]):
        rows = route[:, task].nonzero().flatten()
        if rows.numel() == 0:
            continue
        contribution = update(x.index_select(0, rows), task)
        scale = route.index_select(0, rows)[:, task].view(-1, *([1] * (contribution.dim() - 1)))
        out.index_add_(0, rows, contribution * scale)
    return out


def row_params(base: torch.Tensor, deltas: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """Per-row 1-D parameters base + route @ deltas: (batch, C)."""
    return base.unsqueeze(0) + route.to(deltas.dtype) @ deltas


class Routed(torch.nn.Module):
    """Base for routed layers: the shared layer and the route for the next forward pass."""

    def __init__(self, shared: torch.nn.Module) -> None:
        super().__init__()
        self.shared = shared
        self.route: torch.Tensor | None = None

    @property
    def tasks(self) -> int:
        raise NotImplementedError


class RoutedLinear(Routed):
    """nn.Linear (weight (m, n)): y = x W^T + b + sum_t w_t [(x R_t^T) L_t^T + db_t]."""

    def __init__(self, shared: torch.nn.Linear, lefts: torch.Tensor, rights: torch.Tensor,
                 bias_deltas: torch.Tensor | None = None) -> None:
        super().__init__(shared)
        self.register_buffer("lefts", lefts)  # (T, m, r)
        self.register_buffer("rights", rights)  # (T, r, n)
        self.register_buffer("bias_deltas", bias_deltas)  # (T, m) or None

    @property
    def tasks(self) -> int:
        return self.lefts.shape[0]

    def _update(self, x: torch.Tensor, task: int) -> torch.Tensor:
        out = (x @ self.rights[task].T) @ self.lefts[task].T
        return out if self.bias_deltas is None else out + self.bias_deltas[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        return out if self.route is None else add_routed(out, x, self.route, self._update)


class RoutedConv1D(RoutedLinear):
    """transformers' Conv1D (GPT-2; weight stored (n, m)): the delta of the stored weight is L_t (n, r) R_t (r, m),
    so the update is (x L_t) R_t."""

    def _update(self, x: torch.Tensor, task: int) -> torch.Tensor:
        out = (x @ self.lefts[task]) @ self.rights[task]
        return out if self.bias_deltas is None else out + self.bias_deltas[task]


class RoutedConv2d(RoutedLinear):
    """nn.Conv2d (groups 1): the delta viewed (out, in*kh*kw) is L_t R_t, i.e. a rank-r convolution (R_t as r
    filters of the same size and stride) followed by a 1x1 convolution (L_t)."""

    def _update(self, x: torch.Tensor, task: int) -> torch.Tensor:
        conv = self.shared
        filters = self.rights[task].view(-1, *conv.weight.shape[1:])
        low = F.conv2d(x, filters, None, conv.stride, conv.padding, conv.dilation)
        out = F.conv2d(low, self.lefts[task].unsqueeze(-1).unsqueeze(-1))
        return out if self.bias_deltas is None else out + self.bias_deltas[task].view(1, -1, 1, 1)


class RoutedEmbedding(RoutedLinear):
    """nn.Embedding (weight (V, d)): row i of the delta is L_t[i] R_t, so the update is L_t[ids] R_t."""

    def _update(self, ids: torch.Tensor, task: int) -> torch.Tensor:
        return F.embedding(ids, self.lefts[task]) @ self.rights[task]


class RoutedLayerNorm(Routed):
    """nn.LayerNorm: normalise once, then per-row gain and bias (the shared ones plus the routed deltas)."""

    def __init__(self, shared: torch.nn.LayerNorm, weight_deltas: torch.Tensor | None,
                 bias_deltas: torch.Tensor | None) -> None:
        super().__init__(shared)
        self.register_buffer("weight_deltas", weight_deltas)  # (T, d)
        self.register_buffer("bias_deltas", bias_deltas)

    @property
    def tasks(self) -> int:
        return (self.weight_deltas if self.weight_deltas is not None else self.bias_deltas).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.shared(x)
        norm = self.shared
        y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
        shape = (x.shape[0], *([1] * (x.dim() - 2)), -1)
        weight = norm.weight if self.weight_deltas is None else row_params(norm.weight, self.weight_deltas, self.route)
        bias = norm.bias if self.bias_deltas is None else row_params(norm.bias, self.bias_deltas, self.route)
        y = y * (weight.view(shape) if weight.dim() == 2 else weight)
        return y + (bias.view(shape) if bias.dim() == 2 else bias)


class RoutedRMSNorm(Routed):
    """RMS norms (torch.nn.RMSNorm and the transformers families' own, plain or with a 1 + weight gain): the
    output is linear in the gain, so a row's update is normed(x) * (route @ weight deltas)."""

    def __init__(self, shared: torch.nn.Module, weight_deltas: torch.Tensor) -> None:
        super().__init__(shared)
        self.register_buffer("weight_deltas", weight_deltas)  # (T, d)
        eps = getattr(shared, "variance_epsilon", None) or getattr(shared, "eps", None)
        self.eps = float(eps) if eps is not None else float(torch.finfo(torch.float32).eps)

    @property
    def tasks(self) -> int:
        return self.weight_deltas.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.route is None:
            return out
        normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(out.dtype)
        gains = row_params(torch.zeros_like(self.weight_deltas[0]), self.weight_deltas, self.route)
        return out + normed * gains.view(gains.shape[0], *([1] * (x.dim() - 2)), -1).to(out.dtype)


def is_rms_norm(module: torch.nn.Module) -> bool:
    """An RMS norm with a 1-D gain, recognised by class name (each transformers family defines its own)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and getattr(module, "bias", None) is None)


class RoutedBatchNorm2d(Routed):
    """nn.BatchNorm2d in eval mode: each row gets its own statistics, gain and bias, folded into one scale and
    shift per channel."""

    NAMES = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, shared: torch.nn.BatchNorm2d, deltas: dict[str, torch.Tensor]) -> None:
        super().__init__(shared)
        for name in self.NAMES:
            self.register_buffer(f"{name}_deltas", deltas.get(name))

    @property
    def tasks(self) -> int:
        return next(getattr(self, f"{n}_deltas") for n in self.NAMES if getattr(self, f"{n}_deltas") is not None).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.shared(x)
        if self.shared.training:
            raise RuntimeError("routed batch norm runs in eval mode only (per-row statistics)")
        norm = self.shared
        rows = {}
        for name in self.NAMES:
            base, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
            rows[name] = base.unsqueeze(0).expand(x.shape[0], -1) if deltas is None else row_params(base, deltas, self.route)
        scale = rows["weight"] / torch.sqrt(rows["running_var"] + norm.eps)
        shift = rows["bias"] - rows["running_mean"] * scale
        return x * scale[:, :, None, None] + shift[:, :, None, None]


def set_route(model: torch.nn.Module, route: torch.Tensor | None) -> None:
    """Give every routed layer the per-row task weights (batch, T) for the next forward pass."""
    for module in model.modules():
        if isinstance(module, Routed):
            module.route = route


def dense_for_row(shared: torch.Tensor, lefts: torch.Tensor, rights: torch.Tensor, route_row: torch.Tensor) -> torch.Tensor:
    """The 2-D weight one input row effectively sees: W + sum_t w_t L_t R_t (for checks and static collapse)."""
    weight = shared.detach().clone().reshape(lefts.shape[1], -1)
    for w, left, right in zip(route_row.tolist(), lefts, rights):
        weight += w * (left @ right)
    return weight.view(shared.shape)
