"""Data-free inputs that the models' own batch-norm statistics describe.

Generic noise drives a network's channels far from the ranges it was trained on, so matching and least
squares on it learn little about the real task. A batch-norm layer stores the mean and variance of its input
channels over the training data; optimising the inputs so that every such layer of both models sees those
moments again (as ZeroQ and DeepInversion do for quantisation and distillation) gives inputs whose
activations look like the task's, with no data at all.
"""

from __future__ import annotations

from typing import Callable

import torch

from mergekit_lite.pipeline import Progress


def batch_norm_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


def statistics_loss(models: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Sum over every batch-norm layer of both models of the squared gaps between the batch's channel means
    and standard deviations and the stored ones."""
    terms: list[torch.Tensor] = []

    def hook(module, args, _output):
        inp = args[0]
        dims = [0] + list(range(2, inp.dim()))
        mean, var = inp.mean(dims), inp.var(dims, unbiased=False)
        terms.append((mean - module.running_mean).pow(2).mean()
                     + (var.clamp_min(1e-8).sqrt() - module.running_var.clamp_min(1e-8).sqrt()).pow(2).mean())

    handles = [layer.register_forward_hook(hook) for model in models for layer in batch_norm_layers(model)]
    try:
        for model in models:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(terms).sum()


def statistics_matched(models: list[torch.nn.Module], start: torch.Tensor, steps: int = 200, lr: float = 0.5,
                       batch: int = 256, log: Callable[[str], None] = lambda message: None,
                       progress: Progress | None = None) -> torch.Tensor:
    """Refine `start` (e.g. smooth random images) by Adam on the batch-norm statistics loss, a batch at a time.
    Models stay in eval mode and untouched; only the inputs change. Inputs are in normalised units, so steps of
    up to half a unit per pixel: a tenth of that leaves the statistics far from the stored ones after 200
    steps, and the merge on such inputs is clearly worse (RESULTS.md, experiment 3)."""
    if not any(batch_norm_layers(m) for m in models):
        return start
    out = []
    device = next(models[0].parameters()).device
    if progress is not None:
        progress.start(steps * -(-len(start) // batch), 0, "refining data-free inputs (Adam steps)")
    try:
        for first in range(0, len(start), batch):
            x = start[first: first + batch].to(device).clone().requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            for step in range(steps):
                loss = statistics_loss(models, x)
                (grad,) = torch.autograd.grad(loss, x)
                x.grad = grad
                optimizer.step()
                if progress is not None:
                    progress.advance(0)
            log(f"data-free inputs {first}-{first + len(x)}: statistics loss {float(loss.detach()):.4f}")
            out.append(x.detach().cpu())
    finally:
        if progress is not None:
            progress.stop()
    return torch.cat(out)
