"""Exclusive knowledge as low-rank factors: V = expert - shared, truncated by SVD, stored as (U*S, V^T).

A full SVD of a large matrix (an embedding) costs far more time and memory than its top few directions
need, and LAPACK's default driver can fail to converge on ill-conditioned deltas. So: an exact SVD only when
the rank asked for is the whole matrix or the matrix is small; otherwise a randomised range finder
(torch.svd_lowrank) with oversampling and power iterations; and a float64 retry when a driver fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this many entries an exact SVD is cheap and removes any approximation.
_EXACT_ENTRIES = 1 << 20
_OVERSAMPLE = 8
_POWER_ITERATIONS = 4


@dataclass
class Factors:
    """delta ~= left @ right, left = U_r S_r (m, r), right = V_r^T (r, n); residual_energy is the share of
    ||delta||_F^2 the factors leave out."""

    left: torch.Tensor
    right: torch.Tensor
    residual_energy: float

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        return self.left @ self.right


def rank_for(shape: tuple[int, int], rank: float | int) -> int:
    """A rank from a ratio of min(m, n) (a float below 1, e.g. 0.1) or a fixed count (an int >= 1)."""
    full = min(shape)
    if isinstance(rank, float) and rank <= 1.0:
        return max(1, min(full, round(rank * full)))
    return max(1, min(full, int(rank)))


def _exact(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def _randomised(delta: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[delta.device] if delta.device.type == "cuda" else []):
        torch.manual_seed(seed)
        q = min(min(delta.shape), rank + _OVERSAMPLE)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=_POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank].T


def low_rank(delta: torch.Tensor, rank: int, seed: int = 0) -> Factors:
    """The best rank-`rank` factors of a 2-D delta (exact or randomised, see the module docstring)."""
    if delta.dim() != 2:
        raise ValueError(f"low_rank needs a 2-D tensor, got shape {tuple(delta.shape)}")
    work = delta.float()
    total = float(work.double().pow(2).sum())
    exact = rank >= min(work.shape) or work.numel() <= _EXACT_ENTRIES
    try:
        u, s, vh = _exact(work, rank) if exact else _randomised(work, rank, seed)
    except (RuntimeError, torch.linalg.LinAlgError):  # a driver failed to converge: retry in float64
        u, s, vh = _exact(work.double(), rank) if exact else _randomised(work.double(), rank, seed)
        u, s, vh = u.float(), s.float(), vh.float()
    kept = float(s.double().pow(2).sum())
    residual = max(0.0, total - kept) / total if total > 0 else 0.0
    return Factors((u * s).contiguous(), vh.contiguous(), residual)
