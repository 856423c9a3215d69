"""Selection, sparsification and sign election shared by TIES, DARE, breadcrumbs and DELLA.

Pure tensor functions. Work on a chunk is done in place on buffers the method owns: at this scale an
extra allocation per element costs more than the arithmetic.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterator

import numpy as np
import torch

from mergekit_lite import kernels
from mergekit_lite.methods.base import Chunk, ChunkResult, TensorContext

# Below this size an exact kthvalue is cheap; above it a sampled bracket avoids a full selection.
_SMALL = 1 << 16
_SAMPLE = 1 << 14
_BUCKETS = 1 << 16


def keep_count(density: float, numel: int) -> int:
    """How many entries a density keeps, counted as mergekit counts: floor(density * n)."""
    return int(density * numel)


def _sample_bracket(ordered: torch.Tensor, n: int, k: int) -> tuple[float, float, float]:
    """(lo, guess, hi) from a random sample, sorted: the guess estimates the k-th largest of all n values, and
    [lo, hi] encloses it with high probability. Each is a sample value, so with many tied values (weights
    stored in 16 bits) the guess is often exactly the answer."""
    size = ordered.numel()
    below = 1 - k / n
    spread = 4 * math.sqrt(max(below * (1 - below), 1 / size) / size) + 2 / size
    rank = lambda fraction: min(size, max(1, int(fraction * size) + 1))  # noqa: E731
    values = [float(ordered[rank(f) - 1]) for f in (below - spread, below, below + spread)]
    return values[0], values[1], values[2]


def count_nonzero(values: torch.Tensor) -> int:
    """Non-zero entries; numpy counts a float tensor about ten times faster than torch on the CPU."""
    if values.device.type == "cpu":
        return int(np.count_nonzero(values.numpy()))
    return int(torch.count_nonzero(values))


def _count(values: torch.Tensor, point: float, strict: bool) -> int:
    """How many entries exceed (strict) or reach `point`. numpy's compare-and-count is several times faster
    than torch's on the CPU."""
    if values.device.type == "cpu":
        array = values.numpy()
        return int(np.count_nonzero(array > point if strict else array >= point))
    return int(torch.count_nonzero(values > point if strict else values >= point))


def _counts(values: torch.Tensor, brackets: list[tuple[float, float, float]]) -> list[list[int]]:
    """Per bracket (lo, guess, hi): [#>hi, #>guess, #>=guess, #>=lo]."""
    if kernels.usable(values):
        return kernels.count_brackets(values, brackets)
    return [[_count(values, hi, True), _count(values, guess, True), _count(values, guess, False),
             _count(values, lo, False)] for lo, guess, hi in brackets]


def _between(values: torch.Tensor, bands: list[tuple[float, float, bool, bool]]) -> list[torch.Tensor]:
    """Per band (lo, hi, include_lo, include_hi): the entries in it, as a new tensor."""
    if kernels.usable(values):
        return kernels.collect_bands(values.reshape(-1), bands)
    on_cpu = values.device.type == "cpu"  # numpy's compare-and-gather is several times faster than torch's there
    array = values.numpy() if on_cpu else values
    found = []
    for lo, hi, include_lo, include_hi in bands:
        low = array >= lo if include_lo else array > lo
        high = array <= hi if include_hi else array < hi
        found.append(torch.from_numpy(array[low & high]) if on_cpu else array[low & high])
    return found


# Past this many candidates the exact finish uses the constant-memory radix select instead.
_MAX_BAND = 1 << 24


