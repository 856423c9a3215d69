"""End-to-end tuning of a merged model toward the two source models' combined outputs.

Least squares fits each layer alone, from the sources' own inputs of that layer; the merged model's inputs
drift from those with depth, and the errors compound. The merge's aim is still one function: the output
layout's target, i.e. the mean of both models' logits when they predict the same classes, or both side by
side when they do not. A few hundred Adam steps on the whole merged model, minimising the squared gap between
its outputs and that target on the merge's own inputs, close much of what the layer-wise fit leaves. No labels
are needed, so it works on data-free inputs as well, where it matters most (RESULTS.md, experiment 3).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from mergekit_lite.pipeline import Progress
from mergekit_lite.pleas.graph import output_tensor
from mergekit_lite.pleas.matching import Layout

CACHE_BYTES = 256 * 2**20  # targets of all batches are kept when they fit in this; else recomputed per step


def output_target(out_a: torch.Tensor, out_b: torch.Tensor, head: Layout) -> torch.Tensor:
    """The merged model's intended output: the two outputs combined along the last axis by the head's layout
    (matched outputs averaged, private ones side by side)."""
    return head.combine(out_a, out_b, out_a.dim() - 1)


def relative_gap(model: torch.nn.Module, batches: list[torch.Tensor],
                 target_of: Callable[[int], torch.Tensor]) -> float:
    """sum ||f(x) - target||^2 / sum ||target||^2 over the batches."""
    gap = norm = 0.0
    with torch.no_grad():
        for index, batch in enumerate(batches):
            target = target_of(index)
            gap += float((output_tensor(model(batch)) - target).double().pow(2).sum())
            norm += float(target.double().pow(2).sum())
    return gap / max(norm, 1e-30)


def tune_outputs(model: torch.nn.Module, model_a: torch.nn.Module, model_b: torch.nn.Module,
                 batches: list[torch.Tensor], head: Layout, steps: int, lr: float, seed: int = 0,
                 log: Callable[[str], None] = lambda message: None, progress: Progress | None = None) -> dict:
    """Adam on every parameter of `model` (in eval mode: batch-norm statistics stay as re-estimated) for
    `steps` steps, a batch at a time in a seeded random order, toward `output_target`. Returns the relative
    output gap before and after, for the report."""
    started = time.perf_counter()
    model.eval()

    def compute_target(index: int) -> torch.Tensor:
        with torch.no_grad():
            return output_target(output_tensor(model_a(batches[index])), output_tensor(model_b(batches[index])), head)

    first = compute_target(0)
    cached: list[torch.Tensor] | None = None
    if first.numel() * first.element_size() * len(batches) <= CACHE_BYTES:
        cached = [first] + [compute_target(i) for i in range(1, len(batches))]
    target_of = (lambda i: cached[i]) if cached is not None else compute_target  # noqa: E731

    before = relative_gap(model, batches, target_of)
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    wanted = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    log(f"tuning: {steps} Adam steps, each a forward and backward pass of the merged model on one batch")
    if progress is not None:
        progress.start(steps, 0, "tuning toward the combined outputs (Adam steps)")
    for step in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        index = order.pop()
        loss = (output_tensor(model(batches[index])) - target_of(index)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.advance(0)
        if (step + 1) % 100 == 0:
            log(f"tuning step {step + 1}/{steps}: output loss {float(loss.detach()):.4g}")
    if progress is not None:
        progress.stop()
    for p, flag in zip(parameters, wanted):
        p.requires_grad_(flag)
        p.grad = None
    after = relative_gap(model, batches, target_of)
    log(f"tuned {steps} steps: relative output gap {before:.4f} -> {after:.4f}")
    return {"steps": steps, "lr": lr, "output_gap_before": before, "output_gap_after": after,
            "seconds": time.perf_counter() - started}
