"""Twin-Merging building blocks: low-rank compression of exclusive knowledge and per-row routed layers."""

from __future__ import annotations

import pytest
import torch

from mergekit_lite.twin import compress
from mergekit_lite.twin.compress import low_rank, rank_for
from mergekit_lite.twin.route import dense_for_row, make_route, task_order
from mergekit_lite.twin.routed import RoutedConv1D, RoutedLinear, keep_task_weights
from mergekit_lite.twin.routed_conv import RoutedConv2d
from mergekit_lite.twin.routed_norms import RoutedBatchNorm2d


def _matrix(m=60, n=40, rank=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(m, n, generator=gen)
    return torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)


def test_full_rank_factors_reproduce_the_delta():
    delta = _matrix()
    factors = low_rank(delta, rank_for(delta.shape, 1.0))
    assert factors.rank == 40
    torch.testing.assert_close(factors.dense(), delta, rtol=1e-4, atol=1e-4)
    assert factors.residual_energy < 1e-6


def test_truncation_is_the_best_rank_r_and_reports_the_energy_left_out():
    delta = _matrix()
    factors = low_rank(delta, 5)
    s = torch.linalg.svdvals(delta.double())
    expected = float((s[5:] ** 2).sum() / (s**2).sum())
    assert factors.residual_energy == pytest.approx(expected, rel=1e-4)
    error = float((delta - factors.dense()).double().pow(2).sum() / delta.double().pow(2).sum())
    assert error == pytest.approx(expected, rel=1e-3)


def test_large_matrices_use_the_randomised_path_and_recover_a_low_rank_delta(monkeypatch):
    monkeypatch.setattr(compress, "_EXACT_ENTRIES", 100)
    called = []
    original = compress._randomised
    monkeypatch.setattr(compress, "_randomised", lambda *a: called.append(1) or original(*a))
    delta = _matrix(300, 200, rank=6)
    factors = low_rank(delta, 6)
    assert called and factors.residual_energy < 1e-6
    torch.testing.assert_close(factors.dense(), delta, rtol=1e-3, atol=1e-3)


def test_a_failing_driver_falls_back_to_float64(monkeypatch):
    original = compress._exact
    calls = []

    def flaky(delta, rank):
        calls.append(delta.dtype)
        if delta.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return original(delta, rank)

    monkeypatch.setattr(compress, "_exact", flaky)
    factors = low_rank(_matrix(), 10)
    assert calls == [torch.float32, torch.float64]
    assert factors.left.dtype == torch.float32 and factors.rank == 10


@pytest.mark.parametrize("rank", [0.1, 0.5, 3, 1000])
def test_rank_from_ratio_or_count(rank):
    value = rank_for((64, 32), rank)
    assert 1 <= value <= 32
    assert value == (round(rank * 32) if isinstance(rank, float) else min(32, rank))


def test_each_row_is_routed_on_its_own_and_equals_the_dense_rebuild():
    torch.manual_seed(0)
    shared = torch.nn.Linear(16, 12)
    factors = [low_rank(torch.randn(12, 16) * 0.1, 4, seed=t) for t in range(3)]
    lefts, rights = torch.stack([f.left for f in factors]), torch.stack([f.right for f in factors])
    layer = RoutedLinear(shared, lefts, rights)
    x = torch.randn(5, 7, 16)  # batch of 5 sequences, 7 tokens each
    route = torch.softmax(torch.randn(5, 3), dim=-1)
    layer.route = make_route(route)
    with torch.no_grad():
        out = layer(x)
        for row in range(5):
            weight = dense_for_row(shared.weight, lefts, rights, route[row])
            torch.testing.assert_close(out[row], x[row] @ weight.T + shared.bias, rtol=1e-5, atol=1e-5)
        layer.route = None
        torch.testing.assert_close(layer(x), shared(x))


