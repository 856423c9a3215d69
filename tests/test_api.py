"""The Python API (`from mergekit_lite import merge, validate`): the same checks and outputs as the command."""

from __future__ import annotations

import json

import pytest
import yaml

import mergekit_lite
from mergekit_lite.errors import RecipeError
from mergekit_lite.recipe import Recipe
from mergekit_lite.report import ENVELOPE_KEYS

ENVELOPE = list(ENVELOPE_KEYS)


def _recipe(family) -> dict:
    return {"merge_method": "ties", "base_model": str(family["base"]),
            "models": [{"model": str(family["expert1"]), "parameters": {"density": 0.5}},
                       {"model": str(family["expert2"]), "parameters": {"density": 0.5}}],
            "dtype": "float32"}


def test_merge_from_a_dict_writes_the_output_and_returns_its_report(tmp_path, llama_family):
    report = mergekit_lite.merge(_recipe(llama_family), tmp_path / "out")
    assert list(report)[: len(ENVELOPE)] == ENVELOPE
    written = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert written["output"]["files"] == report["output"]["files"]
    names = {f["name"] for f in report["output"]["files"]}
    assert names and all(name.endswith(".safetensors") for name in names)  # the weights, each with its sha256
    assert report["method"] == "ties" and report["recipe"]["models"][0]["parameters"] == {"density": 0.5}
    assert report["kind_schema"] == "mergekit_lite.report.tensorwise/1"


def test_a_recipe_object_and_a_path_give_the_same_bytes(tmp_path, llama_family):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe(llama_family)))
    mergekit_lite.merge(recipe_file, tmp_path / "a")
    mergekit_lite.merge(Recipe.model_validate(_recipe(llama_family)), tmp_path / "b")
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in shards)


def test_validate_checks_like_the_command(llama_family):
    found = mergekit_lite.validate(_recipe(llama_family))
    assert found.lines and found.lines[0].startswith("ties over 2 model(s)")
    bad = dict(_recipe(llama_family), parameters={"densty": 0.5})
    with pytest.raises(RecipeError, match="unknown parameter for ties"):
        mergekit_lite.validate(bad)
    with pytest.raises(RecipeError, match="a path, a dict or a Recipe"):
        mergekit_lite.validate(42)


def test_the_engine_streams_from_the_plan_without_reading_the_recipe_again(tmp_path, llama_family, monkeypatch):
    """Planning resolves every tensor's parameters (filters, gradients, per model); the merge itself then never
    resolves one again."""
    import mergekit_lite.engine as engine
    from mergekit_lite.dispatch import parse_recipe

    recipe = dict(_recipe(llama_family), parameters={"lambda": [0.5, 1.0]})
    recipe["models"][0]["parameters"] = {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}
    parsed, _ = parse_recipe(yaml.safe_dump(recipe))
    plan = engine.plan_merge(parsed)
    merged = [t for t in plan.tensors if t.merge]
    mlp = next(t for t in merged if "mlp" in t.name)
    other = next(t for t in merged if "mlp" not in t.name and t.name.startswith("model.layers."))
    assert mlp.model_params[0]["density"] == 0.3 and other.model_params[0]["density"] == 0.7
    assert {t.params["lambda"] for t in merged if t.name.startswith("model.layers.")} == {0.5, 1.0}

    def refuse(*args, **kwargs):
        raise AssertionError("the recipe was resolved again while streaming")

    monkeypatch.setattr(engine, "recipe_params", refuse)
    engine.run_merge(plan, tmp_path / "out", device="cpu", force=False, seed=0, shard_bytes=None,
                     finalize=lambda result, writer: None)
    assert any((tmp_path / "out").glob("*.safetensors"))
