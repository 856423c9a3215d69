"""The fused C kernels give the same bits as the torch path, and everything works without them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergekit_lite import kernels
from mergekit_lite.methods import METHODS, ties
from mergekit_lite.methods.base import Chunk, TensorContext
from tests.test_failures import copy_model, expect_refusal, recipe_text
from tests.test_run import load_dir, run_cli, write_recipe

has_compiler = shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernels = pytest.mark.skipif(not has_compiler, reason="no C compiler: the torch path is the only one")


@pytest.fixture
def kernel_switch(monkeypatch):
    """Turn the kernels on or off for the rest of a test."""

    def switch(on: bool) -> None:
        monkeypatch.setenv("MERGEKIT_LITE_KERNELS", "1" if on else "0")
        kernels.library.cache_clear()

    yield switch
    monkeypatch.delenv("MERGEKIT_LITE_KERNELS", raising=False)
    kernels.library.cache_clear()


def _data(n=200_003, experts=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    others = [base + 0.01 * torch.randn(n, generator=gen) for _ in range(experts)]
    others[1][::5] = base[::5]  # exact zeros in one task vector
    others[2] = base + ((others[2] - base) * 256).round() / 256  # many tied magnitudes
    return base, others


def _ties_both_ways(kernel_switch, base, experts, model_params, params):
    """(thresholds, result) from the kernel path and from the torch path, on identical chunks."""
    context = TensorContext("w", tuple(base.shape), model_params, params)
    results = []
    for on in (True, False):
        kernel_switch(on)
        chunk = Chunk(0, base.clone(), [e.clone() for e in experts])
        thresholds = ties.tensor_thresholds(context, lambda: iter([chunk]))
        results.append((thresholds, ties.merge_ties(context, chunk, thresholds)))
    return results


def _assert_norms_of(result, base: torch.Tensor) -> None:
    """A fused kernel's squared norms of the result and of its change to the base, which the report uses instead of
    another pass over the result, against the merged tensor itself."""
    merged, base = result.tensor.double(), base.double()
    assert result.result_sq == pytest.approx(float(merged.pow(2).sum()), rel=1e-5)
    assert result.result_delta_sq == pytest.approx(float((merged - base).pow(2).sum()), rel=1e-4, abs=1e-9)


@needs_kernels
@pytest.mark.parametrize("weights, densities, normalize, lam", [
    ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], True, 1.0),
    ([0.5, 2.0, 1.0], [0.2, 0.7, 1.0], True, 0.7),
    ([1.0, -1.0, 0.3], [0.5, 0.1, 0.9], True, 1.0),  # a negative weight: divisor may be zero
    ([1.0, 0.0, 1.0], [0.3, 0.3, 0.3], False, 1.3),
    ([1.0, 1.0, 1.0], [1e-7, 0.5, 1.0], True, 1.0),  # density keeping nothing: threshold inf
])
def test_fused_ties_equals_torch_path_bit_for_bit(kernel_switch, weights, densities, normalize, lam):
    base, experts = _data()
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    (fused_thresholds, fused), (torch_thresholds, reference) = _ties_both_ways(
        kernel_switch, base, experts, params, {"normalize": normalize, "lambda": lam})
    assert fused_thresholds == torch_thresholds
    assert torch.equal(fused.tensor, reference.tensor)
    assert fused.kept == reference.kept
    assert (fused.any_kept, fused.disagreed) == (reference.any_kept, reference.disagreed)
    assert fused.delta_sq == pytest.approx(reference.delta_sq, rel=1e-5)
    assert fused.result_delta_sq == pytest.approx(reference.result_delta_sq, rel=1e-5)
    assert fused.result_sq == pytest.approx(float(reference.tensor.double().pow(2).sum()), rel=1e-6)


@needs_kernels
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("weights, densities, normalize, rescale, lam", [
    ([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], True, True, 1.0),
    ([0.5, 2.0, 1.0], [0.2, 0.7, 1.0], True, True, 0.7),  # a density of 1 keeps its task vector whole
    ([1.0, -1.0, 0.3], [0.5, 0.1, 0.9], True, False, 1.0),  # a negative weight; no rescale
    ([0.6, 0.4, 0.5], [0.3, 0.3, 0.3], False, True, 1.3),
    ([1.0, -1.0, 0.0], [0.9, 0.9, 0.9], True, True, 1.0),  # weights summing to 0: linear does not divide
])
def test_fused_dare_equals_the_drop_then_merge_bit_for_bit(kernel_switch, method, weights, densities, normalize,
                                                          rescale, lam):
    """One fused pass (drop, rescale, weights, election or sum) against the drop and merge done one by one."""
    base, experts = _data()
    merge_chunk = METHODS[method].merge_chunk
    context = TensorContext("w", tuple(base.shape), [{"weight": w, "density": d} for w, d in zip(weights, densities)],
                            {"normalize": normalize, "rescale": rescale, "lambda": lam}, seed=11)
    results = []
    for on in (True, False):
        kernel_switch(on)
        results.append(merge_chunk(context, Chunk(3, base.clone(), [e.clone() for e in experts]), None))
    fused, reference = results
    assert torch.equal(fused.tensor, reference.tensor)
    assert torch.equal(fused.tensor.signbit(), reference.tensor.signbit())
    assert fused.kept == reference.kept
    assert all(0 < k < base.numel() for k, d in zip(fused.kept, densities) if d < 1)
    assert (fused.any_kept, fused.disagreed) == (reference.any_kept, reference.disagreed)
    assert fused.delta_sq == pytest.approx(reference.delta_sq, rel=1e-5)
    assert fused.result_delta_sq == pytest.approx(reference.result_delta_sq, rel=1e-5)
    _assert_norms_of(fused, base)


@needs_kernels
@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@pytest.mark.parametrize("epsilon", [1e-5, 0.008])
def test_fused_ram_equals_the_torch_path_bit_for_bit(kernel_switch, method, epsilon):
    """RAM and RAM+ (its counting pass and its merge) in the kernel, on raw experts and on task vectors already
    made, against the torch path."""
    from mergekit_lite.methods.sparsify import task_vectors

    base, experts = _data()
    spec = METHODS[method]
    context = TensorContext("w", tuple(base.shape), [{}] * 3, {"epsilon": epsilon, "r": 0.5, "alpha": 1e9})
    results = []
    for on, prepared in ((False, False), (True, False), (True, True)):
        kernel_switch(on)
        chunk = Chunk(0, base.clone(), [e.clone() for e in experts])
        if prepared:
            task_vectors(chunk)
        state = spec.prepare(context, lambda: iter([chunk])) if spec.prepare else None
        results.append((state, spec.merge_chunk(context, chunk, state)))
    (expected_state, expected), *fused = results
    if spec.prepare:
        assert len(set(expected_state)) > 1 and all(scale > 1.0 for scale in expected_state)  # no cap reached
    for state, result in fused:
        assert state == expected_state
        assert torch.equal(result.tensor, expected.tensor) and torch.equal(result.tensor.signbit(), expected.tensor.signbit())
        assert result.delta_sq == pytest.approx(expected.delta_sq, rel=1e-5)
        _assert_norms_of(result, base)


@needs_kernels
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("same_chunk", [True, False], ids=["task vectors from the first pass", "re-read experts"])
def test_fused_sce_equals_the_torch_path_bit_for_bit(kernel_switch, select_topk, same_chunk):
    """SCE's merge pass in the kernel against the torch path, after the same selection pass, on the chunk the
    selection turned into task vectors and on a re-read one (a streamed tensor)."""
    base, experts = _data()
    spec = METHODS["sce"]
    context = TensorContext("w", tuple(base.shape), [{}] * 3, {"select_topk": select_topk})
    results = []
    for on in (False, True):
        kernel_switch(on)
        chunk = Chunk(0, base.clone(), [e.clone() for e in experts])
        state = spec.prepare(context, lambda: iter([chunk]))
        if not same_chunk:
            chunk = Chunk(0, base.clone(), [e.clone() for e in experts])
        results.append(spec.merge_chunk(context, chunk, state))
    expected, fused = results
    assert torch.equal(fused.tensor, expected.tensor) and torch.equal(fused.tensor.signbit(), expected.tensor.signbit())
    assert fused.delta_sq == pytest.approx(expected.delta_sq, rel=1e-5)
    _assert_norms_of(fused, base)
    assert torch.equal(expected.tensor, base) == (select_topk == 0.0)  # keeping nothing gives the base back


@needs_kernels
def test_collect_bands_keeps_each_band_in_order(kernel_switch):
    """Several bands in one pass, overlapping ones included, each end included or not, against boolean masks."""
    kernel_switch(True)
    values = torch.randint(0, 50, (300_001,), generator=torch.Generator().manual_seed(3)).float() / 7
    bands = [(2.0, 4.0, True, False), (2.0, 4.0, False, True), (3.0, 6.0, True, True), (0.0, 0.5, False, False)]
    for band, (lo, hi, include_lo, include_hi) in zip(kernels.collect_bands(values, bands), bands):
        low = values >= lo if include_lo else values > lo
        high = values <= hi if include_hi else values < hi
        assert 0 < band.numel() < values.numel() and torch.equal(band, values[low & high])


@needs_kernels
def test_a_compiler_without_per_cpu_clones_gets_a_single_build_with_the_same_bits(tmp_path, kernel_switch,
                                                                                  monkeypatch):
    """On a CPU with AVX-512 or AVX2 the loader picks a wide build of the kernels; a compiler that cannot make
    per-CPU clones gets the single build, which must agree with it bit for bit."""
    compiler = tmp_path / "cc"  # refuses what it cannot build: anything without MERGEKIT_NO_CLONES
    compiler.write_text(f'#!/bin/sh\ncase "$*" in *MERGEKIT_NO_CLONES*) exec {shutil.which(os.environ.get("CC", "cc"))} '
                        '"$@";; *) echo "unknown attribute target_clones" >&2; exit 1;; esac\n')
    compiler.chmod(0o755)
    base, experts = _data(n=90_001)
    outputs = []
    for cc in (None, str(compiler)):  # the usual build (already in the cache), then the refusing compiler's
        if cc is not None:
            monkeypatch.setenv("CC", cc)
            monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "cache"))
        kernel_switch(True)
        assert kernels.library() is not None
        ties_out, ties_stats = kernels.ties_merge(base, [e.clone() for e in experts], False, [0.004, 0.006, 0.0],
                                                  [1.0, 0.5, 2.0], True, 1.0)
        dare_out, dare_stats = kernels.dare_merge(base, [e.clone() for e in experts], [5, 6, 7], [0.3, 0.5, 1.0], True,
                                                  [1.0, 0.5, 2.0], True, True, 1.0)
        drop = experts[0] - base
        kept = kernels.random_drop(drop, 0.4, 9, True)
        stored = STORED_MERGES["ramplus_tl"](base.bfloat16(), [e.bfloat16() for e in experts])
        sce = kernels.sce_merge(base, [e.clone() for e in experts], False, None, 0.0, False, [1.0, 0.5, 2.0], 1e-8)
        deltas = [e.clone() for e in experts]
        magnitudes = kernels.task_vector_magnitudes(base, deltas)
        ranks = kernels.rank_probabilities(deltas[0][:90_000].view(300, 300), 0.2, 0.6)
        gram = kernels.block_gram(deltas, 4096)
        outputs.append((ties_out, ties_stats["kept"], dare_out, dare_stats["kept"], drop, kept, stored[0].view(
            torch.int16), stored[1], sce[0], sce[1], *deltas, *magnitudes[0], magnitudes[1], ranks, gram))
    assert list((tmp_path / "cache").glob("kernels-*.so"))  # the fallback build is the one just compared
    for usual, single in zip(*outputs):
        assert torch.equal(usual, single) if isinstance(usual, torch.Tensor) else usual == single


@needs_kernels
def test_fused_ties_on_raw_experts_equals_prepared_task_vectors(kernel_switch):
    """The merge pass sees raw experts for a streamed tensor and task vectors for a cached one."""
    kernel_switch(True)
    base, experts = _data(n=70_001)
    thresholds, weights = [0.004, 0.006, 0.0], [1.0, 0.5, 2.0]
    raw, _ = kernels.ties_merge(base, [e.clone() for e in experts], False, thresholds, weights, True, 1.0)
    deltas = [e - base for e in experts]
    prepared, _ = kernels.ties_merge(base, deltas, True, thresholds, weights, True, 1.0)
    assert torch.equal(raw, prepared)


@needs_kernels
def test_task_vector_magnitudes_and_bracket_counts(kernel_switch):
    kernel_switch(True)
    base, experts = _data(n=100_000)
    expected = [e - base for e in experts]
    working = [e.clone() for e in experts]
    magnitudes, squares = kernels.task_vector_magnitudes(base, working)
    for got, want, magnitude, square in zip(working, expected, magnitudes, squares):
        assert torch.equal(got, want) and torch.equal(magnitude, want.abs())
        assert square == pytest.approx(float(want.double().pow(2).sum()), rel=1e-6)
    values = magnitudes[2].numpy()
    brackets = [tuple(float(np.quantile(values, q)) for q in qs) for qs in ((0.3, 0.5, 0.7), (0.01, 0.02, 0.9))]
    assert kernels.count_brackets(magnitudes[2], brackets) == [
        [int((values > hi).sum()), int((values > guess).sum()), int((values >= guess).sum()),
         int((values >= lo).sum())] for lo, guess, hi in brackets]


@needs_kernels
@pytest.mark.parametrize("shape", [(300, 1000), (1, 70_000), (5, 3), (2816, 64), (4, 1)])
def test_della_probabilities_equal_the_torch_path_with_ties_in_index_order(kernel_switch, shape):
    from mergekit_lite.methods.sparsify import rank_keep_probabilities

    gen = torch.Generator().manual_seed(shape[0])
    rows = (torch.randn(shape, generator=gen) * 4).round() / 4  # many equal magnitudes, and signed zeros
    rows[0, :2] = torch.tensor([0.0, -0.0])[: rows.shape[1]]
    found = []
    for on in (True, False):
        kernel_switch(on)
        found.append(rank_keep_probabilities(rows, 0.35, 0.15))
    assert torch.equal(found[0], found[1])
    if shape[1] > 1:  # the smallest magnitude of a row gets density - eps, the largest density + eps
        assert torch.allclose(found[0].min(dim=1).values, torch.tensor(0.2)) and torch.allclose(found[0].max(dim=1).values, torch.tensor(0.5))


@needs_kernels
@pytest.mark.parametrize("per_entry, rescale", [(True, True), (True, False), (False, True), (False, False)])
def test_random_drop_equals_the_torch_path(kernel_switch, per_entry, rescale):
    """The draws made in the kernel's threads are uniform_draws' (splitmix64 in torch's wrapping int64), and the
    drop the torch ops'."""
    from mergekit_lite.methods.sparsify import random_keep

    gen = torch.Generator().manual_seed(3)
    values = torch.randn(200_001, generator=gen)
    probability = torch.rand(values.shape, generator=gen) * 0.8 + 0.1 if per_entry else 0.3
    results = []
    for on in (True, False):
        kernel_switch(on)
        dropped = values.clone()
        results.append((random_keep(dropped, probability, 2**63 - 12345, rescale), dropped))
    (kept, fast), (expected_kept, expected) = results
    assert kept == expected_kept and torch.equal(fast, expected) and torch.equal(fast.signbit(), expected.signbit())
    share = kept / values.numel()
    assert abs(share - (float(probability.mean()) if per_entry else 0.3)) < 0.01


def test_uniform_draws_are_uniform_and_depend_on_the_seed():
    from mergekit_lite.methods.sparsify import uniform_draws

    draws = uniform_draws(7, 1_000_000)
    assert 0.0 <= float(draws.min()) and float(draws.max()) < 1.0
    counts = torch.histc(draws, bins=10, min=0.0, max=1.0)
    assert float((counts - 100_000).abs().max()) < 1500  # about 3 standard deviations of a bin
    assert not torch.equal(draws[:1000], uniform_draws(8, 1000))
    assert torch.equal(draws[:1000], uniform_draws(7, 1000))
    assert abs(float(torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1])) < 0.005  # neighbours unrelated


