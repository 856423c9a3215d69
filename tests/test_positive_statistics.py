"""Batch-norm running variances must stay positive whatever the method does to them: a merge that would drive
them to zero or below keeps the reference's values and says so, on two conv-net families."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.examples import make_family
from mergekit_lite.models.loading import load_model
from tests.test_hostile import THREAD_METHODS, method_recipe

runner = CliRunner()


@pytest.fixture(scope="module", params=["test_resnet", "test_efficientnet"])
def shrunk_family(request, tmp_path_factory):
    """A base and three experts whose running variances are a tenth of the base's: task arithmetic at lambda 1
    gives 1 + 3 (0.1 - 1) < 0 for every channel."""
    root = tmp_path_factory.mktemp(request.param)
    family = make_family(root, request.param, experts=3)
    for name in ("expert1", "expert2", "expert3"):
        weights = family[name] / "model.safetensors"
        tensors = load_file(str(weights))
        for key in tensors:
            if key.endswith("running_var"):
                tensors[key] = tensors[key] * 0.1
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return family


def _variances(directory) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(directory / "model.safetensors")).items() if k.endswith("running_var")}


def test_a_merge_that_would_make_variances_negative_keeps_the_bases(tmp_path, shrunk_family):
    recipe = method_recipe(tmp_path / "r.yaml", "task_arithmetic",
                           [shrunk_family[n] for n in ("base", "expert1", "expert2", "expert3")])
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "batch-norm variance" in result.stderr
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    kept = [t for t in report["tensors"] if "kept_from" in t]
    base = _variances(shrunk_family["base"])
    assert kept and {t["name"] for t in kept} == set(base)
    merged = _variances(tmp_path / "out")
    assert all(torch.equal(merged[k], base[k]) for k in base)
    model = load_model(tmp_path / "out")
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("method", THREAD_METHODS + ["ties_model"])
def test_no_method_leaves_a_variance_at_or_below_zero(tmp_path, shrunk_family, method):
    models = [shrunk_family[n] for n in ("base", "expert1", "expert2", "expert3")]
    recipe = method_recipe(tmp_path / "r.yaml", method, models)
    text = recipe.read_text().replace("weight: 1.0", "weight: 1.5")  # extrapolate: the hard case
    recipe.write_text(text)
    assert runner.invoke(app, ["run", str(recipe), str(tmp_path / "out"), "--quiet"]).exit_code == 0
    assert all(bool((v > 0).all()) for v in _variances(tmp_path / "out").values())
    model = load_model(tmp_path / "out")
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_twin_collapse_keeps_variances_positive(tmp_path, shrunk_family):
    """Folding a fixed mix into a plain checkpoint is a merge too."""
    lines = ["merge_method: twin", f"base_model: {shrunk_family['base']}", "models:"]
    for index in (1, 2):
        data = tmp_path / f"t{index}.safetensors"
        save_file({"x": torch.randn(16, 3, 32, 32) + index}, str(data))
        lines += [f"  - model: {shrunk_family[f'expert{index}']}", f"    task: t{index}", f"    data: {{path: {data}}}"]
    lines += ["shared_merge: {merge_method: task_arithmetic, parameters: {lambda: 0.3}}",
              "parameters: {rank: 1.0, router_samples: 16, router_epochs: 2}"]
    recipe = tmp_path / "twin.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    assert runner.invoke(app, ["run", str(recipe), str(tmp_path / "twin"), "--quiet"]).exit_code == 0
    result = runner.invoke(app, ["twin-collapse", str(tmp_path / "twin"), "--weights", "t1=3,t2=3",
                                 "--out", str(tmp_path / "mix")])
    assert result.exit_code == 0, result.output
    assert "variance" in result.stderr
    assert all(bool((v > 0).all()) for v in _variances(tmp_path / "mix").values())
