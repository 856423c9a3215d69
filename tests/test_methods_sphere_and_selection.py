"""The methods added for mergekit recipes, against naive references written from their definitions on whole
tensors (mergekit itself is compared in test_mergekit_parity.py, when it is installed)."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_lite.methods import METHODS, TensorContext
from mergekit_lite.methods.arcee_fusion import importance


def merged(method: str, base: torch.Tensor | None, models: list[torch.Tensor], params: dict | None = None,
           model_params: list[dict] | None = None) -> torch.Tensor:
    spec = METHODS[method]
    per_model = [{p.name: p.default for p in spec.params if p.scope == "model"} | (model_params[i] if model_params else {})
                 for i in range(len(models))]
    overall = {p.name: p.default for p in spec.params if p.scope == "global"} | (params or {})
    context = TensorContext("model.layers.0.mlp.up_proj.weight", tuple(models[0].shape), per_model, overall)
    return spec.merge(context, base, [m.clone() for m in models]).tensor


@pytest.fixture
def trio():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(12, 9, generator=gen)
    return base, [base + torch.randn(12, 9, generator=gen) * s for s in (0.3, 0.6, 0.45)]


def naive_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    u0, u1 = v0 / v0.norm().clamp(min=1e-7), v1 / v1.norm().clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum().clamp(-1, 1))
    if torch.sin(theta).abs() < 1e-8:
        return (1 - t) * v0 + t * v1
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


@pytest.mark.parametrize("mode", ["flatten", "rows", "row_wise"])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_interpolates_each_vector_on_its_arc(trio, mode, with_base):
    base, (a, b, _) = trio
    weights = [0.25, 0.75]
    params = {"nuslerp_flatten": mode == "flatten", "nuslerp_row_wise": mode == "row_wise"}
    ours = merged("nuslerp", base if with_base else None, [a, b], params, [{"weight": w} for w in weights])
    v0, v1 = (a - base, b - base) if with_base else (a, b)
    t = 0.75
    if mode == "flatten":
        expected = naive_slerp(t, v0.reshape(-1), v1.reshape(-1)).view(v0.shape)
    elif mode == "rows":
        expected = torch.stack([naive_slerp(t, v0[i], v1[i]) for i in range(v0.shape[0])])
    else:
        expected = torch.stack([naive_slerp(t, v0[:, j], v1[:, j]) for j in range(v0.shape[1])], dim=1)
    if with_base:
        expected = expected + base
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def naive_multislerp(vectors: list[torch.Tensor], weights: list[float], eps: float = 1e-8) -> torch.Tensor:
    """The tangent-space algorithm step by step: project to the sphere, take the weighted mean, map back."""
    flat = torch.stack([v.reshape(-1).double() for v in vectors])
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w[:, None]).sum(0)
    length = step.norm() + eps
    result = mean * torch.cos(length) + step * (torch.sin(length) / length)
    return (result * (norms.squeeze(1) * w).sum()).view(vectors[0].shape).float()


def test_multislerp_is_the_tangent_space_mean(trio):
    base, models = trio
    weights = [0.2, 0.5, 0.3]
    ours = merged("multislerp", base, models, model_params=[{"weight": w} for w in weights])
    expected = naive_multislerp([m - base for m in models], weights) + base
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    without_base = merged("multislerp", None, models, model_params=[{"weight": w} for w in weights])
    torch.testing.assert_close(without_base, naive_multislerp(models, weights), rtol=1e-5, atol=1e-5)


def naive_karcher(tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The fixed-point iteration on the tensors themselves."""
    norms = [float(t.norm()) for t in tensors]
    units = [t.double() / n for t, n in zip(tensors, norms)]
    alpha = 1 / len(units)
    u = sum(alpha * x for x in units)
    u = u / u.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for x in units:
            cos = torch.clamp((u * x).sum(), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            step += alpha * (theta / torch.sin(theta)) * (x - cos * u)
        size = step.norm()
        if size < tol:
            break
        u = torch.cos(size) * u + torch.sin(size) * step / size
        u = u / u.norm()
    return (sum(norms) / len(norms) * u).float()


def test_karcher_is_the_riemannian_mean(trio):
    _, models = trio
    ours = merged("karcher", None, models, {"max_iter": 10, "tol": 1e-5})
    torch.testing.assert_close(ours, naive_karcher(models), rtol=1e-5, atol=1e-5)


def test_sce_keeps_the_most_varying_entries_and_weights_by_mean_square(trio):
    base, models = trio
    ours = merged("sce", base, models, {"select_topk": 0.4})
    deltas = torch.stack([m - base for m in models])
    variance = deltas.var(dim=0, unbiased=False)
    k = int(int((variance != 0).sum()) * 0.4)
    mask = torch.zeros_like(variance, dtype=torch.bool)
    mask.view(-1)[torch.argsort(variance.reshape(-1), descending=True)[:k]] = True
    deltas = deltas * mask
    weights = deltas.pow(2).mean(dim=(1, 2))
    weights = weights / weights.sum()
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = (deltas.sign() == majority).float() * weights[:, None, None]
    expected = base + (deltas * agree).sum(0) / agree.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(6)
    models = [torch.tensor([1.0, 0.0, 2.0, 0.0, 1e-7, -1.0]), torch.tensor([0.0, 3.0, 4.0, 0.0, 0.0, 1.0])]
    ours = merged("ram", base, models, {"epsilon": 1e-5})
    torch.testing.assert_close(ours, torch.tensor([1.0, 3.0, 3.0, 0.0, 0.0, 0.0]))


def test_ramplus_raises_unique_changes_by_the_shared_to_unique_ratio():
    base = torch.zeros(6)
    models = [torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 4.0, 3.0, 1.0, 0.0])]
    ours = merged("ramplus_tl", base, models, {"epsilon": 1e-5, "r": 0.5, "alpha": 10.0})
    # model 1: 2 shared, 1 unique -> x(1 + 0.5*2); model 2: 2 shared, 2 unique -> x(1 + 0.5*1)
    torch.testing.assert_close(ours, torch.tensor([2.0, 3.0, 3.0, 4.5, 1.5, 0.0]))