@needs_kernels
def test_widen_bfloat16_is_exact_and_counts_nonfinite(kernel_switch):
    kernel_switch(True)
    raw = torch.randn(150_001).to(torch.bfloat16)
    raw[[7, 90_000, 150_000]] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=torch.bfloat16)
    out = torch.empty(raw.numel())
    assert kernels.widen_bfloat16(raw, out) == 3
    assert torch.equal(out.view(torch.int32), raw.float().view(torch.int32))


@needs_kernels
def test_nearswap_kernel_equals_the_torch_path_bit_for_bit(kernel_switch):
    """float32 chunks, weights strictly between 0 and 1 on about half the entries (torch takes t / x as x's
    reciprocal times t; the kernel must too)."""
    base, experts = _data()
    context = TensorContext("w", tuple(base.shape), [{}], {"t": 0.007})
    results = []
    for on in (True, False):
        kernel_switch(on)
        results.append(METHODS["nearswap"].merge_chunk(context, Chunk(0, base.clone(), [experts[0].clone()]), None))
    fused, reference = results
    partial = ((fused.tensor - base).abs() < (experts[0] - base).abs()) & (fused.tensor != base)
    assert int(partial.sum()) > base.numel() // 4
    assert torch.equal(fused.tensor.view(torch.int32), reference.tensor.view(torch.int32))
    _assert_norms_of(fused, base)


