"""`slices:` (mergekit's layer stacking and per-slice merges): output layers come from the named layer ranges,
renumbered; tensors outside the layers from the first (embeddings) or last (norm, head) slice; the config's
layer count and per-layer lists follow; parameters and gradients resolve per slice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_lite import examples, merge, validate
from mergekit_lite.cli import app
from mergekit_lite.layers import split_layer

runner = CliRunner()


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def renamed(name: str, layer: int) -> str:
    before, _, after = split_layer(name)
    return f"{before}{layer}{after}"


def stack(*parts: tuple[Path, int, int]) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(path), "layer_range": [a, b]}]} for path, a, b in parts]}


def test_stacked_layers_come_from_their_ranges_renumbered(tmp_path, llama_family):
    first, second = llama_family["expert1"], llama_family["expert2"]
    report = merge(stack((first, 0, 2), (second, 1, 2), (first, 0, 1)), tmp_path / "out")
    out, a, b = tensors(tmp_path / "out"), tensors(first), tensors(second)
    expected = {}
    for name in a:
        if split_layer(name) is None:  # embeddings from the first slice's model, norm and head from the last's
            expected[name] = a[name]
            continue
        layer = split_layer(name)[1]
        expected[renamed(name, layer)] = a[name]
        if layer == 1:
            expected[renamed(name, 2)] = b[name]
        if layer == 0:
            expected[renamed(name, 3)] = a[name]
    assert set(out) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(out[name], tensor.float()), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert [row["output_layers"] for row in report["layer_plan"]] == [[0, 2], [2, 3], [3, 4]]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.generate(torch.tensor([[5, 6]]), max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 5)


def test_a_slice_of_several_sources_merges_each_layer_with_its_gradient(tmp_path, llama_family):
    base, e1, e2 = (tensors(llama_family[k]) for k in ("base", "expert1", "expert2"))
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]), "dtype": "float32",
              "slices": [{"sources": [{"model": str(llama_family["base"]), "layer_range": [0, 2]},
                                      {"model": str(llama_family["expert1"]), "layer_range": [0, 2],
                                       "parameters": {"weight": [0.2, 1.0]}},
                                      {"model": str(llama_family["expert2"]), "layer_range": [0, 2]}],
                          "parameters": {"weight": 0.5, "lambda": 0.9}}]}
    merge(recipe, tmp_path / "out")
    out = tensors(tmp_path / "out")
    for name, b in base.items():
        parts = split_layer(name)
        w1 = 0.2 if parts is None else [0.2, 1.0][parts[1]]  # outside the layers: the first point
        expected = b + 0.9 * (w1 * (e1[name] - b) + 0.5 * (e2[name] - b))
        torch.testing.assert_close(out[name], expected.float(), rtol=1e-6, atol=1e-6, msg=name)


def test_gpt2_names_and_tied_heads(tmp_path):
    model = examples.tiny_transformers_model("gpt2")
    source = examples.save_transformers(model, tmp_path / "gpt2")
    merge(stack((source, 0, 2), (source, 0, 2)), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_layer"] == 4
    out = tensors(tmp_path / "out")
    assert "transformer.h.3.attn.c_attn.weight" in out and "lm_head.weight" not in out  # the head stays tied
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    torch.testing.assert_close(out["transformer.h.2.mlp.c_fc.weight"], model.transformer.h[0].mlp.c_fc.weight.detach())


def test_per_layer_lists_in_the_config_follow_the_layers(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      layer_types=["full_attention", "sliding_attention", "full_attention"],
                                      use_sliding_window=True, sliding_window=8)
    source = tmp_path / "qwen"
    transformers.Qwen2ForCausalLM(config).save_pretrained(source)
    merge(stack((source, 1, 3), (source, 0, 2)), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["layer_types"] == ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_validate_and_inspect_show_the_layer_plan(tmp_path, llama_family):
    recipe = stack((llama_family["expert1"], 0, 2), (llama_family["expert2"], 1, 2))
    lines = validate(recipe).lines
    assert any("output layers 0-1 <-" in line and "layers 0-1" in line for line in lines)
    assert any("output layers 2-2 <-" in line for line in lines)
    merge(recipe, tmp_path / "out")
    shown = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert shown.exit_code == 0 and "layer plan:" in shown.stdout and "output layers 2-2" in shown.stdout


@pytest.mark.parametrize("text, needle", [
    ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: M, layer_range: [0, 9]}\n", "reaches past"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: M, layer_range: [0, 2]}\n"
     "      - {model: M, layer_range: [0, 1]}\n", "as many layers"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: M, layer_range: [2, 1]}\n", "first < last"),
    ("merge_method: linear\nmodels: [{model: M}]\nslices:\n  - sources:\n      - {model: M, layer_range: [0, 1]}\n",
     "not both"),
    ("merge_method: pleas\nslices:\n  - sources:\n      - {model: M, layer_range: [0, 1]}\n", "tensor-wise"),
    ("merge_method: ties\nbase_model: B\nslices:\n  - sources:\n      - {model: B, layer_range: [0, 1]}\n"
     "      - {model: M, layer_range: [1, 2]}\nparameters: {trim_scope: model}\n", "trim_scope"),
    ("merge_method: ties\nbase_model: B\nslices:\n  - sources:\n      - {model: M, layer_range: [0, 1]}\n", "needs base"),
])
def test_impossible_slices_are_one_line(tmp_path, llama_family, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("M", str(llama_family["expert1"])).replace("B", str(llama_family["base"])))
    result = runner.invoke(app, ["run", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
