"""Twin-Merging on convolutional nets: batch norms folded into task filters, and task lanes (the whole model run
once on a top-1 batch laid out by task, lanes.py), which must give every row what the per-layer path gives it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from mergekit_lite.twin.install import conv_norm_pairs, install_routes
from mergekit_lite.twin.lanes import lane_size, lay_out, pack, split_tasks, unpack
from mergekit_lite.twin.route import set_route
from mergekit_lite.twin.routed import RoutedLinear
from mergekit_lite.twin.routed_conv import RoutedConv2d, single_tap
from mergekit_lite.twin.routed_norms import RoutedBatchNorm2d
from mergekit_lite.twin.router import Router
from mergekit_lite.twin.runtime import TwinModel
from mergekit_lite.twin.store import StackedDelta

TASKS = 3


def _random_deltas(model: torch.nn.Module, tasks: int, seed: int) -> dict[str, StackedDelta]:
    gen, deltas = torch.Generator().manual_seed(seed), {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if tensor.dim() < 2:
            deltas[name] = StackedDelta(tuple(tensor.shape), dense=torch.rand(tasks, *tensor.shape, generator=gen) * 0.1)
        else:
            rows, cols = tensor.shape[0], math.prod(tensor.shape[1:])
            deltas[name] = StackedDelta(tuple(tensor.shape), lefts=torch.randn(tasks, rows, 2, generator=gen) * 0.1,
                                        rights=torch.randn(tasks, 2, cols, generator=gen) * 0.1)
    return deltas


def _routed_resnet(seed: int = 0) -> tuple[torch.nn.Module, dict[str, str]]:
    """timm's test_resnet with batch-norm statistics and gains far from the identity, routed over TASKS tasks."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=5).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.3)
    pairs = conv_norm_pairs(model)
    install_routes(model, _random_deltas(model, TASKS, seed + 1))
    return model, pairs


def _unfold_norms(model: torch.nn.Module) -> None:
    for conv in (m for m in model.modules() if isinstance(m, RoutedConv2d)):
        if conv.norm_after:
            conv.norm_after[0].folded = False
            conv.norm_after = ()


def _twin(model: torch.nn.Module) -> TwinModel:
    return TwinModel(model, Router(4, TASKS), [f"task{t}" for t in range(TASKS)], "stem", 1, [])


def test_a_batch_norm_after_a_conv_is_folded_into_its_task_filters_for_top1_rows():
    """In a ResNet every conv's output is read by one batch norm alone; with top-1 rows the conv applies that
    norm (each task's scale and shift folded into its filters) and the norm passes its input through. The
    outputs must equal the unfolded runtime's, for top-1 rows, a fixed mix and soft rows."""
    model, pairs = _routed_resnet()
    assert len(pairs) == sum(isinstance(m, RoutedConv2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, RoutedConv2d)]
    assert all(conv.norm_after and conv.norm_after[0].folded for conv in convs)
    assert not any(isinstance(m, RoutedBatchNorm2d) for conv in convs for m in conv.children())

    def run(weights: torch.Tensor) -> torch.Tensor:
        set_route(model, weights)
        try:
            return model(x)
        finally:
            set_route(model, None)

    x = torch.randn(7, 1, 16, 16)
    routes = {"top-1": torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 1, 0, 2, 2]), TASKS).float(),
              "fixed mix": torch.tensor([[0.3, 0.7, 0.0]]).expand(7, -1),
              "soft": torch.softmax(torch.randn(7, TASKS), -1)}
    with torch.no_grad():
        folded = {name: run(w) for name, w in routes.items()}
        _unfold_norms(model)
        for name, weights in routes.items():
            torch.testing.assert_close(folded[name], run(weights), rtol=1e-4, atol=1e-4, msg=name)


def test_lane_size_pads_to_the_largest_task_and_refuses_uneven_or_single_task_batches():
    assert lane_size([3, 2, 3]) == 3  # 9 slots for 8 rows
    assert lane_size([4, 0, 3]) == 4  # an absent task still has its (empty) lane: 12 slots for 7 rows
    assert lane_size([5, 0, 0]) is None  # one task: the whole batch runs on its filters anyway
    assert lane_size([4, 0, 1]) is None  # 12 slots for 5 rows: beyond MAX_PADDING (2)
    assert lane_size([10, 6, 4]) == 10