STORED_MERGES = {  # the kernels that also read bfloat16 rows as stored, each on one recipe's settings
    "ram": lambda base, experts: kernels.ram_merge(base, experts, False, 1e-3, None),
    "ramplus_tl": lambda base, experts: kernels.ram_merge(base, experts, False, 1e-3, [1.05, 1.1, 1.2]),
    "dare_ties": lambda base, experts: kernels.dare_merge(base, experts, [1, 2, 3], [0.5, 0.3, 1.0], True,
                                                          [1.0, 0.7, 1.2], True, True, 1.0),
    "dare_linear": lambda base, experts: kernels.dare_merge(base, experts, [1, 2, 3], [0.5, 0.3, 1.0], True,
                                                            [1.0, 0.7, 1.2], False, True, 0.8),
    "task_arithmetic": lambda base, experts: kernels.dare_merge(base, experts, [0, 0, 0], [1.0, 1.0, 1.0], False,
                                                                [1.0, 0.7, 1.2], False, False, 0.9),
    "linear": lambda base, experts: kernels.weighted_sum([base, *experts], [0.4, 1.0, 0.7, 1.2], 3.3),
    "nearswap": lambda base, experts: kernels.nearswap_merge(base, experts[0], 0.007),
}


@needs_kernels
@pytest.mark.parametrize("method", sorted(STORED_MERGES))
def test_kernels_on_bfloat16_rows_as_stored_equal_widening_first(kernel_switch, method):
    """Kernels that read bfloat16 rows as stored and round their result once give the bits of widening every input,
    merging in float32 and rounding as torch does (to nearest, ties to even), with the same counts and norms; and
    they count the NaN and Inf that nothing checked before them."""
    kernel_switch(True)
    merge = STORED_MERGES[method]
    base, experts = _data()
    base16, experts16 = base.bfloat16(), [expert.bfloat16() for expert in experts]
    wide, wide_stats = merge(base16.float(), [e.float() for e in experts16])
    assert wide_stats["nonfinite_inputs"] == 0
    halves = (wide.view(torch.int32) & 0xFFFF) == 0x8000
    if method != "nearswap":  # (its results, on this data, never fall halfway; the rounding is the shared one)
        assert int(halves.sum()) > 0  # results exactly halfway between two bfloat16 values: the ties are exercised
    stored, stats = merge(base16.clone(), [e.clone() for e in experts16])
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.view(torch.int16), wide.bfloat16().view(torch.int16))
    assert stats == wide_stats
    if method == "ramplus_tl":
        assert kernels.ram_counts(base16, experts16, False, 1e-3) == kernels.ram_counts(
            base16.float(), [e.float() for e in experts16], False, 1e-3)
    experts16[0][[5, 70_000]] = torch.tensor([float("nan"), float("-inf")], dtype=torch.bfloat16)
    base16[199_999] = float("inf")
    assert merge(base16, experts16)[1]["nonfinite_inputs"] == 3


