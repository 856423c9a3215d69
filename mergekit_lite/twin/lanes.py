"""Task lanes: a top-1 batch of a convolutional net laid out so the whole model runs once for all tasks.

Lane t holds task t's rows, every lane padded to the largest task's count (with copies of row 0, whose outputs
are dropped); the lanes are laid side by side along the channel axis, so a (batch, C, H, W) input becomes
(lane size, T * C, H, W). Every routed conv then runs as one grouped convolution (group t: task t's filters),
batch norms and linear heads act per lane, and elementwise layers, pooling and residual sums need no change. The
batch is split and joined once for the whole model instead of in every layer. Lanes always follow the task
order, absent tasks included, so the grouped filters are formed once and serve every batch (a layout that
changes from batch to batch would copy every filter of a large model per batch). The runtime checks on a real
batch that a model gives the same outputs this way before it uses it (a layer that mixes channels in other
ways would not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Lanes are not used when padding would make the packed batch more than this many times the real one. On the
# quality suite's ResNet (8 tasks) the per-layer path takes 2.2-2.5x the shared model's time on batches of 16 to
# 128 rows and lanes 0.97-1.25x at padding 1.6-2.0.
MAX_PADDING = 2.0


@dataclass(frozen=True)
class Lanes:
    """Where each row goes: lane t holds task t's rows, `size` rows a lane."""

    count: int  # lanes = tasks
    size: int
    gather: torch.Tensor  # (count * size,): the input row in each lane slot (padding slots take row 0)
    where: torch.Tensor  # (batch,): each input row's lane slot


def lane_size(counts: list[int]) -> int | None:
    """Rows a lane for a batch with `counts[t]` rows of task t, or None when lanes do not pay: fewer than two
    tasks present, or padding beyond MAX_PADDING."""
    if sum(1 for n in counts if n) < 2:
        return None
    size = max(counts)
    return size if len(counts) * size <= MAX_PADDING * sum(counts) else None


def split_tasks(counts: list[int], most_alone: int = 2) -> tuple[list[int], int | None] | None:
    """For a batch that lanes cannot pad within MAX_PADDING because a few tasks hold most rows: (the tasks to
    run on their own, largest first, at most `most_alone`; the lane size for the other rows, None when at most
    one task is left, which then runs on its own too). None when that does not make the rest fit."""
    rest, alone = list(counts), []
    while True:
        present = [task for task, n in enumerate(rest) if n]
        if len(present) < 2:
            return alone + present, None
        size = lane_size(rest)
        if size is not None:
            return alone, size
        if len(alone) == most_alone:
            return None
        largest = max(present, key=lambda task: rest[task])
        alone.append(largest)
        rest[largest] = 0


def lay_out(task_of_row: torch.Tensor, tasks: int, size: int) -> Lanes:
    """The gather and scatter indices that put task t's rows, in their order, into lane t."""
    device = task_of_row.device
    order = torch.argsort(task_of_row, stable=True)
    by_task = task_of_row.index_select(0, order)
    counts = torch.bincount(task_of_row, minlength=tasks)
    first_row = torch.cumsum(counts, 0) - counts  # where each task's rows start in `order`
    slot = by_task * size + torch.arange(len(order), device=device) - first_row[by_task]
    gather = torch.zeros(tasks * size, dtype=torch.long, device=device).index_copy_(0, slot, order)
    where = torch.empty_like(order).index_copy_(0, order, slot)
    return Lanes(tasks, size, gather, where)


def pack(x: torch.Tensor, lanes: Lanes) -> torch.Tensor:
    """(batch, C, *spatial) -> (size, lanes * C, *spatial), lane i's rows in channels i*C .. (i+1)*C; images come
    out channels-last, where CPU grouped convolutions run as fast as the shared model's."""
    rows = x.index_select(0, lanes.gather).view(lanes.count, lanes.size, *x.shape[1:])
    if x.dim() == 4:  # (lanes, size, C, H, W) -> memory (size, H, W, lanes, C): channels-last (size, lanes*C, H, W)
        return rows.permute(1, 3, 4, 0, 2).reshape(lanes.size, x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)
    return rows.transpose(0, 1).reshape(lanes.size, -1, *x.shape[2:])


def unpack(y: torch.Tensor, lanes: Lanes) -> torch.Tensor:
    """The inverse of pack for a model's output (size, lanes * K, ...): (batch, K, ...) in the input's row order."""
    if y.dim() < 2 or y.shape[0] != lanes.size or y.shape[1] % lanes.count:
        raise ValueError(f"output of shape {tuple(y.shape)} does not hold {lanes.count} lanes of {lanes.size} rows")
    per_lane = y.reshape(lanes.size, lanes.count, -1, *y.shape[2:]).transpose(0, 1)
    return per_lane.reshape(lanes.count * lanes.size, *per_lane.shape[2:]).index_select(0, lanes.where)
