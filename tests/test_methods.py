"""Each method's math against a direct, naive computation on the same tensors."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_lite.errors import UserError
from mergekit_lite.methods import METHODS, Chunk, TensorContext
from mergekit_lite.methods.base import ChunkStream
from mergekit_lite.methods.model_stock import stock_ratio
from mergekit_lite.methods.sparsify import (
    kth_largest, magnitude_band, magnitude_threshold, radix_kth_largest, random_keep, streamed_kth_largest,
    tensor_seed,
)
from mergekit_lite.methods.ties import model_thresholds


def _experts(count=3, shape=(40, 30), seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    return base, [base + 0.1 * torch.randn(shape, generator=gen) for _ in range(count)]


def _context(method, shape, model_params, params=None, seed=0, name="layers.0.w"):
    spec = METHODS[method]
    full_params = [{p.name: p.default for p in spec.params if p.scope == "model"} | mp for mp in model_params]
    glob = {p.name: p.default for p in spec.params if p.scope == "global"} | (params or {})
    return TensorContext(name, tuple(shape), full_params, glob, seed=seed)


def _merge(method, base, experts, model_params, params=None, seed=0, name="layers.0.w"):
    """Merge whole tensors as one chunk, through the method's public entry point."""
    shape = experts[0].shape
    context = _context(method, shape, model_params, params, seed, name)
    return METHODS[method].merge(context, base, [e.clone() for e in experts])


def naive_topk_mask(delta, density):
    """Keep the k = floor(density*n) largest magnitudes, found by a full sort (ties at the threshold kept)."""
    flat = delta.abs().reshape(-1)
    k = int(density * flat.numel())
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    threshold = torch.sort(flat, descending=True).values[k - 1]
    return delta.abs() >= threshold


def naive_ties(base, experts, weights, densities, lam=1.0, normalize=True):
    trimmed = [naive_topk_mask(e - base, d) * (e - base) * w for e, w, d in zip(experts, weights, densities)]
    out = torch.empty_like(base).reshape(-1)
    flat = [t.reshape(-1) for t in trimmed]
    for i in range(out.numel()):
        values = [f[i].item() for f in flat]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agreeing = [(v, w) for v, w in zip(values, weights) if v != 0 and math.copysign(1, v) == sign]
        total = sum(v for v, _ in agreeing)
        if normalize:
            divisor = sum(w for _, w in agreeing)
            total = total / (divisor if divisor != 0 else 1.0)
        out[i] = total * lam
    return base + out.reshape(base.shape)