@pytest.mark.parametrize("shape", [(9, 2, 3, 3), (9, 4), (9, 2, 5)])
def test_pack_lays_each_task_in_its_own_lane_and_unpack_gives_the_rows_back_in_order(shape):
    tasks = torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0])
    lanes = lay_out(tasks, TASKS, 4)
    x = torch.randn(shape)
    packed = pack(x, lanes)
    assert packed.shape == (4, TASKS * shape[1], *shape[2:])
    channels = shape[1]
    for task in range(TASKS):  # lane t holds task t's rows, in their order, then padding
        rows = (tasks == task).nonzero().flatten()
        lane = packed[:, task * channels:(task + 1) * channels]
        torch.testing.assert_close(lane[:len(rows)], x[rows])
    torch.testing.assert_close(unpack(packed, lanes), x)
    with pytest.raises(ValueError, match="lanes"):
        unpack(packed[:, :channels * TASKS - 1], lanes)


def test_single_tap_finds_the_one_kernel_position_each_output_reads():
    conv = torch.nn.Conv2d
    assert single_tap(conv(4, 4, 1), 5, 5) == (0, 0)
    assert single_tap(conv(4, 4, 1, stride=2), 5, 5) == (0, 0)
    assert single_tap(conv(4, 4, 3, padding=1), 1, 1) == (1, 1)
    assert single_tap(conv(4, 4, 3, padding=1, stride=2), 1, 1) == (1, 1)
    assert single_tap(conv(4, 4, 3, padding=2, dilation=2), 1, 1) == (1, 1)
    assert single_tap(conv(4, 4, 3, padding=1), 2, 2) is None  # every output reads several taps
    assert single_tap(conv(4, 4, 3, padding=2), 1, 1) is None  # three outputs
    assert single_tap(conv(4, 4, 3, padding="same"), 1, 1) is None


@pytest.mark.parametrize("norms", ["folded", "unfolded"])
@pytest.mark.parametrize("head", ["kept weights", "factors"])
def test_task_lanes_give_every_row_what_the_per_layer_path_gives_it(norms, head):
    """A mixed top-1 batch: the first call runs both ways and checks them; later calls run on lanes (grouped
    convolutions, batch norms per lane, matrix products on the last stages' small maps, the linear head per lane)
    and must match the per-layer path row for row."""
    model, _ = _routed_resnet(seed=2)
    if norms == "unfolded":
        _unfold_norms(model)
    for layer in model.modules():
        if type(layer) is RoutedLinear:
            layer.keep_task_weights = head == "kept weights"
    twin, per_layer = _twin(model), _twin(model)
    per_layer.uses_lanes = False
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 1, 16, 16, generator=gen)
    with torch.no_grad():
        for tasks in ([2, 0, 1, 1, 0, 2, 2, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 1, 0, 1]):  # the second: task 2 absent
            weights = torch.nn.functional.one_hot(torch.tensor(tasks), TASKS).float()
            expected = per_layer(x, weights=weights)
            first = twin(x, weights=weights)
            assert twin.uses_lanes is True
            torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(twin(x, weights=weights), expected, rtol=1e-4, atol=1e-4)
    convs = [m for m in model.modules() if isinstance(m, RoutedConv2d)]
    assert all(getattr(conv, "_lane_filters", None) is not None for conv in convs)
    # 16 px: the last stages' maps have 1-4 positions; their 1x1 convs and their 3x3 convs on a 1x1 map read one tap,
    # the 3x3 convs on 2x2 maps run as one matrix per task
    assert any(getattr(conv, "_lane_taps", None) is not None for conv in convs)
    assert any(getattr(conv, "_lane_maps", None) is not None for conv in convs)


