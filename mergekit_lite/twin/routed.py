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
import torch.nn.functional as F

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
         keep: bool = True):
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


def _low_rank(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x @ first) @ second (+ bias), as two 2-D matrix products over all leading dimensions."""
    flat = x.reshape(-1, x.shape[-1]) @ first
    out = flat @ second if bias is None else torch.addmm(bias, flat, second)
    return out.view(*x.shape[:-1], second.shape[1])


class RoutedLinear(Routed):
    """nn.Linear (weight (m, n)): y = x W^T + b + sum_t w_t [(x R_t^T) L_t^T + db_t].

    With `keep_task_weights` (set by the runtime for the smallest layers, within a memory budget: see
    keep_task_weights), top-1 rows grouped by task run through their task's own weight W + L_t R_t and bias,
    formed once and kept: one matrix product per task, as fast as the shared layer, instead of the shared
    product plus two thin ones per task (1.2-2.1x the shared layer's time on a CPU, worst for small layers)."""

    keep_task_weights = False

    def __init__(self, shared: torch.nn.Linear, lefts: torch.Tensor, rights: torch.Tensor,
                 bias_deltas: torch.Tensor | None = None) -> None:
        super().__init__(shared)
        self.register_buffer("lefts", lefts)  # (T, m, r)
        self.register_buffer("rights", rights)  # (T, r, n)
        self.register_buffer("bias_deltas", bias_deltas)  # (T, m) or None

    def _formed_task_weights(self) -> torch.Tensor:
        """(T, rows, cols): every task's weight W + L_t R_t, the weight viewed 2-D as the factors are."""
        flat = self.shared.weight.reshape(self.lefts.shape[1], -1)
        return torch.baddbmm(flat.expand(len(self.lefts), -1, -1), self.lefts.to(flat.dtype), self.rights.to(flat.dtype))

    def task_biases(self) -> torch.Tensor | None:
        """(T, m): every task's bias b + db_t; None when the layer has neither."""
        bias = self.shared.bias
        if self.bias_deltas is None:
            return None if bias is None else bias.expand(len(self.lefts), -1)
        deltas = self.bias_deltas.to(self.shared.weight.dtype)
        return deltas if bias is None else deltas + bias

    def per_task_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every task's weight W + L_t R_t (T, *the weight's shape) and bias (T, m) or None, formed once and kept
        (`keep_task_weights`)."""
        def form() -> tuple[torch.Tensor, torch.Tensor | None]:
            return self._formed_task_weights(), self.task_biases()

        key = tensor_key(self.shared.weight, self.shared.bias, self.lefts, self.rights, self.bias_deltas)
        return kept(self, "_task_weights", key, form)

    def _task_operand(self, weights: torch.Tensor, task: int) -> torch.Tensor:
        """The (n, m) matrix that multiplies input rows for one task's kept weight (a transposed view, as
        F.linear uses it)."""
        return weights[task].T

    def _on_task_weights(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Rows grouped by task, each span through its task's kept weight and bias into its slice of the output."""
        weights, biases = self.per_task_weights()
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = flat_x.new_empty(flat_x.shape[0], self._task_operand(weights, 0).shape[1])
        per_row = flat_x.shape[0] // route.batch
        for task, start, end in route.spans:
            rows = slice(start * per_row, end * per_row)
            operand = self._task_operand(weights, task)
            if biases is None:
                torch.mm(flat_x[rows], operand, out=flat_out[rows])
            else:
                torch.addmm(biases[task], flat_x[rows], operand, out=flat_out[rows])
        return flat_out.view(*x.shape[:-1], flat_out.shape[-1])

    def _update(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return _low_rank(x, self.rights[task].T, self.lefts[task].T, None if self.bias_deltas is None else self.bias_deltas[task])

    def _factors(self, tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) per task, stacked: the update of rows x is (x @ first) @ second."""
        return self.rights[tasks].transpose(1, 2), self.lefts[tasks].transpose(1, 2)

    def _pair(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) of one task, as views."""
        return self.rights[task].T, self.lefts[task].T

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's factors side by side: first (n, T*r), second (T*r, m); task t owns columns / rows
        t*r .. (t+1)*r. Formed once and kept."""
        def stack() -> tuple[torch.Tensor, torch.Tensor]:
            first, second = self._factors(list(range(len(self.lefts))))  # (T, n, r), (T, r, m)
            return first.permute(1, 0, 2).reshape(first.shape[1], -1).contiguous(), second.reshape(-1, second.shape[-1])

        return kept(self, "_stacked_factors", tensor_key(self.lefts, self.rights), stack)

    def _add_dense(self, out: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Soft routing: all tasks' rank-r products at once, each row's share of task t scaled by its weight
        there (two matrix products and a scale, whatever the number of tasks)."""
        first, second = self._stacked()
        rank = first.shape[1] // route.weights.shape[1]
        scale = route.weights.to(x.dtype).repeat_interleave(rank, dim=1)  # (batch, T*r)
        flat_x = x.reshape(-1, x.shape[-1])
        low = (flat_x @ first).view(x.shape[0], -1, first.shape[1]) * scale.unsqueeze(1)
        flat_out = out.view(-1, out.shape[-1])
        flat_out.addmm_(low.view(-1, first.shape[1]), second)
        if self.bias_deltas is not None:
            bias = route.weights.to(out.dtype) @ self.bias_deltas  # (batch, m)
            out += bias.view(x.shape[0], *([1] * (out.dim() - 2)), -1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is not None and route.lanes is not None:
            return self._on_lanes(x, route.lanes)
        if self.keep_task_weights and route is not None and route.spans is not None and x.shape[0] == route.batch:
            return self._on_task_weights(x, route)
        out = self.shared(x)
        if route is None:
            return out
        if route.spans is not None and x.shape[0] == route.batch and out.is_contiguous():
            return self._add_on_slices(out, x, route)
        if route.dense() and x.shape[0] == route.batch and out.is_contiguous():
            return self._add_dense(out, x, route)
        if x.is_cuda and route.one_task_per_row and len(route.groups) > 1 and x.shape[0] == route.batch \
                and route.packs_well():  # launch-bound on a GPU: a few batched calls instead of several per task
            return self._packed_add(out, x, route)
        return add_routed(out, x, route, self._update)

    def _on_lanes(self, x: torch.Tensor, lanes: Lanes) -> torch.Tensor:
        """Features laid out as lanes (..., T * n), e.g. a conv net's pooled features: each lane through its task's
        weight (kept weights, or the shared layer plus its factors), one batched product for all lanes."""
        if type(self) is not RoutedLinear:
            raise NotImplementedError(f"{type(self).__name__} does not run on task lanes")
        per_lane = x.reshape(-1, lanes.count, x.shape[-1] // lanes.count).transpose(0, 1)  # (lanes, rows, n)
        if self.keep_task_weights:
            weights, biases = self.per_task_weights()
            operand = weights.transpose(1, 2)
            y = torch.bmm(per_lane, operand) if biases is None else torch.baddbmm(biases.unsqueeze(1), per_lane, operand)
        else:
            first, second = self._factors(list(range(lanes.count)))
            y = torch.baddbmm(F.linear(per_lane, self.shared.weight, self.shared.bias), torch.bmm(per_lane, first), second)
            if self.bias_deltas is not None:
                y += self.bias_deltas.unsqueeze(1)
        return y.transpose(0, 1).reshape(*x.shape[:-1], -1)

    def _add_on_slices(self, out: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Rows grouped by task: each task's update is accumulated straight into its slice of the output by
        the second matrix product (no gathered copies, no separate update tensor)."""
        flat_out, flat_x = out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1])
        per_row = flat_out.shape[0] // route.batch
        for task, start, end in route.spans:
            first, second = self._pair(task)
            rows = slice(start * per_row, end * per_row)
            flat_out[rows].addmm_(flat_x[rows] @ first, second)
            if self.bias_deltas is not None:
                flat_out[rows] += self.bias_deltas[task]
        return out

    def _packed_add(self, out: torch.Tensor, x: torch.Tensor, route: Route) -> torch.Tensor:
        """One task per row: every task's rows laid side by side (padded to the largest group) and updated by two
        batched matrix products, a handful of kernel calls whatever the number of tasks."""
        tasks, size, gather, slots, rows = route.packed()
        first, second = self._factors(tasks)
        packed = x.index_select(0, gather).reshape(len(tasks), -1, x.shape[-1])
        low = torch.bmm(packed, first)
        if self.bias_deltas is None:
            update = torch.bmm(low, second)
        else:
            update = torch.baddbmm(self.bias_deltas[tasks].unsqueeze(1), low, second)
        update = update.view(len(tasks) * size, *x.shape[1:-1], second.shape[-1])
        return out.index_add_(0, rows, update.index_select(0, slots))


class RoutedConv1D(RoutedLinear):
    """transformers' Conv1D (GPT-2; weight stored (n, m)): the delta of the stored weight is L_t (n, r) R_t (r, m),
    so the update is (x L_t) R_t."""

    def _update(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return _low_rank(x, self.lefts[task], self.rights[task], None if self.bias_deltas is None else self.bias_deltas[task])

    def _factors(self, tasks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lefts[tasks], self.rights[tasks]

    def _pair(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lefts[task], self.rights[task]

    def _task_operand(self, weights: torch.Tensor, task: int) -> torch.Tensor:
        return weights[task]  # stored (n, m): x @ W


# Above this many multiply-adds per task group a convolution call is compute-bound, and one call per task beats
# a grouped convolution (which oneDNN runs about half as fast); below it, call overhead dominates and one grouped
# call for all tasks is faster.
PER_TASK_MACS = 5e7
# At this many output positions a row or fewer (the last stages of a small ResNet), top-1 rows of a small layer
# take the soft path with one-hot weights: one convolution for the whole batch with the shared filters and every
# R_t (T*r extra channels, allowed up to the layer's own count), where the grouped call would spend its time
# packing rows. The quality suite's ResNet on the CPU (8 tasks, rank 0.1, batch 256): the whole model 8-12 %
# faster than with grouped calls in those layers; at 16 positions and more the grouped call wins. On task lanes
# the same bound picks the batched matrix products over grouped calls (a 4x4 map lost: 1.58x against 1.37x).
FEW_POSITIONS = 4


def single_tap(conv: torch.nn.Conv2d, height: int, width: int) -> tuple[int, int] | None:
    """The kernel tap through which every output position reads the input, when there is one: a 1x1 kernel
    without padding (on the input taken at the stride), or any kernel on a 1x1 map whose padding leaves a single
    tap over the input and one output position. None otherwise."""
    if not isinstance(conv.padding, tuple):
        return None
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        return 0, 0
    if (height, width) != (1, 1):
        return None
    tap = []
    for size, pad, dilation, stride in zip(conv.kernel_size, conv.padding, conv.dilation, conv.stride):
        outputs = (1 + 2 * pad - dilation * (size - 1) - 1) // stride + 1
        if outputs != 1 or pad % dilation or pad // dilation >= size:
            return None
        tap.append(pad // dilation)
    return tap[0], tap[1]


class RoutedConv2d(RoutedLinear):
    """nn.Conv2d (groups 1): the delta viewed (out, in*kh*kw) is L_t R_t, i.e. a rank-r convolution (R_t as r
    filters of the same size and stride) followed by a 1x1 projection (L_t).

    Small rank-r convolutions run far below a CPU's or GPU's peak, so when every row has a single task (top-1
    routing) each task's filters W + L_t R_t serve its rows in one convolution: the same work as the shared
    layer. Those filters depend on the task alone, so they are formed once and kept (`keep_filters`; T copies of
    the layer's filters, small for convolutions, which spend their time on activations). When a batch norm alone
    reads this conv's output (`norm_after`, linked by the runtime from the fx graph), top-1 rows get it folded
    into their task's filters and the norm passes them through. Rows that mix several tasks take the factor
    path."""

    keep_filters = True
    norm_after: tuple["RoutedBatchNorm2d", ...] = ()  # the batch norm that alone reads this conv's output (folded)

    def _folds(self, route: Route) -> bool:
        return bool(self.norm_after) and folds_norm(route)

    def _update(self, x: torch.Tensor, task: int) -> torch.Tensor:
        conv = self.shared
        filters = self.rights[task].view(-1, *conv.weight.shape[1:])
        low = F.conv2d(x, filters, None, conv.stride, conv.padding, conv.dilation)
        out = torch.matmul(self.lefts[task], low.flatten(2)).view(low.shape[0], -1, *low.shape[2:])
        return out if self.bias_deltas is None else out + self.bias_deltas[task].view(1, -1, 1, 1)

    def _filter_layout(self, flat: torch.Tensor) -> torch.Tensor:
        """(T or 1, out, in*kh*kw) -> (T or 1, out, in, kh, kw), each task's filters channels-last on the CPU: oneDNN
        then runs the whole net channels-last, its fastest layout there (a batch of one task on the quality
        suite's ResNet: 0.70x the shared model's time, 1.05x with plain filters), and the stack, viewed
        (T*out, in, kh, kw), is the grouped weight of task lanes as it is."""
        stacked = flat.reshape(-1, *self.shared.weight.shape[1:])
        layout = torch.channels_last if flat.device.type == "cpu" else torch.contiguous_format
        return stacked.contiguous(memory_format=layout).view(flat.shape[0], *self.shared.weight.shape)

    def task_filters(self) -> torch.Tensor:
        """(T, out, in, kh, kw): every task's filters W + L_t R_t (kept between calls when `keep_filters`)."""
        return kept(self, "_filters", tensor_key(self.shared.weight, self.lefts, self.rights),
                    lambda: self._filter_layout(self._formed_task_weights()), self.keep_filters)

    def folded_filters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per task, the filters and bias with the following batch norm folded in: (T, out, in, kh, kw), (T, out),
        kept (`keep_filters`). Mixed top-1 batches use only these; the plain per-task filters are formed (and
        kept too) only if a batch routed wholly to one task comes along."""
        norm = self.norm_after[0]

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            scale, shift = norm.task_scale_shift()
            bias = self.task_biases()
            bias = torch.zeros_like(shift) if bias is None else bias
            return self._filter_layout(self._formed_task_weights() * scale.unsqueeze(-1)), bias * scale + shift

        key = tensor_key(self.shared.weight, self.shared.bias, self.lefts, self.rights, self.bias_deltas) + norm.state_key()
        return kept(self, "_folded_filters", key, fold, self.keep_filters)

    def _task_conv(self, x: torch.Tensor, mix: list[tuple[int, float]], fold: bool = False) -> torch.Tensor:
        """The whole input through one task's filters, or one mix's (`fold`: with the batch norm after this conv
        folded in, for that task or mix)."""
        conv = self.shared
        one_task = len(mix) == 1 and mix[0][1] == 1.0
        if fold and one_task:
            filters, biases = self.folded_filters()
            weight, bias = filters[mix[0][0]], biases[mix[0][0]]
        elif one_task:  # its kept filters
            task = mix[0][0]
            weight, biases = self.task_filters()[task], self.task_biases()
            bias = None if biases is None else biases[task]
        else:  # a mix: its filters formed once and kept while batches keep that mix
            key = tensor_key(conv.weight, conv.bias, self.lefts, self.rights, self.bias_deltas) + (tuple(mix), fold)
            if fold:
                key += self.norm_after[0].state_key()
            weight, bias = kept(self, "_mix_filters", key, lambda: self._mixed_filters(mix, fold), self.keep_filters)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)

    def _mixed_filters(self, mix: list[tuple[int, float]], fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W + sum_t w_t L_t R_t and the bias with the same mix of bias deltas; `fold`: times the mix's batch-norm
        scale, plus its shift."""
        conv = self.shared
        weight = conv.weight.reshape(conv.weight.shape[0], -1)
        bias = conv.bias
        for task, w in mix:
            weight = torch.addmm(weight, self.lefts[task], self.rights[task], alpha=w)
            if self.bias_deltas is not None:
                bias = self.bias_deltas[task] * w if bias is None else bias + w * self.bias_deltas[task]
        if fold:
            scale, shift = self.norm_after[0].mix_scale_shift(mix)
            weight = weight * scale.unsqueeze(-1)
            bias = shift if bias is None else bias * scale + shift
        return self._filter_layout(weight.unsqueeze(0))[0], bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route is None:
            return self.shared(x)
        if route.lanes is not None:
            return self._on_lanes(x, route.lanes)
        if route.batch != x.shape[0]:
            raise ValueError(f"router weights for {route.batch} rows, input has {x.shape[0]}")
        if route.uniform:
            return self._task_conv(x, [(task, w) for task, _, w in route.groups], self._folds(route))
        if route.dense():
            return self._dense_conv(x, route)
        if not route.one_task_per_row:
            return add_routed(self.shared(x), x, route, self._update)
        conv = self.shared
        positions = (x.shape[-2] // conv.stride[0]) * (x.shape[-1] // conv.stride[1])
        macs = x.shape[0] / len(route.groups) * conv.weight.numel() * positions
        if len(route.groups) == 1 or (macs > PER_TASK_MACS and not x.is_cuda):
            return self._per_task(x, route)  # on a GPU one grouped call beats T launches
        if positions <= FEW_POSITIONS and self.rights.shape[0] * self.rights.shape[1] <= conv.out_channels \
                and not x.is_cuda:  # measured on CPUs only
            return self._dense_conv(x, route)  # the soft path with one-hot weights: no batch split
        if not route.packs_well():  # one task holds most rows: padding every task to it would multiply the work
            return self._per_task(x, route)
        return self._grouped(x, route)

    def lane_filters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Filters (T * out, in, kh, kw), channels-last, and bias for one grouped convolution over the task lanes
        (group t: task t's filters, with the batch norm after this conv folded in when there is one): a view of
        the kept per-task filters on the CPU, a kept copy elsewhere."""
        conv = self.shared
        if self.norm_after:
            filters, biases = self.folded_filters()
        else:
            filters, biases = self.task_filters(), self.task_biases()

        def form() -> tuple[torch.Tensor, torch.Tensor | None]:
            grouped = filters.view(-1, *conv.weight.shape[1:]).contiguous(memory_format=torch.channels_last)
            return grouped, None if biases is None else biases.reshape(-1)

        return kept(self, "_lane_filters", tensor_key(filters, biases), form, self.keep_filters)

    def _on_lanes(self, x: torch.Tensor, lanes: Lanes) -> torch.Tensor:
        """Task lanes side by side in the channels: one grouped convolution, lane t with task t's filters; on maps
        of at most FEW_POSITIONS positions one batched matrix product instead (per position when each output
        reads one kernel tap, else over the whole flattened map)."""
        conv = self.shared
        filters, bias = self.lane_filters()
        if x.dim() == 4:
            tap = single_tap(conv, x.shape[-2], x.shape[-1])
            reads = x[:, :, ::conv.stride[0], ::conv.stride[1]] if conv.kernel_size == (1, 1) else x
            if reads.shape[-2] * reads.shape[-1] <= FEW_POSITIONS:
                if tap is not None:
                    return self._lane_matmul(reads, filters, bias, tap, lanes)
                if isinstance(conv.padding, tuple):
                    return self._lane_map_matmul(x, filters, bias, lanes)
        return F.conv2d(x, filters, bias, conv.stride, conv.padding, conv.dilation, lanes.count)

    def _lane_map_matmul(self, x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None,
                         lanes: Lanes) -> torch.Tensor:
        """A convolution on a map of a few positions as the linear map it is: each lane's rows, the whole map
        flattened, times its task's (positions * in, output positions * out) matrix, found once per map size by
        convolving the unit basis. About the convolution's own work on maps of at most 4 positions, in one
        batched product instead of a grouped call that runs far below its peak there."""
        conv = self.shared
        size, _, height, width = x.shape

        def maps() -> tuple[torch.Tensor, torch.Tensor | None]:
            channels = filters.shape[1]
            basis = torch.eye(height * width * channels, dtype=filters.dtype, device=filters.device)
            basis = basis.view(-1, height, width, channels).permute(0, 3, 1, 2)  # unit maps in (H, W, C) order
            per_task = [F.conv2d(basis, task_filters, None, conv.stride, conv.padding, conv.dilation)
                        for task_filters in filters.split(len(filters) // lanes.count)]
            out_height, out_width = per_task[0].shape[-2:]
            matrix = torch.stack([m.permute(0, 2, 3, 1).reshape(len(basis), -1) for m in per_task])
            lane_bias = None if bias is None else \
                bias.view(lanes.count, 1, 1, -1).expand(-1, 1, out_height * out_width, -1).reshape(lanes.count, 1, -1)
            return matrix, lane_bias, (out_height, out_width)

        matrix, lane_bias, (out_height, out_width) = kept(self, "_lane_maps", tensor_key(filters, bias) + (height, width),
                                                          maps, self.keep_filters)
        rows = x.permute(0, 2, 3, 1).reshape(size, height * width, lanes.count, -1).permute(2, 0, 1, 3)
        rows = rows.reshape(lanes.count, size, -1)  # (lanes, rows, H * W * in)
        y = torch.bmm(rows, matrix) if lane_bias is None else torch.baddbmm(lane_bias, rows, matrix)
        y = y.view(lanes.count, size, out_height, out_width, -1).permute(1, 2, 3, 0, 4)
        return y.reshape(size, out_height, out_width, -1).permute(0, 3, 1, 2)

    def _lane_matmul(self, x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, tap: tuple[int, int],
                     lanes: Lanes) -> torch.Tensor:
        """A convolution that reads one tap per output position, on the lanes of a small map: each lane's rows
        (every position) times its task's tap matrix in one batched product; the result comes out channels-last,
        as the grouped convolutions take it. On maps of a few positions oneDNN's grouped calls run at a third of
        this speed."""
        def taps() -> tuple[torch.Tensor, torch.Tensor | None]:
            matrix = filters[:, :, tap[0], tap[1]].reshape(lanes.count, -1, filters.shape[1]).transpose(1, 2)
            return matrix.contiguous(), None if bias is None else bias.view(lanes.count, 1, -1)

        matrix, lane_bias = kept(self, "_lane_taps", tensor_key(filters) + (tap,), taps, self.keep_filters)
        size, _, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, lanes.count, matrix.shape[1]).transpose(0, 1)  # (lanes, rows, in)
        y = torch.bmm(rows, matrix) if lane_bias is None else torch.baddbmm(lane_bias, rows, matrix)
        return y.transpose(0, 1).reshape(size, height, width, -1).permute(0, 3, 1, 2)

    def stacked_filters(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """For _dense_conv, formed once and kept (`keep_filters`): the shared filters followed by every task's R_t
        filters (out + T*r, in, kh, kw), their bias (the shared bias, zero for the R_t channels), and every task's
        L_t side by side as a 1x1 projection (out, T*r, 1, 1); channels-last on the CPU, where oneDNN runs them
        faster whatever the input's layout (soft routing on the quality suite's ResNet: 2.39x -> 1.65-1.70x)."""
        conv = self.shared

        def stack() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
            tasks, rank = self.rights.shape[:2]
            filters = torch.cat([conv.weight, self.rights.reshape(tasks * rank, *conv.weight.shape[1:]).to(conv.weight.dtype)])
            bias = None if conv.bias is None else F.pad(conv.bias, (0, tasks * rank))
            projection = self.lefts.permute(1, 0, 2).reshape(self.lefts.shape[1], tasks * rank, 1, 1)
            layout = torch.channels_last if filters.device.type == "cpu" else torch.contiguous_format
            return filters.contiguous(memory_format=layout), bias, \
                projection.to(conv.weight.dtype).contiguous(memory_format=layout)

        key = tensor_key(conv.weight, conv.bias, self.lefts, self.rights)
        return kept(self, "_stacked_filters", key, stack, self.keep_filters)

    def _dense_conv(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """Soft routing: one convolution with the shared filters and every task's R_t side by side (the shared
        output and all rank-r maps at once), each row's maps of task t scaled by its weight there, then one 1x1
        projection with every task's L_t added to the shared output: two convolution calls whatever the number of
        tasks, and no rank-(T*r) convolution on its own (which runs far below the kernel's peak). Also taken by
        top-1 rows on small maps (FEW_POSITIONS), which then get the folded batch norm here."""
        conv = self.shared
        filters, bias, projection = self.stacked_filters()
        both = F.conv2d(x, filters, bias, conv.stride, conv.padding, conv.dilation)
        rank = self.rights.shape[1]
        scale = route.weights.to(both.dtype).repeat_interleave(rank, dim=1)[:, :, None, None]
        out = F.conv2d(both[:, conv.out_channels:] * scale, projection).add_(both[:, :conv.out_channels])
        if self.bias_deltas is not None:
            out += (route.weights.to(out.dtype) @ self.bias_deltas)[:, :, None, None]
        if self._folds(route):  # top-1 rows: the batch norm after this conv, each row's task's
            scale, shift = self.norm_after[0].task_scale_shift()
            task = route.task_of_row()
            out = torch.addcmul(shift[task][:, :, None, None], out, scale[task][:, :, None, None])
        return out

    def _per_task(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        fold = self._folds(route)
        if route.spans is not None:
            return torch.cat([self._task_conv(x[start:end], [(task, 1.0)], fold) for task, start, end in route.spans])
        out = None
        for task, rows, _ in route.groups:
            part = self._task_conv(x.index_select(0, rows), [(task, 1.0)], fold)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out

    def _grouped(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        """One grouped convolution for all tasks: each task's rows (padded to the largest group) become one group
        of channels, with that task's filters W + L_t R_t."""
        conv = self.shared
        tasks, size, gather, slots, rows = route.packed()
        groups = len(tasks)
        if self._folds(route):
            filters, bias = (t[tasks] for t in self.folded_filters())
        else:
            filters, bias = self.task_filters()[tasks], self.task_biases()
            bias = None if bias is None else bias[tasks]
        packed = x.index_select(0, gather).view(groups, size, *x.shape[1:]).transpose(0, 1)
        packed = packed.reshape(size, groups * x.shape[1], *x.shape[2:])
        y = F.conv2d(packed, filters.reshape(-1, *conv.weight.shape[1:]), None if bias is None else bias.reshape(-1),
                     conv.stride, conv.padding, conv.dilation, groups)
        y = y.view(size, groups, -1, *y.shape[2:]).transpose(0, 1).reshape(groups * size, -1, *y.shape[2:])
        out = y.new_empty((x.shape[0], *y.shape[1:]))
        return out.index_copy_(0, rows, y.index_select(0, slots))


class RoutedEmbedding(RoutedLinear):
    """nn.Embedding (weight (V, d)): row i of the delta is L_t[i] R_t, so the update is L_t[ids] R_t."""

    def _update(self, ids: torch.Tensor, task: int) -> torch.Tensor:
        return F.embedding(ids, self.lefts[task]) @ self.rights[task]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.shared(ids)
        return out if self.route is None else add_routed(out, ids, self.route, self._update)


class RoutedLayerNorm(Routed):
    """nn.LayerNorm: normalise once, then per-row gain and bias (the shared ones plus the routed deltas)."""

    def __init__(self, shared: torch.nn.LayerNorm, weight_deltas: torch.Tensor | None,
                 bias_deltas: torch.Tensor | None) -> None:
        super().__init__(shared)
        self.register_buffer("weight_deltas", weight_deltas)  # (T, d)
        self.register_buffer("bias_deltas", bias_deltas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.shared(x)
        norm = self.shared
        y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
        shape = (x.shape[0], *([1] * (x.dim() - 2)), -1)
        weight = norm.weight if self.weight_deltas is None else row_params(norm.weight, self.weight_deltas, self.route)
        bias = norm.bias if self.bias_deltas is None else row_params(norm.bias, self.bias_deltas, self.route)
        weight = weight.view(shape) if weight.dim() == 2 else weight
        if bias is None:
            return y * weight
        return torch.addcmul(bias.view(shape) if bias.dim() == 2 else bias, y, weight)


class RoutedRMSNorm(Routed):
    """RMS norms (torch.nn.RMSNorm and the transformers families' own, plain or with a 1 + weight gain): the
    output is linear in the gain, so a row's update is normed(x) * (route @ weight deltas)."""

    def __init__(self, shared: torch.nn.Module, weight_deltas: torch.Tensor) -> None:
        super().__init__(shared)
        self.register_buffer("weight_deltas", weight_deltas)  # (T, d)
        eps = getattr(shared, "variance_epsilon", None) or getattr(shared, "eps", None)
        self.eps = float(eps) if eps is not None else float(torch.finfo(torch.float32).eps)

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


def _scale_shift(values: dict[str, torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm's weight, bias and running statistics as one scale and shift per channel."""
    scale = values["weight"] / torch.sqrt(values["running_var"] + eps)
    return scale, values["bias"] - values["running_mean"] * scale


class RoutedBatchNorm2d(Routed):
    """nn.BatchNorm2d in eval mode: each row gets its own statistics, gain and bias, folded into one scale and
    shift per channel."""

    NAMES = ("weight", "bias", "running_mean", "running_var")
    folded = False  # set when the conv before it applies it (top-1 rows and fixed mixes)

    def __init__(self, shared: torch.nn.BatchNorm2d, deltas: dict[str, torch.Tensor]) -> None:
        super().__init__(shared)
        for name in self.NAMES:
            self.register_buffer(f"{name}_deltas", deltas.get(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.shared(x)
        if self.shared.training:
            raise RuntimeError("routed batch norm runs in eval mode only (per-row statistics)")
        if self.folded and folds_norm(self.route):
            return x  # the conv before it already applied each row's task norm
        norm = self.shared
        if self.route.lanes is not None:  # each lane's channels: its task's folded norm
            scale, shift = (t.reshape(-1, 1, 1) for t in self.task_scale_shift())
            return torch.addcmul(shift, x, scale)
        if self.route.uniform and norm.affine:  # one mix for the batch: its norm, formed once
            scale, shift = self.mix_scale_shift([(task, w) for task, _, w in self.route.groups])
            return torch.addcmul(shift[:, None, None], x, scale[:, None, None])
        if self.route.one_task_per_row and norm.affine:  # each row: its task's folded norm
            scale, shift = self.task_scale_shift()
            task = self.route.task_of_row()
            return torch.addcmul(shift[task][:, :, None, None], x, scale[task][:, :, None, None])
        rows = {}
        for name in self.NAMES:
            base, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
            rows[name] = base.unsqueeze(0).expand(x.shape[0], -1) if deltas is None else row_params(base, deltas, self.route)
        scale, shift = _scale_shift(rows, norm.eps)
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])

    def state_key(self) -> tuple:
        norm = self.shared
        return tensor_key(norm.weight, norm.bias, norm.running_mean, norm.running_var,
                          *(getattr(self, f"{name}_deltas") for name in self.NAMES))

    def mix_scale_shift(self, mix: list[tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) scale and shift of the norm whose parameters are the shared ones plus sum_t w_t of the deltas (as
        each row of a soft route gets), kept for the last mix seen."""
        norm = self.shared

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            values = {}
            for name in self.NAMES:
                value, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
                for task, w in mix if deltas is not None else ():
                    value = value + w * deltas[task]
                values[name] = value
            return _scale_shift(values, norm.eps)

        return kept(self, "_mix_folded", self.state_key() + (tuple(mix),), fold)

    def task_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per task (T, C): the norm folded into one scale and shift, formed once and kept."""
        norm = self.shared

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            tasks = next(d for d in (getattr(self, f"{n}_deltas") for n in self.NAMES) if d is not None).shape[0]
            values = {}
            for name in self.NAMES:
                base, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
                values[name] = base.unsqueeze(0).expand(tasks, -1) if deltas is None else base + deltas
            return _scale_shift(values, norm.eps)

        return kept(self, "_folded", self.state_key(), fold)


def folds_norm(route: Route | None) -> bool:
    """Rows of one task each, or one mix for the whole batch: a conv serves the rows with their task's or the
    mix's filters, and can apply the batch norm that follows it in the same call."""
    return route is not None and (route.one_task_per_row or route.uniform)


def fold_norms(model: torch.nn.Module, pairs: dict[str, str]) -> int:
    """Let each routed conv apply the routed batch norm that alone reads its output (`pairs`: conv name -> norm
    name), for top-1 rows and fixed mixes; returns how many were linked."""
    linked = 0
    for conv_name, norm_name in pairs.items():
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        if isinstance(conv, RoutedConv2d) and isinstance(norm, RoutedBatchNorm2d) and norm.shared.affine \
                and norm.shared.track_running_stats and conv.shared.out_channels == norm.shared.num_features:
            conv.norm_after = (norm,)  # a tuple: not registered as a child module
            norm.folded = True
            linked += 1
    return linked


def keep_task_weights(model: torch.nn.Module, budget_bytes: int) -> tuple[int, int]:
    """Let the smallest routed linear layers keep every task's own weight for top-1 rows (see RoutedLinear),
    smallest first while the kept copies fit `budget_bytes`: small layers gain most (their thin factor products
    are all call overhead), large ones cost most memory. Returns (layers, bytes) chosen; 0 turns it off."""
    layers = sorted((m for m in model.modules() if type(m) in (RoutedLinear, RoutedConv1D)),
                    key=lambda m: m.shared.weight.numel())
    chosen, used = 0, 0
    for layer in layers:
        layer.keep_task_weights = False
        size = len(layer.lefts) * layer.shared.weight.numel() * layer.shared.weight.element_size()
        if used + size <= budget_bytes:
            layer.keep_task_weights = True
            chosen, used = chosen + 1, used + size
    return chosen, used


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
