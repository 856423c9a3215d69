"""Sparsification and sign election shared by TIES, DARE, breadcrumbs and DELLA. Pure tensor functions."""

from __future__ import annotations

import hashlib
import math

import torch

from mergekit_lite.methods.base import MergeInputs, MergeOutput

# Below this size an exact kthvalue is cheap; above it a sampled bracket avoids touching most elements twice.
_SMALL = 1 << 20
_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor (k >= 1), without sorting it.

    Large tensors: a random sample brackets the answer, one comparison pass counts the entries above the
    bracket, and an exact kthvalue runs on the few entries inside it. The answer is exact whatever the
    sample; a bracket that misses falls back to kthvalue on the whole tensor.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if n <= _SMALL:
        return torch.kthvalue(values, n - k + 1).values
    gen = torch.Generator(device=values.device).manual_seed(n * 31 + k)
    sample = values[torch.randint(0, n, (_SAMPLE,), device=values.device, generator=gen)]
    fraction_below = 1 - k / n
    spread = 4 * math.sqrt(max(fraction_below * (1 - fraction_below), 1 / _SAMPLE) / _SAMPLE) + 2 / _SAMPLE
    lo_rank = max(1, int((fraction_below - spread) * _SAMPLE))
    hi_rank = min(_SAMPLE, int((fraction_below + spread) * _SAMPLE) + 1)
    lo = torch.kthvalue(sample, lo_rank).values
    hi = torch.kthvalue(sample, hi_rank).values
    above = int(torch.count_nonzero(values > hi))
    if above < k:
        band = values[(values >= lo) & (values <= hi)]
        need = k - above
        if need <= band.numel():
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values


def keep_count(density: float, numel: int) -> int:
    """How many entries a density keeps, counted as mergekit counts: floor(density * n)."""
    return int(density * numel)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep entries whose magnitude is at least the k-th largest (k = floor(density*n)); ties are kept."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = keep_count(density, delta.numel())
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    return magnitude >= kth_largest(magnitude.reshape(-1), k)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the largest `gamma` fraction and then the smallest, keeping `density` of entries."""
    n = delta.numel()
    keep = keep_count(density, n)
    top = min(int(gamma * n), n - keep)
    if keep == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    flat = magnitude.reshape(-1)
    mask = magnitude >= kth_largest(flat, top + keep)
    if top > 0:
        mask &= magnitude < kth_largest(flat, top)
    return mask


def tensor_seed(seed: int, tensor_name: str, expert_index: int) -> int:
    """A seed that depends on the recipe seed, the tensor and the expert, not on processing order."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{expert_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_keep_mask(shape: torch.Size, probability: torch.Tensor | float, seed: int, device: torch.device) -> torch.Tensor:
    """Bernoulli keep mask with a per-tensor generator, so a recipe reproduces bit for bit on one device type."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) < probability


def rank_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA: keep probabilities rising linearly with magnitude rank, from density-eps to density+eps per row."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    position = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * position).reshape(delta.shape)


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    elect: bool,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, float | None]:
    """Weighted sum of (sparsified) task vectors, optionally after a TIES sign election.

    With `elect`, the sign of the summed weighted vectors is elected per entry (a zero sum counts as +), only
    entries with that sign are summed (zeros never agree), and `normalize` divides by the agreeing experts'
    weights (1 where none agree); without it, `normalize` divides by the sum of all weights. The result is
    multiplied by `scale`. Returns it with the sign-agreement fraction: among entries some expert kept, the
    share where no kept entry has the minority sign. The deltas are scaled in place and loop one at a time,
    so memory is the inputs plus a few tensors, whatever the number of experts.
    """
    for delta, weight in zip(deltas, weights):
        delta.mul_(weight)
    merged = torch.zeros_like(deltas[0])
    agreement = None
    if elect:
        for delta in deltas:
            merged += delta
        positive = merged >= 0
        merged.zero_()
        divisor = torch.zeros_like(merged)
        disagree = torch.zeros_like(merged, dtype=torch.bool)
        any_kept = torch.zeros_like(merged, dtype=torch.bool)
        for delta, weight in zip(deltas, weights):
            agree = torch.where(positive, delta > 0, delta < 0)
            merged += delta * agree
            divisor += agree * weight
            kept = delta != 0
            any_kept |= kept
            disagree |= kept & ~agree
        total = int(any_kept.sum())
        agreement = 1.0 if total == 0 else 1.0 - int(disagree.sum()) / total
        if normalize:
            merged /= torch.where(divisor == 0, 1.0, divisor)
    else:
        for delta in deltas:
            merged += delta
        total = float(sum(weights))
        if normalize and abs(total) >= 1e-8:
            merged /= total
    if scale != 1.0:
        merged *= scale
    return merged, agreement


def kept_fraction(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else 1.0


def merge_task_vectors(inputs: MergeInputs, deltas: list[torch.Tensor], kept: list[float] | None, *, elect: bool) -> MergeOutput:
    """Finish a task-vector method: combine the (sparsified) deltas with the recipe's weights, normalize and
    lambda, and add the result to the base."""
    merged, agreement = combine(
        deltas, inputs.per_model("weight"), elect=elect, normalize=inputs.params["normalize"], scale=inputs.params["lambda"]
    )
    return MergeOutput(inputs.base + merged, kept_fraction=kept, sign_agreement=agreement)