def test_soft_routes_run_every_task_at_once_and_equal_the_dense_rebuild():
    """When rows weigh most tasks (soft routing), linear, Conv1D and conv layers take all tasks' factors in one
    product; every row must still see W + sum_t w_t L_t R_t and b + sum_t w_t db_t."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(4)
    tasks, rank = 3, 2
    route = torch.softmax(torch.randn(5, tasks), dim=-1)
    route[1, 2] = 0.0  # a row that skips a task: still dense enough overall
    assert make_route(route).dense()
    linear = RoutedLinear(torch.nn.Linear(8, 6), torch.randn(tasks, 6, rank), torch.randn(tasks, rank, 8),
                          torch.randn(tasks, 6))
    conv1d = RoutedConv1D(Conv1D(6, 8), torch.randn(tasks, 8, rank), torch.randn(tasks, rank, 6), torch.randn(tasks, 6))
    conv = RoutedConv2d(torch.nn.Conv2d(4, 5, 3, padding=1, stride=2), torch.randn(tasks, 5, rank),
                        torch.randn(tasks, rank, 36), torch.randn(tasks, 5))
    cases = ((linear, torch.randn(5, 3, 8)), (conv1d, torch.randn(5, 3, 8)), (conv, torch.randn(5, 4, 7, 7)))
    with torch.no_grad():
        for layer, x in cases:
            layer.route = make_route(route)
            out = layer(x)
            shared = layer.shared
            for row in range(5):
                weight = dense_for_row(shared.weight, layer.lefts, layer.rights, route[row])
                bias = shared.bias + route[row] @ layer.bias_deltas
                if isinstance(layer, RoutedConv2d):
                    expected = torch.nn.functional.conv2d(x[row:row + 1], weight, bias, 2, 1)[0]
                elif isinstance(layer, RoutedConv1D):
                    expected = x[row] @ weight + bias
                else:
                    expected = x[row] @ weight.T + bias
                torch.testing.assert_close(out[row], expected, rtol=1e-4, atol=1e-4)
        assert conv.stacked_filters()[0] is conv.stacked_filters()[0]  # formed once, kept between batches


def test_sparse_routes_touch_only_their_rows():
    """A top-1 route computes each task's update on its own rows; rows with no task get the shared output."""
    torch.manual_seed(2)
    shared = torch.nn.Linear(8, 6)
    lefts, rights = torch.randn(2, 6, 3), torch.randn(2, 3, 8)
    layer = RoutedLinear(shared, lefts, rights, torch.randn(2, 6))
    x = torch.randn(4, 8)
    layer.route = make_route(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.5]]))
    with torch.no_grad():
        out = layer(x)
        expected = [x[0] @ dense_for_row(shared.weight, lefts, rights, torch.tensor([1.0, 0.0])).T + shared.bias
                    + layer.bias_deltas[0],
                    x[1] @ dense_for_row(shared.weight, lefts, rights, torch.tensor([0.0, 1.0])).T + shared.bias
                    + layer.bias_deltas[1],
                    shared(x[2]),
                    x[3] @ dense_for_row(shared.weight, lefts, rights, torch.tensor([0.0, 0.5])).T + shared.bias
                    + 0.5 * layer.bias_deltas[1]]
    for row in range(4):
        torch.testing.assert_close(out[row], expected[row], rtol=1e-5, atol=1e-5)


def test_one_hot_route_with_full_rank_gives_the_expert_back():
    torch.manual_seed(1)
    shared = torch.nn.Linear(10, 8)
    experts = [shared.weight.detach() + torch.randn(8, 10) * 0.05 for _ in range(2)]
    factors = [low_rank(e - shared.weight.detach(), 8) for e in experts]
    layer = RoutedLinear(shared, torch.stack([f.left for f in factors]), torch.stack([f.right for f in factors]))
    x = torch.randn(4, 10)
    layer.route = make_route(torch.tensor([[0.0, 1.0]] * 4))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ experts[1].T + shared.bias, rtol=1e-4, atol=1e-5)