def _bfloat16_family(llama_family, tmp_path):
    family = {}
    for name in ("base", "expert1", "expert2", "expert3"):
        family[name] = copy_model(llama_family, name, tmp_path / name,
                                  lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))["edited"]
    return family


@needs_kernels
@pytest.mark.parametrize("method, params", [
    ("ties", {"normalize": True}), ("dare_ties", {}), ("dare_linear", {}), ("della", {"epsilon": 0.1}),
    ("della_linear", {"epsilon": 0.05, "rescale": False}), ("ram", {}), ("ramplus_tl", {"r": 0.5, "alpha": 0.9}),
    ("sce", {"select_topk": 0.4}), ("linear", {}), ("task_arithmetic", {"lambda": 0.9}), ("nearswap", {"t": 0.004}),
])
def test_merge_run_gives_identical_bytes_with_and_without_kernels(tmp_path, llama_family, kernel_switch, monkeypatch,
                                                                   method, params):
    widen = kernels.widen_bfloat16
    family = _bfloat16_family(llama_family, tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", method, family, params=params,
                          model_params=[{"density": 0.5, "weight": 1.0}, {"density": 0.3, "weight": 0.7},
                                        {"density": 0.8, "weight": 1.2}], extra="dtype: bfloat16\nseed: 7\n",
                          base=method != "linear",  # linear as usually written: no base model
                          experts=("expert1",) if METHODS[method].max_models == 1 else ("expert1", "expert2", "expert3"))
    outputs, widened = {}, []
    monkeypatch.setattr(kernels, "widen_bfloat16", lambda raw, out: widened.append(raw.numel()) or widen(raw, out))
    for on in (True, False):
        kernel_switch(on)
        out = tmp_path / f"out_{on}"
        result = run_cli("run", recipe, out, "--quiet")
        assert result.exit_code == 0, result.output
        outputs[on] = load_dir(out)
        if on:  # a method whose kernels read bfloat16 as stored gets its chunks unwidened
            assert (not widened) == METHODS[method].reads_stored, widened
    assert outputs[True].keys() == outputs[False].keys()
    for name, tensor in outputs[True].items():
        assert torch.equal(tensor, outputs[False][name]), name


