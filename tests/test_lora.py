"""LoRA references (`model: base+adapter`): adapters saved by PEFT itself, applied as tensors are read, give the
tensors PEFT's own merge_and_unload gives."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_lite import examples, merge
from mergekit_lite.cli import app

runner = CliRunner()


def save_adapter(model: torch.nn.Module, directory: Path, seed: int, **settings) -> dict[str, torch.Tensor]:
    """A PEFT LoRA adapter with non-zero B (as after training), saved by PEFT; returns the merged state dict."""
    peft = pytest.importorskip("peft")  # here, not at the top: importing it takes seconds that collection need not pay
    torch.manual_seed(seed)
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**settings))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
        if "modules_to_save" in name:
            parameter.data.add_(torch.randn_like(parameter) * 0.05)
    adapted.save_pretrained(directory)
    return {k: v.clone() for k, v in adapted.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    model = examples.tiny_transformers_model("llama", seed=3)
    return model, examples.save_transformers(model, tmp_path_factory.mktemp("lora") / "base")


def merged_tensors(tmp_path: Path, recipe: dict) -> dict[str, torch.Tensor]:
    merge(recipe, tmp_path / "out")
    return load_file(str(tmp_path / "out" / "model.safetensors"))


def assert_matches(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("settings", [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
     "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}, "modules_to_save": ["lm_head"]},
    {"r": 8, "lora_alpha": 4, "target_modules": ["o_proj", "gate_proj"], "use_rslora": True},
], ids=["plain", "patterns-embedding-saved-head", "rslora"])
def test_an_adapted_model_equals_peft_merge_and_unload(tmp_path, llama_base, settings):
    model, base = llama_base
    expected = save_adapter(model, tmp_path / "adapter", seed=1, **settings)
    ours = merged_tensors(tmp_path, {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'adapter'}"}],
                                     "dtype": "float32"})
    assert_matches(ours, expected)
    changed = [n for n in ours if not torch.equal(ours[n], model.state_dict()[n])]
    assert changed, "the adapter changed nothing"


def test_fan_in_fan_out_layers_get_the_transposed_update(tmp_path):
    model = examples.tiny_transformers_model("gpt2", seed=2)
    base = examples.save_transformers(model, tmp_path / "gpt2")
    expected = save_adapter(model, tmp_path / "adapter", seed=2, r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                            fan_in_fan_out=True)
    ours = merged_tensors(tmp_path, {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'adapter'}"}]})
    assert_matches(ours, expected)


def test_task_arithmetic_over_two_adapters_adds_both_updates(tmp_path, llama_base):
    model, base = llama_base
    targets = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj"]}
    first = save_adapter(model, tmp_path / "a", seed=4, **targets)
    second = save_adapter(model, tmp_path / "b", seed=5, **targets)
    ours = merged_tensors(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
        "models": [{"model": f"{base}+{tmp_path / 'a'}", "parameters": {"weight": 1.0}},
                   {"model": f"{base}+{tmp_path / 'b'}", "parameters": {"weight": 1.0}}]})
    original = model.state_dict()
    for name, tensor in ours.items():
        expected = first[name] + second[name] - original[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_an_adapter_for_another_model_is_one_line_and_writes_nothing(tmp_path, llama_base):
    model, base = llama_base
    other = examples.tiny_transformers_model("gpt2")
    save_adapter(other, tmp_path / "gpt2_adapter", seed=1, r=2, lora_alpha=2, target_modules=["c_attn"],
                 fan_in_fan_out=True)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}+{tmp_path / 'gpt2_adapter'}\n")
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 2 and "the adapter changes" in result.stderr and "another model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_dora_and_missing_adapters_are_refused(tmp_path, llama_base):
    model, base = llama_base
    save_adapter(model, tmp_path / "dora", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    for adapter, needle in ((tmp_path / "dora", "DoRA"), (tmp_path / "nothing_here", "no such file")):
        recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n")
        result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()


def test_methods_that_load_whole_models_refuse_adapters_at_their_line(tmp_path, llama_base):
    _model, base = llama_base
    recipe = write_recipe(tmp_path, f"merge_method: pleas\nmodels:\n  - model: {base}\n  - model: {base}+{tmp_path}/a\n")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2 and "r.yaml:4" in result.stderr and "does not apply LoRA adapters" in result.stderr


def test_the_report_and_card_name_the_reference_as_written(tmp_path, llama_base):
    model, base = llama_base
    save_adapter(model, tmp_path / "adapter", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"])
    reference = f"{base}+{tmp_path / 'adapter'}"
    report = merge({"merge_method": "linear", "models": [{"model": reference}]}, tmp_path / "out")
    assert reference in [entry["model"] for entry in report["recipe"]["models"]]
    assert reference in (tmp_path / "out" / "README.md").read_text()


def test_hub_ids_on_either_side_of_the_plus_resolve_from_the_cache(tmp_path, llama_base):
    from test_hub import _merge

    from tests.fake_hub import cache_repo

    model, base = llama_base
    save_adapter(model, tmp_path / "adapter", seed=1, r=2, lora_alpha=2, target_modules=["q_proj"])
    cache = tmp_path / "hub"
    cache_repo(cache, "org/tiny-base", base, {"main": "a" * 40})
    cache_repo(cache, "org/tiny-adapter", tmp_path / "adapter", {"main": "c" * 40})
    text = "merge_method: linear\nmodels:\n  - model: {}\ndtype: float32\n"
    hub = _merge(tmp_path, text.format("org/tiny-base+org/tiny-adapter"), tmp_path / "hub_out", cache)
    assert hub.returncode == 0, hub.stderr
    local = _merge(tmp_path, text.format(f"{base}+{tmp_path / 'adapter'}"), tmp_path / "local_out", cache)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "hub_out" / "model.safetensors").read_bytes() == \
        (tmp_path / "local_out" / "model.safetensors").read_bytes()
    report = json.loads((tmp_path / "hub_out" / "merge_report.json").read_text())
    assert report["recipe"]["models"][0]["model"] == "org/tiny-base+org/tiny-adapter"
