"""Layers that add each task's exclusive knowledge, weighted per input row by a router.

Every routed layer wraps the shared layer and holds, per task, either low-rank factors of its weight delta
(left L_t (m, r), right R_t (r, n) of the delta viewed as 2-D) or dense deltas of 1-D tensors. Before a forward
pass the caller sets `route`, a (batch, T) tensor of task weights. A task's update is applied only to the rows
that give it weight, at O(r (m + n)) per row, so a sparse (top-k) route costs k low-rank products per row, and no
dense weight is rebuilt per input (convolutions keep each task's filters: see RoutedConv2d). When every row has
the same weights (a fixed mix) the update runs once on the batch; when rows are grouped by task (TwinModel sorts
top-1 rows so) layers work on slices; when most rows weigh most tasks (soft routing) every task's factors run
in one product, side by side (a second copy of the factors, kept). For a conv net's top-1 batch the runtime may
instead set a route with task lanes (lanes.py): the whole batch laid out by task, every layer serving all
tasks in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mergekit_lite.twin.lanes import Lanes

RowUpdate = Callable[[torch.Tensor, int], torch.Tensor]  # (input rows, task) -> that task's output update


@dataclass
class Route:
    """Per-row task weights for one forward pass, with each task's rows found once for every layer."""

    weights: torch.Tensor  # (batch, T)
    uniform: bool  # every row has the same mix: updates run once on the whole batch
    # (task, rows, their weights or None if all 1); uniform routes: (task, None, the batch's weight as a float)
    groups: list[tuple[int, torch.Tensor | None, torch.Tensor | float | None]]
    one_task_per_row: bool = False  # every row has weight 1 on a single task (top-1 routing)
    spans: list[tuple[int, int, int]] | None = None  # one task per row, rows grouped by task: (task, start, end)
    lanes: Lanes | None = None  # the model runs on the batch packed into task lanes (see lanes.py)
    _packed: tuple | None = None
    _task_of_row: torch.Tensor | None = None
    _dense: bool | None = None

    def dense(self) -> bool:
        """Most rows give weight to most tasks (soft routing): every task's factors in one product beat a
        gathered product per task. Found once per route, asked by every layer."""
        if self._dense is None:
            self._dense = not self.uniform and not self.one_task_per_row and \
                sum(len(rows) for _, rows, _ in self.groups) >= 0.5 * self.batch * self.weights.shape[1]
        return self._dense

    def packs_well(self) -> bool:
        """Padding every task's rows to the largest group wastes at most half the work."""
        return len(self.groups) * max(len(rows) for _, rows, _ in self.groups) <= 1.5 * self.batch + 8 * len(self.groups)

    def packed(self) -> tuple[list[int], int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For one task per row: the tasks present, the largest group size n, the row indices that lay the groups
        side by side (groups padded to n with row 0), where each real row lands, and which row that is."""
        if self._packed is None:
            tasks = [task for task, _, _ in self.groups]
            size = max(len(rows) for _, rows, _ in self.groups)
            device = self.weights.device
            if device.type == "cuda":  # few distinct shapes, so cuDNN and cuBLAS reuse their plans batch after batch
                size = -(-size // 8) * 8
            gather = torch.zeros(len(tasks) * size, dtype=torch.long, device=device)
            slots, rows_all = [], []
            for g, (_, rows, _) in enumerate(self.groups):
                gather[g * size: g * size + len(rows)] = rows
                slots.append(torch.arange(g * size, g * size + len(rows), device=device))
                rows_all.append(rows)
            self._packed = (tasks, size, gather, torch.cat(slots), torch.cat(rows_all))
        return self._packed

    @property
    def batch(self) -> int:
        return self.weights.shape[0]

    def task_of_row(self) -> torch.Tensor:
        """For one task per row: each row's task index (batch,)."""
        if self._task_of_row is None:
            self._task_of_row = self.weights.argmax(-1)
        return self._task_of_row


def make_route(weights: torch.Tensor) -> Route:
    weights = weights.float()
    if bool((weights == weights[:1]).all()):
        mix = weights[0].tolist()
        return Route(weights, True, [(t, None, w) for t, w in enumerate(mix) if w != 0.0])
    if is_one_hot(weights):
        return _one_task_route(weights)
    groups = []
    for task in range(weights.shape[1]):
        rows = weights[:, task].nonzero().flatten()
        if rows.numel() == 0:
            continue
        scale = weights.index_select(0, rows)[:, task]
        groups.append((task, rows, None if bool((scale == 1).all()) else scale))
    one_task = all(scale is None for _, _, scale in groups) and sum(len(rows) for _, rows, _ in groups) == len(weights)
    spans = None
    if one_task:  # rows grouped by task (TwinModel sorts them so): slices instead of gathers and scatters
        firsts = [int(rows[0]) for _, rows, _ in groups]
        if all(int(rows[-1]) - int(rows[0]) + 1 == len(rows) for _, rows, _ in groups):
            spans = sorted((first, task, first + len(rows)) for first, (task, rows, _) in zip(firsts, groups))
            spans = [(task, start, end) for start, task, end in spans]
    return Route(weights, False, groups, one_task, spans)


def lanes_route(weights: torch.Tensor, lanes: Lanes) -> Route:
    """The route of a top-1 batch that the model runs packed into task lanes."""
    return Route(weights.float(), False, [], True, lanes=lanes)


def is_one_hot(weights: torch.Tensor) -> bool:
    """Every row gives weight 1 to a single task and 0 to the rest (top-1 routing)."""
    return bool(((weights == 0) | (weights == 1)).all()) and bool((weights.sum(-1) == 1).all())


def _one_task_route(weights: torch.Tensor) -> Route:
    """The route of one-hot rows, built from each row's task in a handful of calls (not several per task): rows
    already grouped by task get spans."""
    task = weights.argmax(-1)
    counts = torch.bincount(task, minlength=weights.shape[1]).tolist()
    if bool((task[1:] >= task[:-1]).all()):  # grouped (TwinModel sorts rows so): spans from the counts
        starts = [sum(counts[:t]) for t in range(len(counts))]
        spans = [(t, start, start + count) for t, (start, count) in enumerate(zip(starts, counts)) if count]
        groups = [(t, torch.arange(start, end, device=weights.device), None) for t, start, end in spans]
        route = Route(weights, False, groups, True, spans)
    else:
        rows_by_task = torch.split(torch.argsort(task, stable=True), counts)
        route = Route(weights, False, [(t, rows, None) for t, rows in enumerate(rows_by_task) if len(rows)], True)
    route._task_of_row = task
    return route


def task_order(weights: torch.Tensor) -> torch.Tensor | None:
    """For top-1 routing over several tasks: the row order that groups rows by task (stable), so routed layers
    work on slices; None when rows mix tasks, share one task, or are grouped already."""
    if weights.shape[0] < 2 or not is_one_hot(weights):
        return None
    task = weights.argmax(-1)
    if bool((task == task[0]).all()) or bool((task[1:] >= task[:-1]).all()):
        return None
    return torch.argsort(task, stable=True)


def add_routed(out: torch.Tensor, x: torch.Tensor, route: Route, update: RowUpdate) -> torch.Tensor:
    """out + sum_t w_t * update(x, t) per row, each task computed only on the rows that route to it. `out` is the
    shared layer's fresh output and is updated in place."""
    if route.batch != x.shape[0] and x.shape[0] != 1:
        raise ValueError(f"router weights for {route.batch} rows, input has {x.shape[0]}")
    if route.uniform:  # one mix for the whole batch
        for task, _, weight in route.groups:
            out.add_(update(x, task), alpha=weight)
        return out
    if x.shape[0] != route.batch:  # an input shared by the batch (e.g. position ids): each row gets its own
        x = x.expand(route.batch, *x.shape[1:])
        out = out.expand(route.batch, *out.shape[1:]).clone()
    if route.spans is not None:
        for task, start, end in route.spans:
            out[start:end] += update(x[start:end], task)
        return out
    for task, rows, scale in route.groups:
        contribution = update(x.index_select(0, rows), task)
        if scale is not None:
            contribution = contribution * scale.to(contribution.dtype).view(-1, *([1] * (contribution.dim() - 1)))
        out.index_add_(0, rows, contribution)
    return out


def row_params(base: torch.Tensor, deltas: torch.Tensor, route: Route) -> torch.Tensor:
    """Per-row 1-D parameters base + weights @ deltas: (batch, C)."""
    return torch.addmm(base.unsqueeze(0), route.weights.to(deltas.dtype), deltas)


def tensor_key(*tensors: torch.Tensor | None) -> tuple:
    """Storage, in-place version, device and dtype of tensors: a result kept from them is stale once this changes."""
    return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors if t is not None)