@needs_kernels
def test_nan_in_a_bfloat16_input_is_refused_on_the_kernel_path(tmp_path, llama_family, kernel_switch):
    kernel_switch(True)

    def poison(tensors):
        tensors.update({k: v.to(torch.bfloat16) for k, v in tensors.items()})
        tensors["model.layers.0.self_attn.q_proj.weight"][2, 3] = float("nan")

    family = copy_model(llama_family, "expert1", tmp_path, poison)
    expect_refusal(tmp_path, recipe_text(family, ("edited", "expert2")), "model.layers.0.self_attn.q_proj.weight",
                   "NaN or Inf", "from row 0", inputs=[family["edited"]])


@needs_kernels
@pytest.mark.parametrize("method, poisoned", [("ram", "expert1"), ("ram", "base"), ("dare_ties", "expert1")])
def test_nan_in_rows_merged_as_stored_is_refused_naming_the_input(tmp_path, llama_family, kernel_switch, method,
                                                                  poisoned):
    """RAM and DARE merge bfloat16 rows as stored, which nothing checked before; their kernels count NaN and Inf,
    and the input that holds them is named, the first expert included, whose rows the result has overwritten."""
    kernel_switch(True)
    family = _bfloat16_family(llama_family, tmp_path)

    def poison(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][2, 3] = float("nan")

    edited = copy_model(family, poisoned, tmp_path, poison)["edited"]
    family[poisoned] = edited
    expect_refusal(tmp_path, recipe_text(family, method=method, extra="dtype: bfloat16\n"),
                   "model.layers.0.self_attn.q_proj.weight", "NaN or Inf", str(edited), "from row 0", inputs=[edited])