def test_nearswap_moves_by_t_over_the_distance():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.001, 0.5, -2.0, 1.0])
    t = 0.01
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    torch.testing.assert_close(merged("nearswap", base, [other], {"t": t}), weight * other + (1 - weight) * base)


def test_arcee_fusion_takes_changes_whose_importance_is_an_outlier(trio):
    base, (other, *_) = trio
    other = other.clone()
    other[3] += 4.0  # one row changed a lot: its entries are the outliers
    ours = merged("arcee_fusion", base, [other])
    p, q = torch.softmax(other, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (other - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    flat = torch.sort(importance.reshape(-1)).values
    quantile = lambda f: flat[int(f * (flat.numel() - 1))]  # noqa: E731
    cut = quantile(0.5) + 1.5 * (quantile(0.75) - quantile(0.25))
    expected = torch.where(importance >= cut, other, base)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours[3], other[3])  # the changed row is taken whole
    assert not torch.allclose(ours, other)


def test_arcee_fusion_importance_in_two_buffers_has_the_bits_of_the_plain_expression():
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(300, 257, generator=gen)
    other = base + 0.05 * torch.randn(300, 257, generator=gen)
    p, q = torch.softmax(other, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    plain = ((other - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)).reshape(-1)
    out = torch.full((300 * 257,), float("nan"))
    assert torch.equal(importance(base, other, 257), plain)
    assert torch.equal(importance(base, other, 257, out), plain) and torch.equal(out, plain)


def test_passthrough_scales_and_breadcrumbs_ties_elects(trio):
    base, (a, b, _) = trio
    torch.testing.assert_close(merged("passthrough", None, [a], model_params=[{"scale": 0.5}]), a * 0.5)
    torch.testing.assert_close(merged("passthrough", None, [a]), a)
    plain = merged("breadcrumbs", base, [a, b], {"normalize": False}, [{"density": 1.0, "gamma": 0.0}] * 2)
    elected = merged("breadcrumbs_ties", base, [a, b], {"normalize": False}, [{"density": 1.0, "gamma": 0.0}] * 2)
    torch.testing.assert_close(plain, a + b - base)  # nothing dropped: task arithmetic
    da, db = a - base, b - base
    sign = torch.where(da + db >= 0, 1.0, -1.0)
    expected = base + da * (da * sign > 0) + db * (db * sign > 0)
    torch.testing.assert_close(elected, expected)
    assert math.isfinite(float(elected.sum()))