def kept(owner: torch.nn.Module, slot: str, key: tuple, make: Callable[[], tuple | torch.Tensor],
         keep: bool = True) -> tuple | torch.Tensor:
    """`make()`'s result, formed once per `key` (see tensor_key) and kept on `owner` under `slot`; never kept
    when it holds an autograd graph (the model is being trained) or when `keep` is false."""
    cached = getattr(owner, slot, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = make()
    first = value[0] if isinstance(value, tuple) else value
    if keep and not first.requires_grad:
        setattr(owner, slot, (key, value))
    return value


class Routed(torch.nn.Module):
    """Base for routed layers: the shared layer and the route for the next forward pass."""

    def __init__(self, shared: torch.nn.Module) -> None:
        super().__init__()
        self.shared = shared
        self.route: Route | None = None


def routed_layers(model: torch.nn.Module) -> list[Routed]:
    return [module for module in model.modules() if isinstance(module, Routed)]


def set_route(model: torch.nn.Module | list[Routed], weights: torch.Tensor | None) -> None:
    """Give every routed layer (of a model, or a list from routed_layers, which saves walking the model on every
    batch) the per-row task weights (batch, T) for the next forward pass."""
    route = None if weights is None else make_route(weights)
    for module in routed_layers(model) if isinstance(model, torch.nn.Module) else model:
        module.route = route


def dense_for_row(shared: torch.Tensor, lefts: torch.Tensor, rights: torch.Tensor, route_row: torch.Tensor) -> torch.Tensor:
    """The 2-D weight one input row effectively sees: W + sum_t w_t L_t R_t (for checks and static collapse)."""
    weight = shared.detach().clone().reshape(lefts.shape[1], -1)
    for w, left, right in zip(route_row.tolist(), lefts, rights):
        weight += w * (left @ right)
    return weight.view(shared.shape)


def folds_norm(route: Route | None) -> bool:
    """Rows of one task each, or one mix for the whole batch: a conv serves the rows with their task's or the
    mix's filters, and can apply the batch norm that follows it in the same call."""
    return route is not None and (route.one_task_per_row or route.uniform)