def test_without_a_compiler_the_torch_path_merges(tmp_path, llama_family, kernel_switch, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "cache"))
    kernel_switch(True)
    assert kernels.library() is None
    assert not kernels.usable(torch.zeros(3))
    recipe = write_recipe(tmp_path / "r.yaml", "ties", llama_family, model_params=[{"density": 0.5}] * 3)
    result = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_dir(tmp_path / "out")
    assert merged.keys() == load_file(str(next(llama_family["base"].glob("*.safetensors")))).keys()


@needs_kernels
def test_library_is_built_once_into_the_cache(tmp_path, kernel_switch, monkeypatch):
    """The first use builds the library into the cache through a temporary file; later uses load it. The compiler
    here counts its calls and builds by copying the usual cache's library (a real build is what every other test
    here loads, and the single build is compiled for real above)."""
    kernel_switch(True)
    usual = kernels.library()._name
    calls = tmp_path / "calls"
    compiler = tmp_path / "cc"
    compiler.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nwhile [ "$1" != "-o" ]; do shift; done\ncp {usual} "$2"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("MERGEKIT_LITE_CACHE", str(tmp_path / "cache"))
    kernel_switch(True)
    first = kernels.library()
    assert first is not None and first._name != usual
    built = list((tmp_path / "cache").glob("kernels-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cache").glob("tmp*"))
    kernels.library.cache_clear()
    assert kernels.library()._name == str(built[0])
    assert len(calls.read_text().splitlines()) == 1  # built once, loaded twice


@needs_kernels
@pytest.mark.parametrize("count", [1, 2, 3, 4, 6])
def test_fixed_order_gram_is_the_same_with_and_without_kernels(kernel_switch, count):
    """The kernel's block sums are the torch path's cumulative sums, so slerp, model_stock, multislerp and karcher
    weigh their models the same either way; and both are the exact dot products to float64 rounding."""
    from mergekit_lite.methods.base import fixed_order_gram

    gen = torch.Generator().manual_seed(count)
    vectors = [torch.randn(3 * 4096 + 77, generator=gen) for _ in range(count)]
    found = []
    for on in (True, False):
        kernel_switch(on)
        found.append(fixed_order_gram(vectors))
    assert found[0] == found[1]
    exact = [[float(a.double() @ b.double()) for b in vectors] for a in vectors]
    assert np.allclose(found[0], exact, rtol=1e-12)
