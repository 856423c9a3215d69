"""The routed runtime's cost heuristics on the CPU, in one object: each bound was measured on this project's
benchmarks (bench/RESULTS.md) and picks between kernels that give the same outputs. A TwinModel holds one
(`twin.policy`); set another to study or tune them without touching module state."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimePolicy:
    # Above this many multiply-adds per task group a convolution call is compute-bound, and one call per task
    # beats a grouped convolution (which oneDNN runs about half as fast); below it, call overhead dominates and
    # one grouped call for all tasks is faster.
    per_task_macs: float = 5e7
    # At this many output positions a row or fewer (the last stages of a small ResNet), top-1 rows of a small
    # layer take the soft path with one-hot weights: one convolution for the whole batch with the shared filters
    # and every R_t (T*r extra channels, allowed up to the layer's own count), where the grouped call would spend
    # its time packing rows. The quality suite's ResNet on the CPU (8 tasks, rank 0.1, batch 256): the whole
    # model 8-12 % faster than with grouped calls in those layers; at 16 positions and more the grouped call
    # wins. On task lanes the same bound picks the batched matrix products over grouped calls (a 4x4 map lost:
    # 1.58x against 1.37x).
    few_positions: int = 4
    # Task lanes are used when each task's rows cost at most this many multiply-adds in the average routed conv;
    # above it every layer's per-task calls run near the kernels' peak and lanes would only add padding. On the
    # CPU (8 tasks): the quality suite's ResNet at 256 rows (3e6 a task) and a ResNet-50 at 32 and 64 px
    # (2.5e7-5e7) gain from lanes; a ResNet-50 at 160 px with 2-4 rows a task (8e7-1.6e8) runs at 1.1-1.2x the
    # shared model without.
    lane_group_macs: float = 6e7
    # Memory (bytes) that TwinModel.load lets small linear layers spend on per-task weights by default: every
    # layer of a small model, the smallest layers of a GPT-2-small-sized one.
    task_weight_budget: int = 256 * 2**20


DEFAULT_POLICY = RuntimePolicy()
