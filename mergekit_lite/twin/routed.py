"""Routed linear layers: nn.Linear, transformers' Conv1D and nn.Embedding with each task's low-rank delta
(see route.py for how rows find their tasks), and the per-task weights kept for top-1 rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergekit_lite.twin.lanes import Lanes
from mergekit_lite.twin.route import Route, Routed, add_routed, kept, tensor_key


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


class RoutedEmbedding(RoutedLinear):
    """nn.Embedding (weight (V, d)): row i of the delta is L_t[i] R_t, so the update is L_t[ids] R_t."""

    def _update(self, ids: torch.Tensor, task: int) -> torch.Tensor:
        return F.embedding(ids, self.lefts[task]) @ self.rights[task]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.shared(ids)
        return out if self.route is None else add_routed(out, ids, self.route, self._update)


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
