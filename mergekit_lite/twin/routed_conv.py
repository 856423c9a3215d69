"""Routed 2-D convolutions: the delta as a rank-r convolution and a 1x1 projection, run per task group, on
task lanes or as batched products on small maps; each task's filters kept for top-1 rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergekit_lite.twin.lanes import Lanes
from mergekit_lite.twin.policy import DEFAULT_POLICY, RuntimePolicy
from mergekit_lite.twin.route import Route, add_routed, folds_norm, kept, tensor_key
from mergekit_lite.twin.routed import RoutedLinear
from mergekit_lite.twin.routed_norms import RoutedBatchNorm2d


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

    policy: RuntimePolicy = DEFAULT_POLICY  # the CPU cost bounds; TwinModel sets its own

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
        if len(route.groups) == 1 or (macs > self.policy.per_task_macs and not x.is_cuda):
            return self._per_task(x, route)  # on a GPU one grouped call beats T launches
        if positions <= self.policy.few_positions and self.rights.shape[0] * self.rights.shape[1] <= conv.out_channels \
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
        of at most `policy.few_positions` positions one batched matrix product instead (per position when each output
        reads one kernel tap, else over the whole flattened map)."""
        conv = self.shared
        filters, bias = self.lane_filters()
        if x.dim() == 4:
            tap = single_tap(conv, x.shape[-2], x.shape[-1])
            reads = x[:, :, ::conv.stride[0], ::conv.stride[1]] if conv.kernel_size == (1, 1) else x
            if reads.shape[-2] * reads.shape[-1] <= self.policy.few_positions:
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
        top-1 rows on small maps (`policy.few_positions`), which then get the folded batch norm here."""
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
