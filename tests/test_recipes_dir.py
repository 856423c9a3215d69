"""Every example recipe under recipes/ validates and merges against the demo checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergekit_lite import examples
from mergekit_lite.cli import app

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_root")
    examples.make_family(root / "demo" / "models", "llama", experts=3)
    examples.task_texts(root / "demo" / "models" / "data")
    examples.make_family(root / "demo" / "models_resnet", "test_resnet", experts=1)
    return root


def test_there_is_a_recipe_per_method():
    from mergekit_lite.dispatch import PIPELINES

    named = {p.read_text().split("merge_method:")[1].split()[0] for p in RECIPES}
    assert named == set(PIPELINES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates_and_runs(recipe, demo_root, monkeypatch, tmp_path):
    monkeypatch.chdir(demo_root)
    assert runner.invoke(app, ["validate", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    weights = "shared/model.safetensors" if "merge_method: twin" in recipe.read_text() else "model.safetensors"
    assert (tmp_path / "out" / weights).is_file()