def _select(stream: Callable[[], Iterator[list[torch.Tensor]]], n: int,
            jobs: list[tuple[int, int, torch.Tensor]]) -> list[float]:
    """Exact k-th largest values, each of one series of n non-negative values arriving in chunks.

    `stream()` yields, per chunk, one tensor per series; each job is (series, k, a random sample of that
    series). One counting pass usually settles every job: the sample's guess is the answer when fewer than
    k values exceed it and at least k reach it. Otherwise the answer lies between the guess and one end of
    the bracket; a second pass collects just those values and kthvalue finishes on them. A bracket that
    misses, or holds too many values, falls back to the radix select.
    """
    ordered: dict[int, torch.Tensor] = {}  # each sample sorted once, however many ranks are wanted from it
    for _, _, sample in jobs:
        if id(sample) not in ordered:
            ordered[id(sample)] = torch.sort(sample).values
    points = [_sample_bracket(ordered[id(sample)], n, k) for _, k, sample in jobs]
    by_series: dict[int, list[int]] = {}  # the jobs of each series, whose counts are taken in one pass
    for job, (s, _, _) in enumerate(jobs):
        by_series.setdefault(s, []).append(job)
    totals = [[0, 0, 0, 0] for _ in jobs]
    for series in stream():
        for s, members in by_series.items():
            for job, counts in zip(members, _counts(series[s], [points[job] for job in members])):
                totals[job] = [a + b for a, b in zip(totals[job], counts)]
    answers: list[float | None] = [None] * len(jobs)
    bands: dict[int, tuple[float, float, bool, bool, int]] = {}
    for job, ((s, k, _), (lo, guess, hi), (above_hi, above_guess, reach_guess, reach_lo)) in enumerate(
        zip(jobs, points, totals)
    ):
        if above_guess < k <= reach_guess:
            answers[job] = guess
        elif reach_guess < k <= reach_lo and reach_lo - reach_guess <= _MAX_BAND:
            bands[job] = (lo, guess, True, False, reach_guess)  # at or above lo, below the guess
        elif above_hi < k <= above_guess and above_guess - above_hi <= _MAX_BAND:
            bands[job] = (guess, hi, False, True, above_hi)  # above the guess, at most hi
    if bands:
        collected: dict[int, list[torch.Tensor]] = {job: [] for job in bands}
        for series in stream():
            for s, members in by_series.items():
                banded = [job for job in members if job in bands]
                found = _between(series[s], [bands[job][:4] for job in banded]) if banded else []
                for job, part in zip(banded, found):
                    collected[job].append(part)
        for job, parts in collected.items():
            band = torch.cat(parts).cpu()
            need = jobs[job][1] - bands[job][4]
            answers[job] = float(torch.kthvalue(band, band.numel() - need + 1).values)
    for job, answer in enumerate(answers):
        if answer is None:
            s, k, _ = jobs[job]
            answers[job] = radix_kth_largest(lambda s=s: (series[s] for series in stream()), k)
    return answers


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor (1 <= k <= n), without sorting it."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if n <= _SMALL:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: max(1, n // _SAMPLE) | 1].cpu()
    lo, guess, hi = _sample_bracket(torch.sort(sample).values, n, k)
    if _count(values, guess, True) < k <= _count(values, guess, False):  # the usual case: two counts
        return torch.tensor(guess, dtype=values.dtype)
    return torch.tensor(_select(lambda: iter([[values]]), n, [(0, k, sample)])[0], dtype=values.dtype)


SeriesStream = Callable[[int], Iterator[list[torch.Tensor]]]