def test_rows_grouped_by_task_run_on_slices_with_the_same_result():
    """Top-1 rows sorted by task become spans (slices, no gathers); linear and conv layers give the same rows as
    the gathered path, and a conv's per-task filters are formed once and kept."""
    torch.manual_seed(3)
    tasks = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    weights = torch.nn.functional.one_hot(tasks, 3).float()
    order = task_order(weights)
    assert order is not None and task_order(weights[order]) is None  # sorted already
    assert task_order(torch.softmax(torch.randn(7, 3), -1)) is None and task_order(weights[:1]) is None
    scattered, grouped = make_route(weights), make_route(weights[order])
    assert scattered.spans is None and [t for t, _, _ in grouped.spans] == [0, 1, 2]
    assert [(t, rows.tolist(), scale) for t, rows, scale in scattered.groups] == \
        [(t, (tasks == t).nonzero().flatten().tolist(), None) for t in range(3)]
    assert [(s, e) for _, s, e in grouped.spans] == [(0, 2), (2, 4), (4, 7)]
    linear = RoutedLinear(torch.nn.Linear(8, 6), torch.randn(3, 6, 2), torch.randn(3, 2, 8), torch.randn(3, 6))
    conv = RoutedConv2d(torch.nn.Conv2d(4, 5, 3, padding=1), torch.randn(3, 5, 2) * 0.1, torch.randn(3, 2, 36) * 0.1)
    for layer, x in ((linear, torch.randn(7, 3, 8)), (conv, torch.randn(7, 4, 6, 6))):
        with torch.no_grad():
            layer.route = scattered
            expected = layer(x)
            layer.route = grouped
            got = layer(x[order])
        torch.testing.assert_close(got, expected[order], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert conv.task_filters() is conv.task_filters()
    conv._filters = None
    assert conv.task_filters().requires_grad and conv._filters is None  # a graph is never kept between calls
    shared = torch.nn.BatchNorm2d(4).eval()
    shared.running_mean.uniform_(-1, 1), shared.running_var.uniform_(0.5, 2)
    deltas = {"weight": torch.randn(3, 4) * 0.1, "running_var": torch.rand(3, 4) * 0.1}
    norm, x = RoutedBatchNorm2d(shared, deltas), torch.randn(7, 4, 5, 5)
    norm.route = scattered
    with torch.no_grad():
        got = norm(x)
        for row, task in enumerate(tasks.tolist()):  # the norm each row's expert has
            expert = torch.nn.BatchNorm2d(4).eval()
            expert.load_state_dict(shared.state_dict())
            expert.weight += deltas["weight"][task]
            expert.running_var += deltas["running_var"][task]
            torch.testing.assert_close(got[row], expert(x[row: row + 1])[0], rtol=1e-5, atol=1e-5)


def test_kept_task_weights_give_the_factor_paths_rows_and_go_to_the_smallest_layers_first():
    """Top-1 rows grouped by task through each task's kept weight W + L_t R_t (and bias) equal the shared layer
    plus the factors, for nn.Linear and GPT-2's Conv1D, with and without biases; rows not grouped take the factor
    path. The budget goes to the smallest layers first and is never exceeded."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    tasks = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    order = tasks.argsort(stable=True)
    grouped = make_route(torch.nn.functional.one_hot(tasks[order], 3).float())
    assert grouped.spans is not None
    layers = [RoutedLinear(torch.nn.Linear(8, 6), torch.randn(3, 6, 2), torch.randn(3, 2, 8), torch.randn(3, 6)),
              RoutedLinear(torch.nn.Linear(8, 6, bias=False), torch.randn(3, 6, 2), torch.randn(3, 2, 8)),
              RoutedConv1D(Conv1D(6, 8), torch.randn(3, 8, 2), torch.randn(3, 2, 6), torch.randn(3, 6))]
    x = torch.randn(7, 3, 8)
    with torch.no_grad():
        for layer in layers:
            layer.route = grouped
            expected = layer(x[order])
            layer.keep_task_weights = True
            got = layer(x[order])
            assert getattr(layer, "_task_weights", None) is not None  # the kept-weight path ran
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert layer.per_task_weights()[0] is layer.per_task_weights()[0]  # formed once, kept between batches
            layer.route = make_route(torch.nn.functional.one_hot(tasks, 3).float())  # not grouped: factor path
            torch.testing.assert_close(layer(x)[order], got, rtol=1e-5, atol=1e-5)

    model = torch.nn.Sequential(
        RoutedLinear(torch.nn.Linear(64, 64), torch.randn(3, 64, 2), torch.randn(3, 2, 64)),  # 48 KiB kept
        RoutedLinear(torch.nn.Linear(8, 8), torch.randn(3, 8, 2), torch.randn(3, 2, 8)),  # 768 bytes
        RoutedLinear(torch.nn.Linear(16, 16), torch.randn(3, 16, 2), torch.randn(3, 2, 16)))  # 3 KiB
    assert keep_task_weights(model, 4096) == (2, 768 + 3072)
    assert [layer.keep_task_weights for layer in model] == [False, True, True]
    assert keep_task_weights(model, 1 << 20) == (3, 768 + 3072 + 49152)
    assert keep_task_weights(model, 0) == (0, 0) and not any(layer.keep_task_weights for layer in model)


def test_top1_rows_on_small_maps_take_one_stacked_convolution_and_equal_the_dense_rebuild():
    """On maps with a few positions a row, top-1 rows of a small conv run through one convolution with the shared
    filters and every R_t (no batch split); each row must still see its own task's W + L_t R_t and bias."""
    torch.manual_seed(6)
    tasks, rank = 3, 2
    conv = RoutedConv2d(torch.nn.Conv2d(4, 8, 3, padding=1, stride=2), torch.randn(tasks, 8, rank),
                        torch.randn(tasks, rank, 36), torch.randn(tasks, 8))
    rows = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    conv.route = make_route(torch.nn.functional.one_hot(rows, tasks).float())
    x = torch.randn(7, 4, 3, 3)  # 2 x 2 output positions
    with torch.no_grad():
        out = conv(x)
        assert getattr(conv, "_stacked_filters", None) is not None  # the one-convolution path ran
        for row, task in enumerate(rows.tolist()):
            weight = dense_for_row(conv.shared.weight, conv.lefts, conv.rights, torch.eye(tasks)[task])
            expected = torch.nn.functional.conv2d(x[row:row + 1], weight, conv.shared.bias + conv.bias_deltas[task], 2, 1)
            torch.testing.assert_close(out[row], expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_packed_gpu_path_equals_the_per_task_path():
    torch.manual_seed(3)
    shared = torch.nn.Linear(16, 12).cuda()
    layer = RoutedLinear(shared, torch.randn(3, 12, 4).cuda(), torch.randn(3, 4, 16).cuda(), torch.randn(3, 12).cuda())
    x = torch.randn(7, 5, 16).cuda()
    route = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 1, 0, 1, 2]), 3).float().cuda()
    layer.route = make_route(route)
    with torch.no_grad():
        packed = layer(x)
        expected = torch.stack([x[i] @ dense_for_row(shared.weight, layer.lefts, layer.rights, route[i]).T + shared.bias
                                + route[i] @ layer.bias_deltas for i in range(7)])
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=1e-4)