def test_linear_matches_weighted_average():
    _, models = _experts()
    weights = [0.2, 0.5, 1.3]
    out = _merge("linear", None, models, [{"weight": w} for w in weights]).tensor
    expected = sum(w * m for w, m in zip(weights, models)) / sum(weights)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    raw = _merge("linear", None, models, [{"weight": w} for w in weights], {"normalize": False})
    torch.testing.assert_close(raw.tensor, sum(w * m for w, m in zip(weights, models)))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize):
    base, experts = _experts()
    weights = [1.0, -0.5, 0.7]
    params = {"lambda": 0.3, "normalize": normalize}
    out = _merge("task_arithmetic", base, experts, [{"weight": w} for w in weights], params).tensor
    delta = sum(w * (e - base) for w, e in zip(weights, experts))
    if normalize:
        delta = delta / sum(weights)
    torch.testing.assert_close(out, base + 0.3 * delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_elementwise_reference(normalize):
    base, experts = _experts(shape=(12, 9))
    weights, densities = [1.0, 0.6, 1.4], [0.3, 0.5, 0.8]
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    result = _merge("ties", base, experts, params, {"lambda": 0.9, "normalize": normalize})
    expected = naive_ties(base, experts, weights, densities, lam=0.9, normalize=normalize)
    torch.testing.assert_close(result.tensor, expected, rtol=1e-5, atol=1e-6)
    assert result.kept_fraction == pytest.approx([int(d * 108) / 108 for d in densities])
    assert 0 < result.sign_agreement < 1


def test_ties_identical_experts_give_the_expert_back():
    base, experts = _experts(count=1)
    same = [experts[0], experts[0].clone()]
    out = _merge("ties", base, same, [{"density": 1.0}] * 2).tensor
    torch.testing.assert_close(out, experts[0])


@pytest.mark.parametrize("n", [10, 5000, 3_000_000])
@pytest.mark.parametrize("fraction", [0.001, 0.2, 0.5, 0.97, 1.0])
def test_kth_largest_is_exact(n, fraction):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    k = max(1, int(fraction * n))
    assert kth_largest(values, k) == torch.sort(values, descending=True).values[k - 1]


def test_kth_largest_with_many_ties():
    values = torch.randint(0, 4, (2_000_000,), generator=torch.Generator().manual_seed(1)).float()
    for k in (1, 500_000, 1_000_001, 2_000_000):
        assert kth_largest(values, k) == torch.sort(values, descending=True).values[k - 1]


def test_magnitude_mask_counts_like_mergekit():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    for density in (0.05, 0.2, 0.999):
        trimmed, kept = magnitude_band(delta.clone(), magnitude_threshold(delta, density))
        assert kept == int(density * 1000)
        assert torch.equal(trimmed != 0, naive_topk_mask(delta, density))


def test_dare_is_seeded_keeps_expected_fraction_and_rescales():
    base, experts = _experts(count=2, shape=(300, 200))
    params = [{"density": 0.1, "weight": 1.0}] * 2
    first = _merge("dare_linear", base, experts, params, seed=7)
    again = _merge("dare_linear", base, experts, params, seed=7)
    other = _merge("dare_linear", base, experts, params, seed=8)
    assert torch.equal(first.tensor, again.tensor)
    assert not torch.equal(first.tensor, other.tensor)
    n = 60_000
    for kept in first.kept_fraction:  # binomial: mean 0.1, sd ~0.0012
        assert abs(kept - 0.1) < 0.006
    # Survivors are rescaled by 1/density, so each expert's delta survives as 10x its value or 0.
    single = _merge("dare_linear", base, experts[:1], params[:1], seed=7).tensor
    delta, original = single - base, experts[0] - base
    kept = delta != 0
    torch.testing.assert_close(delta[kept], original[kept] * 10, rtol=1e-4, atol=1e-5)
    # The drop leaves the task vector's expected value unchanged: mean of delta/original over entries ~ 1.
    assert abs(float((delta / original).mean()) - 1) < 0.1
    assert kept.sum().item() / n == pytest.approx(first.kept_fraction[0], abs=0.01)


def test_dare_ties_equals_ties_election_on_the_same_drop():
    base, experts = _experts(count=3, shape=(20, 10))
    params = [{"density": 0.5, "weight": w} for w in (1.0, 0.5, 2.0)]
    out = _merge("dare_ties", base, experts, params, {"normalize": True}, seed=3)
    # Rebuild the dropped experts with the same per-tensor, per-expert seeds, then apply naive TIES.
    dropped = []
    for i, e in enumerate(experts):
        delta = e - base
        random_keep(delta, 0.5, tensor_seed(3, "layers.0.w", i, 0), rescale=True)
        dropped.append(base + delta)
    expected = naive_ties(base, dropped, [1.0, 0.5, 2.0], [1.0] * 3, normalize=True)
    torch.testing.assert_close(out.tensor, expected, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base, experts = _experts(count=2, shape=(50, 20))
    result = _merge("breadcrumbs", base, experts, [{"density": 0.8, "gamma": 0.05}] * 2)
    naive = base.clone()
    for expert in experts:
        delta = (expert - base).reshape(-1)
        order = torch.argsort(delta.abs(), descending=True)
        keep = torch.zeros(1000, dtype=torch.bool)
        keep[order[50:850]] = True  # drop the top 5 %, keep the next 80 %, drop the rest
        naive += (delta * keep).reshape(base.shape)
    torch.testing.assert_close(result.tensor, naive)
    assert result.kept_fraction == [0.8, 0.8]


def test_della_keep_probability_tracks_magnitude():
    base, experts = _experts(count=1, shape=(64, 4096))
    result = _merge("della", base, experts, [{"density": 0.5, "epsilon": 0.4}], seed=1)
    delta = experts[0] - base
    kept = (result.tensor - base) != 0
    magnitude_rank = delta.abs().argsort(dim=1).argsort(dim=1)
    low = kept[magnitude_rank < 400].float().mean()
    high = kept[magnitude_rank >= 4096 - 400].float().mean()
    mean_offset = 0.8 * 199.5 / 4095  # probabilities rise linearly from 0.1 to 0.9 across ranks 0..4095
    assert abs(float(low) - (0.1 + mean_offset)) < 0.02 and abs(float(high) - (0.9 - mean_offset)) < 0.02
    assert abs(result.kept_fraction[0] - 0.5) < 0.01


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    base, (other,) = _experts(count=1)
    merge = lambda t: _merge("slerp", base, [other], [{}], {"t": t}).tensor  # noqa: E731
    torch.testing.assert_close(merge(0.0), base)
    torch.testing.assert_close(merge(1.0), other, rtol=1e-5, atol=1e-5)
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    mid = _merge("slerp", a, [b], [{}], {"t": 0.5}).tensor
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    near = _merge("slerp", a, [a * 2], [{}], {"t": 0.25}).tensor
    torch.testing.assert_close(near, a * 1.25)


def test_model_stock_ratio_and_result():
    assert stock_ratio(2, 1.0) == pytest.approx(1.0)
    assert stock_ratio(3, 0.0) == 0.0
    assert stock_ratio(2, 0.5) == pytest.approx(2 / 3)
    base = torch.zeros(2)
    experts = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]  # cos = 1/sqrt(2)
    out = _merge("model_stock", base, experts, [{}, {}]).tensor
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(out, t * torch.tensor([1.0, 0.5]))


def test_model_stock_filter_wise_takes_each_rows_own_ratio():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=gen)
    experts = [base + torch.randn(6, 5, generator=gen) * s for s in (0.2, 0.5, 0.3)]
    out = _merge("model_stock", base, experts, [{}, {}, {}], {"filter_wise": True}).tensor
    for row in range(6):
        deltas = [e[row] - base[row] for e in experts]
        cosines = [float(deltas[i] @ deltas[j] / (deltas[i].norm() * deltas[j].norm()))
                   for i, j in ((0, 1), (0, 2), (1, 2))]
        t = stock_ratio(3, sum(cosines) / 3)
        torch.testing.assert_close(out[row], base[row] + t * sum(deltas) / 3)
    whole = _merge("model_stock", base, experts, [{}, {}, {}]).tensor
    assert not torch.allclose(out, whole)  # one ratio per tensor differs from one per row