def streamed_kth_largest(stream: SeriesStream, n: int, ks: list[list[int]]) -> list[list[float]]:
    """Exact k-th largest values of several series of non-negative values that arrive in chunks.

    `stream(stride)` yields, per chunk, one 1-D float32 tensor per series holding every stride-th value of
    that chunk (stride 1: all of them; each series holds n values in all); `ks[s]` lists the ranks wanted
    from series s (each 1 <= k <= n). A single chunk is solved in memory. Otherwise a strided sample from
    a first pass guides `_select` over the chunks, all series at once.
    """
    stride = max(1, n // _SAMPLE) | 1
    samples = [[values.clone() for values in series] for series in stream(stride)]
    chunks = lambda: stream(1)  # noqa: E731
    if len(samples) == 1:  # one chunk: made once, and every rank of every series found in the same passes
        whole = next(iter(stream(1)))
        if n <= _SMALL:
            return [[float(torch.kthvalue(values, n - k + 1).values) for k in wanted] for values, wanted in zip(whole, ks)]
        chunks = lambda: iter([whole])  # noqa: E731
    jobs = []
    for s, wanted in enumerate(ks):
        sample = torch.cat([chunk[s] for chunk in samples]).cpu()
        jobs += [(s, k, sample) for k in wanted]
    found = iter(_select(chunks, n, jobs))
    return [[next(found) for _ in wanted] for wanted in ks]


def _bits(values: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values as int32 bit patterns, whose order is the values' order."""
    return values.reshape(-1).contiguous().view(torch.int32)


def high_histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts of non-negative float32 values by the high 16 bits of their bit pattern (65,536 buckets): the first
    round of a radix select, which adds up across chunks, tasks and machines."""
    return torch.bincount(_bits(values) >> 16, minlength=_BUCKETS).cpu()


def low_histogram(values: torch.Tensor, bucket: int) -> torch.Tensor:
    """Counts, by the low 16 bits, of the values whose high 16 bits are `bucket`: the radix select's second round."""
    bits = _bits(values)
    return torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=_BUCKETS).cpu()


def radix_value(bucket: int, low_bucket: int) -> float:
    """The float32 whose high and low 16 bits are the two buckets."""
    return float(torch.tensor([(bucket << 16) | low_bucket], dtype=torch.int32).view(torch.float32)[0])


def radix_kth_largest(stream: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """Exact k-th largest of non-negative float32 values arriving in chunks: a two-pass radix select.

    The first pass histograms the high 16 bits of every value and finds the bucket holding the answer; the
    second histograms the low 16 bits inside that bucket. Memory: two 65,536-entry histograms.
    """
    high = torch.zeros(_BUCKETS, dtype=torch.int64)
    for values in stream():
        high += high_histogram(values)
    bucket, rank = bucket_of_kth_largest(high, k)
    low = torch.zeros(_BUCKETS, dtype=torch.int64)
    for values in stream():
        low += low_histogram(values, bucket)
    low_bucket, _ = bucket_of_kth_largest(low, rank)
    return radix_value(bucket, low_bucket)


def bucket_of_kth_largest(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest value, and that value's rank from the top inside the bucket."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k)))
    above = int(from_top[position - 1]) if position > 0 else 0
    return histogram.numel() - 1 - position, k - above


def magnitude_threshold(values: torch.Tensor, density: float) -> float:
    """The magnitude at or above which floor(density*n) entries lie (inf when none are kept)."""
    k = keep_count(density, values.numel())
    if density >= 1:
        return 0.0
    return float("inf") if k == 0 else float(kth_largest(values.abs().reshape(-1), k))


def _just_below(value: float) -> float:
    """The largest float32 below a positive value: |x| > it exactly when |x| >= value."""
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(0.0)))


def magnitude_band(delta: torch.Tensor, low: float, high: float = float("inf")) -> tuple[torch.Tensor, int]:
    """Entries with low <= |x| < high kept, the rest zeroed; and how many were kept.

    hardshrink keeps |x| > lambda in one pass, several times cheaper here than an abs, a compare and a
    masked multiply.
    """
    if low <= 0 and high == float("inf"):
        return delta, delta.numel()
    if low == float("inf"):
        return delta.zero_(), 0
    kept = torch.nn.functional.hardshrink(delta, _just_below(low)) if low > 0 else delta.clone()
    if high != float("inf"):
        kept.sub_(torch.nn.functional.hardshrink(delta, _just_below(high)))
    return kept, count_nonzero(kept)


def trim_each(deltas: list[torch.Tensor], bounds: list[tuple[float, float]]) -> tuple[list[torch.Tensor], list[int]]:
    """magnitude_band for every expert: the trimmed task vectors and how many entries each kept."""
    trimmed = [magnitude_band(delta, low, high) for delta, (low, high) in zip(deltas, bounds)]
    return [t for t, _ in trimmed], [k for _, k in trimmed]


def tensor_seed(seed: int, tensor_name: str, expert_index: int, start_row: int = 0) -> int:
    """A seed from the recipe seed, the tensor, the expert and the chunk: independent of processing order."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{expert_index}\0{start_row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_draws(seed: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draws 0..count-1 of stream `seed`, uniform in [0, 1) with 24 random bits: splitmix64 of seed + (i + 1) *
    golden ratio. Counter-based, so any range of draws can be made alone (the C kernel makes them in its worker
    threads); int64 arithmetic wraps as the C uint64 arithmetic does, so both give the same bits."""
    z = (torch.arange(1, count + 1, dtype=torch.int64, device=device) * _GOLDEN).add_(_signed(seed % (1 << 64)))
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z ^= _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32).mul_(2.0 ** -24)