def test_pooled_image_features_are_each_channels_mean_and_standard_deviation():
    from mergekit_lite.twin.router import pool

    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 12, 12, generator=gen) * torch.linspace(0.2, 4.0, 5).view(1, 5, 1, 1) + 6.0
    expected = torch.cat([maps.mean((2, 3)), maps.std((2, 3), correction=0)], dim=1)
    assert torch.allclose(pool(maps), expected, rtol=1e-4, atol=1e-5)


SHAPES = [(257, 128), (128, 344), (344, 128), (64, 128), (128, 128), (3, 5000)]


@pytest.mark.parametrize("share", [0.05, 0.2, 0.25, 0.6])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_the_budget_ratio_is_the_largest_that_fits(share, itemsize):
    from mergekit_lite.twin.ranks import ratio_for_budget, stored_bytes

    tasks = 4
    budget = share * tasks * sum(m * n for m, n in SHAPES) * 4  # the dense float32 deltas' bytes
    ratio = ratio_for_budget(SHAPES, tasks, itemsize, budget)
    assert stored_bytes(SHAPES, ratio, tasks, itemsize) <= budget
    # the ratio sits at the edge: the least larger one already stores more than the budget
    assert ratio == 1.0 or stored_bytes(SHAPES, ratio + 1e-6, tasks, itemsize) > budget


def test_the_budget_ratio_keeps_one_direction_when_even_that_is_over():
    from mergekit_lite.twin.ranks import ratio_for_budget

    ratio = ratio_for_budget(SHAPES, 4, 4, 10.0)
    assert all(rank_for(shape, ratio) == 1 for shape in SHAPES)
    assert ratio_for_budget(SHAPES, 4, 4, 1e12) == 1.0


def test_router_candidate_sites_are_stem_the_first_half_of_the_blocks_and_final():
    import transformers

    from mergekit_lite.twin.router import (
        candidate_sites,
        pooled_features,
        pooled_features_at,
    )

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=5,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).eval()
    sites = candidate_sites(model)
    assert sites == ["stem", "model.layers.0", "model.layers.1", "model.layers.2", "final"]
    x = torch.randint(0, 50, (3, 7))
    together = pooled_features_at(model, sites, x)
    for site in sites:  # one pass for all sites gives what each site's own early-stopping pass gives
        torch.testing.assert_close(together[site], pooled_features(model, site, x))
    assert candidate_sites(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))) == ["stem", "final"]


def test_sequence_pooling_takes_the_maximum_over_unpadded_positions_only():
    from mergekit_lite.twin.router import pool

    hidden = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]]])  # the third position is padding
    mask = torch.tensor([[1, 1, 0]])
    pooled = pool(hidden, mask, sequence_max=True)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, -1.0, 1.0, 1.0, 3.0, 0.0]]))
    assert pool(hidden, mask).shape == (1, 4)  # without it: mean and standard deviation only
    empty = pool(hidden, torch.zeros(1, 3, dtype=torch.long), sequence_max=True)
    assert torch.isfinite(empty).all()