class _ChannelMixer(torch.nn.Module):
    """A conv net that subtracts the mean over channels: lanes would mix tasks there."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        x = self.second(x - x.mean(1, keepdim=True))
        return self.head(x.mean((2, 3)))


def test_a_model_that_mixes_channels_fails_the_lane_check_and_keeps_the_per_layer_path():
    torch.manual_seed(4)
    model = _ChannelMixer().eval()
    install_routes(model, _random_deltas(model, TASKS, 5))
    twin, per_layer = _twin(model), _twin(model)
    per_layer.uses_lanes = False
    x = torch.randn(6, 1, 5, 5)
    weights = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2, 1, 0]), TASKS).float()
    with torch.no_grad():
        torch.testing.assert_close(twin(x, weights=weights), per_layer(x, weights=weights))
        assert twin.uses_lanes is False
        torch.testing.assert_close(twin(x, weights=weights), per_layer(x, weights=weights))


def test_split_tasks_runs_the_largest_tasks_alone_until_the_rest_packs():
    assert split_tasks([3, 2, 3]) == ([], 3)
    assert split_tasks([200, 7, 8, 6]) == ([0], 8)  # the rest: 3 x 8 slots for 21 rows
    assert split_tasks([100, 90, 5, 4, 5]) == ([0, 1], 5)  # 5 lanes (two empty) x 5 slots for 14 rows
    assert split_tasks([100, 90, 5, 4]) is None  # 4 x 5 slots for 9 rows: still beyond MAX_PADDING
    assert split_tasks([7, 1, 0]) == ([0, 1], None)  # one task left: it runs alone too
    assert split_tasks([100, 90, 80, 2, 1, 1, 1, 1]) is None  # would need three alone
    assert split_tasks([0, 5, 0]) == ([1], None)


def test_a_batch_held_mostly_by_one_task_runs_it_alone_and_the_rest_on_lanes():
    model, _ = _routed_resnet(seed=8)
    twin, per_layer = _twin(model), _twin(model)
    per_layer.uses_lanes = False
    tasks = torch.tensor([0] * 14 + [1, 2, 1, 2])[torch.randperm(18, generator=torch.Generator().manual_seed(0))]
    weights = torch.nn.functional.one_hot(tasks, TASKS).float()
    x = torch.randn(18, 1, 16, 16)
    plan = twin._lane_plan(x, weights, {})
    assert [task for task, _ in plan.alone] == [0] and plan.alone[0][1].tolist() == (tasks == 0).nonzero().flatten().tolist()
    assert plan.rest.tolist() == (tasks != 0).nonzero().flatten().tolist() and plan.lanes.size == 2
    with torch.no_grad():
        expected = per_layer(x, weights=weights)
        torch.testing.assert_close(twin(x, weights=weights), expected, rtol=1e-4, atol=1e-4)
        assert twin.uses_lanes is True
        torch.testing.assert_close(twin(x, weights=weights), expected, rtol=1e-4, atol=1e-4)


def test_lanes_are_left_out_for_single_task_soft_and_training_batches_and_large_convolutions():
    model, _ = _routed_resnet(seed=6)
    twin = _twin(model)
    x = torch.randn(8, 1, 16, 16)
    mixed = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), TASKS).float()
    assert twin._lane_plan(x, mixed, {}) is not None
    assert twin._lane_plan(x, torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), TASKS).float(), {}) is None
    assert twin._lane_plan(x, torch.softmax(torch.randn(8, TASKS), -1), {}) is None
    assert twin._lane_plan(x.flatten(1), mixed, {}) is None  # not image-like
    twin.train()
    assert twin._lane_plan(x, mixed, {}) is None
    twin.eval()
    twin.policy = replace(twin.policy, lane_group_macs=twin._conv_macs_per_row(x))  # one row a task is the most
    assert twin._lane_plan(x, mixed, {}) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_task_lanes_on_cuda_match_the_per_layer_path(monkeypatch):
    """Lanes are off on CUDA by default (measured on CPUs only); asked for, they must still be exact there
    (TensorFloat-32 convolutions off: they round at about the check's tolerance)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, _ = _routed_resnet(seed=7)
    model.cuda()
    twin, per_layer = _twin(model).cuda(), _twin(model).cuda()
    twin.lane_devices, per_layer.uses_lanes = ("cuda",), False
    x = torch.randn(12, 1, 16, 16, device="cuda")
    weights = torch.nn.functional.one_hot(torch.arange(12, device="cuda") % TASKS, TASKS).float()
    with torch.no_grad():
        expected = per_layer(x, weights=weights)
        torch.testing.assert_close(twin(x, weights=weights), expected, rtol=1e-3, atol=1e-3)
        assert twin.uses_lanes is True
        torch.testing.assert_close(twin(x, weights=weights), expected, rtol=1e-3, atol=1e-3)


def test_the_cost_policy_reaches_every_routed_conv_and_never_changes_outputs():
    """The CPU heuristics live in one policy object: setting it on the TwinModel sets it on every routed conv, and
    whichever kernels it picks (per-task calls, grouped calls, batched products on small maps), rows get the
    same outputs."""
    model, _ = _routed_resnet(seed=7)
    twin = _twin(model)
    x = torch.randn(12, 1, 16, 16)
    weights = torch.nn.functional.one_hot(torch.arange(12) % TASKS, TASKS).float()
    with torch.no_grad():
        default = twin(x, weights=weights)
        convs = [m for m in twin.routed if isinstance(m, RoutedConv2d)]
        assert convs and all(c.policy is twin.policy for c in convs)
        for policy in (replace(twin.policy, per_task_macs=0.0), replace(twin.policy, few_positions=0),
                       replace(twin.policy, lane_group_macs=0.0)):
            twin.policy = policy
            assert all(c.policy is policy for c in convs)
            assert torch.allclose(twin(x, weights=weights), default, rtol=1e-4, atol=1e-4)