def random_keep(delta: torch.Tensor, probability: torch.Tensor | float, seed: int, rescale: bool) -> int:
    """Bernoulli drop, in place: keep each entry with `probability`, divided by it when `rescale`.

    Entry i's draw is draw i of the chunk's stream `seed` (uniform_draws), so a recipe reproduces bit for bit on
    any device, with or without the C kernels, whatever the processing order.
    """
    if kernels.usable(delta) and (not isinstance(probability, torch.Tensor) or kernels.usable(probability)):
        return kernels.random_drop(delta, probability, seed, rescale)
    keep = uniform_draws(seed, delta.numel(), delta.device).view(delta.shape).lt_(probability)
    delta.mul_(keep)
    if rescale:
        delta.div_(probability)
    return count_nonzero(keep)


def rank_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA: keep probabilities rising linearly with magnitude rank, from density-eps to density+eps per row.
    Equal magnitudes rank in index order (a stable sort), so the ranks do not depend on a sort's implementation."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    if kernels.usable(rows):
        return kernels.rank_probabilities(rows, density - epsilon, 2 * epsilon).reshape(delta.shape)
    order = rows.abs().argsort(dim=1, stable=True)  # ranks: a stable sort, then its inverse permutation scattered
    ranks = torch.empty(order.shape, dtype=torch.float32, device=order.device)
    ranks.scatter_(1, order, torch.arange(width, dtype=torch.float32, device=order.device).expand_as(order).contiguous())
    position = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * position).reshape(delta.shape)


def combine(
    deltas: list[torch.Tensor], weights: list[float], *, elect: bool, normalize: bool, scale: float
) -> tuple[torch.Tensor, int | None, int | None]:
    """Weighted sum of (sparsified) task vectors, optionally after a TIES sign election; in place.

    With `elect`, the sign of the summed weighted vectors is elected per entry (a zero sum counts as +), only
    entries with that sign are summed (zeros never agree), and `normalize` divides by the agreeing experts'
    weights (1 where none agree); without it, `normalize` divides by the sum of all weights. The result is
    multiplied by `scale`. Also returns how many entries some expert kept and, of those, how many had a
    kept entry of the minority sign.

    The election works on s_t = sign * w_t tau_t: an expert agrees where s_t > 0, so the agreeing sum is
    sign * sum_t max(s_t, 0), and an entry saw disagreement exactly where that sum exceeds |sum_t w_t tau_t|.
    """
    for delta, weight in zip(deltas, weights):
        if weight != 1.0:
            delta.mul_(weight)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    if not elect:
        weight_sum = float(sum(weights))
        if normalize and abs(weight_sum) >= 1e-8:
            total /= weight_sum
        return (total.mul_(scale) if scale != 1.0 else total), None, None
    sign = torch.sign(total).add_(0.5).sign_()  # +1 where the sum is >= 0, else -1
    agreeing = torch.zeros_like(total)
    divisor = torch.zeros_like(total) if normalize else None
    for delta, weight in zip(deltas, weights):
        delta.mul_(sign).clamp_(min=0)
        agreeing += delta
        if divisor is not None:  # 1 where this expert agrees: ceil of a huge multiple of a value >= 0, capped
            divisor.add_(delta.mul_(1e38).ceil_().clamp_(max=1.0), alpha=weight)
    any_kept = count_nonzero(agreeing)
    disagreed = count_nonzero(agreeing > total.abs_())
    agreeing.mul_(sign)
    if divisor is not None:
        if min(weights) > 0:  # a zero divisor then means nothing agreed, and agreeing is 0 there too
            agreeing.div_(divisor.clamp_(min=min(weights)))
        else:
            agreeing.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if scale != 1.0:
        agreeing.mul_(scale)
    return agreeing, any_kept, disagreed