def test_model_scope_thresholds_equal_sorting_the_whole_model():
    gen = torch.Generator().manual_seed(11)
    tensors = [(f"t{i}", torch.randn(n, generator=gen)) for i, n in enumerate([1000, 37, 300_000, 1])]
    experts = [[b + torch.randn(b.shape, generator=gen) * s for _, b in tensors] for s in (0.1, 0.3)]
    densities = [0.2, 0.05]

    def contexts():
        for i, (name, base) in enumerate(tensors):
            context = _context("ties", base.shape, [{"density": d} for d in densities], name=name)
            # each call yields a freshly read chunk, as the engine's streams do
            yield context, (lambda i=i, base=base: iter([Chunk(0, base, [e[i].clone() for e in experts])]))

    thresholds = model_thresholds(contexts)
    for expert, density, threshold in zip(experts, densities, thresholds):
        magnitudes = torch.cat([(e - b).abs() for e, (_, b) in zip(expert, tensors)])
        k = int(density * magnitudes.numel())
        assert threshold == float(torch.sort(magnitudes, descending=True).values[k - 1])


def _split_pass(method: str, parts: list[list[tuple[TensorContext, ChunkStream]]]):
    """Run a method's split whole-model pass as a cluster would: each part answers each round, the driver reduces."""
    split = METHODS[method].split_model_pass
    question, rounds = None, 0
    while True:
        rounds += 1
        finished, question = split.reduce(question, [split.part(question, iter(part)) for part in parts])
        if finished:
            return question, rounds


def test_model_scope_thresholds_split_over_workers_equal_the_single_pass():
    """Histograms summed over workers, in any split of the tensors, give model_thresholds' exact values, also
    for magnitudes tied in 16-bit weights, density 1 (keep all) and a density that keeps nothing."""
    gen = torch.Generator().manual_seed(5)
    tensors = [(f"t{i}", torch.randn(n, generator=gen).to(torch.bfloat16).float())
               for i, n in enumerate([4000, 37, 90_000, 1, 20_000])]
    experts = [[(b + torch.randn(b.shape, generator=gen) * s).to(torch.bfloat16).float() for _, b in tensors]
               for s in (0.1, 0.3, 0.02, 0.2)]
    densities = [0.2, 0.05, 1.0, 1e-9]

    def entry(i):
        name, base = tensors[i]
        context = _context("ties", base.shape, [{"density": d} for d in densities], name=name)
        return context, (lambda: iter([Chunk(0, base, [e[i].clone() for e in experts])]))

    expected = model_thresholds(lambda: (entry(i) for i in range(len(tensors))))
    assert expected[2] == 0.0 and expected[3] == float("inf")
    for split in ([[0, 1, 2, 3, 4]], [[2], [0, 4], [], [1, 3]], [[4, 3, 2, 1, 0]]):
        thresholds, rounds = _split_pass("ties", [[entry(i) for i in part] for part in split])
        assert thresholds == expected and rounds == 2