def delta_magnitudes(chunk: Chunk, stride: int = 1) -> list[torch.Tensor]:
    """|expert - base| of every expert in a chunk, flattened, at every stride-th position.

    A full pass turns the chunk's experts into task vectors (once), which the merge pass then reuses."""
    if stride == 1:
        if chunk.delta_sq is None and kernels.usable(chunk.base, *chunk.experts):
            flat = [expert.reshape(-1) for expert in chunk.experts]
            magnitudes, chunk.delta_sq = kernels.task_vector_magnitudes(chunk.base.reshape(-1), flat)
            return magnitudes
        return [delta.abs().reshape(-1) for delta in task_vectors(chunk)[0]]
    if chunk.delta_sq is not None:
        return [delta.reshape(-1)[::stride].abs() for delta in chunk.experts]
    base = chunk.base.reshape(-1)[::stride]
    return [(expert.reshape(-1)[::stride] - base).abs_() for expert in chunk.experts]


def task_vectors(chunk: Chunk) -> tuple[list[torch.Tensor], list[float]]:
    """Each expert's task vector for this chunk, in place of the expert (computed once), and its squared norm."""
    if chunk.delta_sq is None:
        deltas = [expert.sub_(chunk.base).reshape(-1) for expert in chunk.experts]
        chunk.delta_sq = [float(torch.dot(d, d)) for d in deltas]
    return chunk.experts, chunk.delta_sq


def model_vectors(chunk: Chunk) -> list[torch.Tensor]:
    """What the spherical methods work on: the models, or their task vectors when there is a base (made in place,
    once: a chunk the statistics pass saw comes back to the merge already holding them)."""
    return task_vectors(chunk)[0] if chunk.base is not None else chunk.experts


def merge_task_vectors(
    context: TensorContext, chunk: Chunk, deltas: list[torch.Tensor], delta_sq: list[float], kept: list[int] | None,
    *, elect: bool,
) -> ChunkResult:
    """Finish a task-vector method: combine the (sparsified) deltas with the recipe's weights, normalize and
    lambda, and add the result to the base. A sign election on the CPU runs in the fused TIES kernel with
    nothing left to trim (the same bits as the torch path)."""
    if elect and kernels.usable(chunk.base, *deltas):
        merged, stats = kernels.ties_merge(
            chunk.base.reshape(-1), [delta.reshape(-1) for delta in deltas], True, [0.0] * len(deltas),
            context.per_model("weight"), context.params["normalize"], context.params["lambda"],
        )
        return ChunkResult(merged.view(chunk.base.shape), kept=kept, any_kept=stats["any_kept"],
                           disagreed=stats["disagreed"], delta_sq=delta_sq, result_delta_sq=stats["change_sq"],
                           result_sq=stats["result_sq"])
    merged, any_kept, disagreed = combine(
        deltas, context.per_model("weight"), elect=elect, normalize=context.params["normalize"],
        scale=context.params["lambda"],
    )
    flat = merged.reshape(-1)
    change_sq = float(torch.dot(flat, flat))
    return ChunkResult(merged.add_(chunk.base), kept=kept, any_kept=any_kept, disagreed=disagreed, delta_sq=delta_sq,
                       result_delta_sq=change_sq)