def test_a_split_model_pass_refuses_densities_that_differ_between_workers():
    base = torch.randn(100)
    parts = [[(_context("ties", base.shape, [{"density": d}], name=f"t{d}"),
               lambda: iter([Chunk(0, base, [base * 2])]))] for d in (0.2, 0.3)]
    with pytest.raises(UserError, match="one density per model"):
        _split_pass("ties", parts)


def _chunked(values: torch.Tensor, size: int):
    return lambda stride=1: ([values[i : i + size][::stride]] for i in range(0, values.numel(), size))


@pytest.mark.parametrize("k", [1, 17, 50_000, 499_999, 500_000])
def test_streamed_kth_largest_is_exact_across_chunks(k):
    values = torch.randn(500_000, generator=torch.Generator().manual_seed(k)).abs()
    expected = float(torch.sort(values, descending=True).values[k - 1])
    assert streamed_kth_largest(_chunked(values, 65_536), 500_000, [[k]]) == [[expected]]


@pytest.mark.parametrize("chunk", [65_536, 300_000], ids=["chunks", "one chunk"])
def test_streamed_kth_largest_finds_several_ranks_of_several_series_at_once(chunk):
    """Continuous values (the sample's guess is never exact, so every rank is finished on its band), several ranks
    of two series in the same passes, whether the tensor comes in chunks or in one."""
    first = torch.randn(300_000, generator=torch.Generator().manual_seed(5)).abs()
    second = torch.rand(300_000, generator=torch.Generator().manual_seed(6)) * 3
    ks = [[1, 75_000, 150_000, 225_000, 300_000], [2, 150_001]]

    def stream(stride=1):
        return ([first[i:i + chunk][::stride], second[i:i + chunk][::stride]] for i in range(0, 300_000, chunk))

    expected = [[float(torch.sort(values, descending=True).values[k - 1]) for k in wanted]
                for values, wanted in zip((first, second), ks)]
    assert streamed_kth_largest(stream, 300_000, ks) == expected


def test_streamed_kth_largest_survives_an_unrepresentative_sample():
    """Values whose strided sample sees only zeros: the bracket misses and the radix fallback answers."""
    n = 400_000
    values = torch.zeros(n)
    stride = max(1, n // (1 << 16)) | 1
    off_sample = torch.ones(n, dtype=torch.bool)
    off_sample[::stride] = False
    values[off_sample] = torch.rand(int(off_sample.sum()), generator=torch.Generator().manual_seed(2)) + 1
    for k in (10, 300_000):
        expected = float(torch.sort(values, descending=True).values[k - 1])
        assert streamed_kth_largest(_chunked(values, 50_000), n, [[k]]) == [[expected]]


def test_radix_select_matches_sort():
    values = torch.rand(200_000, generator=torch.Generator().manual_seed(4)) * 5
    for k in (1, 99_999, 200_000):
        expected = float(torch.sort(values, descending=True).values[k - 1])
        assert radix_kth_largest(lambda: (chunk[0] for chunk in _chunked(values, 30_000)()), k) == expected


def test_chunked_merge_equals_whole_tensor_merge():
    """Methods that need whole-tensor statistics give the same result merged in row chunks."""
    base, experts = _experts(count=3, shape=(64, 50))
    for method, params in (("ties", {"density": 0.3}), ("breadcrumbs", {"density": 0.7}), ("model_stock", {}),
                           ("slerp", {})):
        chosen = experts[:1] if method == "slerp" else experts
        model_params = [dict(params) for _ in chosen]
        whole = _merge(method, base, chosen, model_params).tensor
        context = _context(method, base.shape, model_params)
        spec = METHODS[method]

        def stream():
            for start in range(0, 64, 10):
                yield Chunk(start, base[start : start + 10], [e[start : start + 10].clone() for e in chosen])

        state = spec.prepare(context, stream)
        parts = [spec.merge_chunk(context, Chunk(c.start, c.base, [e.clone() for e in c.experts]), state).tensor
                 for c in stream()]
        torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)
