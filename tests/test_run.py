"""`merge run` end to end on tiny real checkpoints: math, outputs that load, reports, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.dispatch import PIPELINES
from mergekit_lite.methods import METHODS
from tests.conftest import tree_digest

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_recipe(path, method, family, *, params=None, model_params=None, extra="", experts=("expert1", "expert2", "expert3"),
                 base=True):
    lines = [f"merge_method: {method}"]
    if base:
        lines.append(f"base_model: {family['base']}")
    lines.append("models:")
    for i, name in enumerate(experts):
        lines.append(f"  - model: {family[name]}")
        if model_params:
            lines.append(f"    parameters: {json.dumps(model_params[i])}")
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def load_dir(directory):
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def test_task_arithmetic_matches_direct_formula(tmp_path, llama_family):
    weights = [1.0, 0.5, -0.3]
    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", llama_family,
                          params={"lambda": 0.7}, model_params=[{"weight": w} for w in weights])
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    base = load_dir(llama_family["base"])
    experts = [load_dir(llama_family[f"expert{i}"]) for i in (1, 2, 3)]
    merged = load_dir(tmp_path / "out")
    for name, b in base.items():
        expected = b + 0.7 * sum(w * (e[name] - b) for w, e in zip(weights, experts))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def _naive_ties_tensor(base, experts, weights, density, threshold=None):
    trimmed = []
    for e, w in zip(experts, weights):
        delta = e - base
        if threshold is None:
            k = int(density * delta.numel())
            cut = torch.sort(delta.abs().reshape(-1), descending=True).values[k - 1]
        else:
            cut = threshold[len(trimmed)]
        trimmed.append(torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta)) * w)
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == sign
    weight_grid = torch.tensor(weights).reshape(-1, *([1] * base.dim())).expand_as(stacked)
    divisor = (weight_grid * agree).sum(0)
    return base + (stacked * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_ties_matches_direct_computation(tmp_path, llama_family, scope):
    weights = [1.0, 0.6, 1.2]
    recipe = write_recipe(tmp_path / "r.yaml", "ties", llama_family, params={"trim_scope": scope},
                          model_params=[{"weight": w, "density": 0.3} for w in weights])
    result = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    base = load_dir(llama_family["base"])
    experts = [load_dir(llama_family[f"expert{i}"]) for i in (1, 2, 3)]
    merged = load_dir(tmp_path / "out")
    thresholds = None
    if scope == "model":
        thresholds = []
        for e in experts:
            magnitudes = torch.cat([(e[n] - b).abs().reshape(-1) for n, b in base.items()])
            k = int(0.3 * magnitudes.numel())
            thresholds.append(torch.sort(magnitudes, descending=True).values[k - 1])
    for name, b in base.items():
        expected = _naive_ties_tensor(b, [e[name] for e in experts], weights, 0.3, thresholds)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    kept = [entry["kept_fraction"] for entry in report["tensors"]]
    if scope == "tensor":
        assert all(abs(k - 0.3) < 0.05 for row in kept for k in row if True)
    else:
        total = sum(t.numel() for t in base.values())
        overall = sum(row[0] * base[e["name"]].numel() for row, e in zip(kept, report["tensors"])) / total
        assert overall == pytest.approx(int(0.3 * total) / total, abs=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_loads_and_generates(tmp_path, llama_family, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = METHODS[method]
    count = min(spec.max_models or 3, 3)
    experts = ("expert1", "expert2", "expert3")[:count]
    params = {spec.name: 0.01 for spec in spec.params if spec.required}  # nearswap's t
    recipe = write_recipe(tmp_path / "r.yaml", method, llama_family, experts=experts, params=params,
                          base=method not in ("linear", "passthrough"), extra="dtype: bfloat16\n")
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "README.md",
            "merge_recipe.yaml", "merge_report.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("merge", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=256)
    assert generated.shape == (1, ids.shape[1] + 4)
    merged = load_dir(out)
    base = load_dir(llama_family["base"])
    assert set(merged) == set(base)
    changed = [n for n in base if not torch.equal(merged[n].float(), base[n].bfloat16().float())]
    assert changed, "the merge changed nothing"
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and report["schema"] == "mergekit_lite.report/1"
    assert report["output"]["files"][0]["sha256"] and report["peak_memory"]["rss_bytes"] > 0
    assert set(report["timings_seconds"]) >= {"read", "compute", "write", "total"}
    assert "merge" in (out / "README.md").read_text() and method in (out / "README.md").read_text()


def test_dare_is_reproducible_by_seed(tmp_path, llama_family):
    recipe = write_recipe(tmp_path / "r.yaml", "dare_ties", llama_family,
                          model_params=[{"weight": 1.0, "density": 0.3}] * 3)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert run_cli("run", recipe, tmp_path / name, "--seed", seed, "--quiet").exit_code == 0
    read = lambda d: (tmp_path / d / "model.safetensors").read_bytes()  # noqa: E731
    assert read("a") == read("b")
    assert read("a") != read("c")
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["seed"] == 5
    big = [e for e in report["tensors"] if e["shape"] == [257, 32]]
    assert all(abs(k - 0.3) < 0.03 for e in big for k in e["kept_fraction"])


def test_timm_resnet_merge_loads_in_timm(tmp_path, models_dir):
    from mergekit_lite import examples

    family = examples.make_family(models_dir / "resnet_family", "test_resnet", experts=2)
    recipe = write_recipe(tmp_path / "r.yaml", "ties", family, experts=("expert1", "expert2"),
                          model_params=[{"density": 0.5}] * 2)
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    model = examples.tiny_timm_model("test_resnet")
    model.load_state_dict(load_dir(tmp_path / "out"), strict=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "test_resnet"
    # BatchNorm's integer step counter is copied from the base, not averaged
    merged = load_dir(tmp_path / "out")
    counters = [n for n in merged if n.endswith("num_batches_tracked")]
    assert counters and all(merged[n].dtype == torch.int64 for n in counters)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_sharded_output_and_report_elsewhere(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", llama_family, extra=f"output: {tmp_path / 'out'}\n")
    result = run_cli("run", recipe, "--shard-size", "40KB", "--report", tmp_path / "rep.json")
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "out" / "merge_report.json").exists()
    report = json.loads((tmp_path / "rep.json").read_text())
    assert [f["name"] for f in report["output"]["files"]] == [s.name for s in shards]
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_existing_output_is_kept_without_force(tmp_path, llama_family):
    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", llama_family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = run_cli("run", recipe, out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (out / "mine.txt").read_text() == "keep"
    assert run_cli("run", recipe, out, "--force", "--quiet").exit_code == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()


def test_different_architectures_refused(tmp_path, llama_family, gpt2_dir):
    family = dict(llama_family, other=gpt2_dir)
    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", family, experts=("expert1", "other"))
    before = tree_digest(gpt2_dir)
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 2
    assert "is a gpt2 model" in result.stderr and "is a llama model" in result.stderr
    assert not (tmp_path / "out").exists() and tree_digest(gpt2_dir) == before


def test_shape_mismatch_names_tensor(tmp_path, llama_family):
    expert = tmp_path / "reshaped"
    shutil.copytree(llama_family["expert1"], expert)
    tensors = load_file(str(expert / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 32)
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yaml", "ties", dict(llama_family, odd=expert), experts=("expert1", "odd"))
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 2
    assert "model.layers.1.mlp.up_proj.weight" in result.stderr and "[48, 32]" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path, llama_family):
    family = dict(llama_family, ghost=tmp_path / "ghost")
    recipe = write_recipe(tmp_path / "r.yaml", "ties", family, experts=("expert1", "ghost"))
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 2 and "ghost: no such file or directory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_vocab_rows_aligned_and_base_only_tensor_kept(tmp_path, llama_family):
    expert = tmp_path / "bigger_vocab"
    shutil.copytree(llama_family["expert1"], expert)
    tensors = load_file(str(expert / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = torch.cat([tensors["model.embed_tokens.weight"], torch.ones(3, 32)])
    tensors["lm_head.weight"] = torch.cat([tensors["lm_head.weight"], torch.ones(3, 32)])
    del tensors["model.norm.weight"]
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    family = dict(llama_family, big=expert)
    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", family, experts=("big",))
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "vocabulary size differs" in result.stderr and "model.norm.weight: not in" in result.stderr
    merged = load_dir(tmp_path / "out")
    base = load_dir(llama_family["base"])
    torch.testing.assert_close(merged["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"][:257])
    torch.testing.assert_close(merged["model.norm.weight"], base["model.norm.weight"])


def test_validate_and_methods_commands(tmp_path, llama_family):
    recipe = write_recipe(tmp_path / "r.yaml", "ties", llama_family)
    result = run_cli("validate", recipe)
    assert result.exit_code == 0, result.output
    assert "ok: ties over 3 model(s)" in result.stdout and "21 output tensors" in result.stdout
    assert not (tmp_path / "out").exists()
    listing = json.loads(run_cli("methods", "--json").stdout)
    assert set(listing) == set(PIPELINES)
    assert {p["name"] for p in listing["ties"]["parameters"]} >= {"weight", "density", "lambda", "trim_scope"}


def test_no_output_directory_named(tmp_path, llama_family):
    recipe = write_recipe(tmp_path / "r.yaml", "ties", llama_family)
    result = run_cli("run", recipe)
    assert result.exit_code == 2 and "no output directory" in result.stderr


CHUNKED = {  # method (label) -> (method, experts, with base, recipe-wide parameters)
    "ties": ("ties", 3, True, None), "breadcrumbs": ("breadcrumbs", 3, True, None),
    "model_stock": ("model_stock", 3, True, None), "slerp": ("slerp", 1, True, None),
    "task_arithmetic": ("task_arithmetic", 3, True, None), "linear": ("linear", 3, False, None),
    "breadcrumbs_ties": ("breadcrumbs_ties", 3, True, None), "sce": ("sce", 3, True, {"select_topk": 0.3}),
    "ram": ("ram", 3, True, {"epsilon": 0.005}), "ramplus_tl": ("ramplus_tl", 3, True, {"epsilon": 0.005}),
    "nearswap": ("nearswap", 1, True, {"t": 0.005}), "arcee_fusion": ("arcee_fusion", 1, True, None),
    "multislerp": ("multislerp", 3, True, None), "karcher": ("karcher", 3, True, None),
    "nuslerp (whole tensor)": ("nuslerp", 2, True, None),
    "nuslerp (rows)": ("nuslerp", 2, False, {"nuslerp_flatten": False}),
    "nuslerp (row_wise)": ("nuslerp", 2, True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "model_stock filter_wise": ("model_stock", 3, True, {"filter_wise": True}),
    "passthrough": ("passthrough", 1, False, None),
}


@pytest.mark.parametrize("label", sorted(CHUNKED))
def test_small_chunks_give_the_same_merge(tmp_path, llama_family, label, monkeypatch):
    """Streaming a tensor in many row chunks (with whole-tensor statistics gathered first) changes nothing."""
    from mergekit_lite import engine

    method, count, base, params = CHUNKED[label]
    experts = ("expert1", "expert2", "expert3")[:count]
    recipe = write_recipe(tmp_path / "r.yaml", method, llama_family, experts=experts, base=base, params=params)
    assert run_cli("run", recipe, tmp_path / "whole", "--quiet").exit_code == 0
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    assert len(engine.row_chunks((257, 32))) > 50
    result = run_cli("run", recipe, tmp_path / "chunked", "--quiet")
    assert result.exit_code == 0, result.output
    whole, chunked = load_dir(tmp_path / "whole"), load_dir(tmp_path / "chunked")
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-6)


def test_random_methods_in_small_chunks(tmp_path, llama_family, monkeypatch):
    from mergekit_lite import engine

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 100)
    for method in ("dare_ties", "della"):
        recipe = write_recipe(tmp_path / f"{method}.yaml", method, llama_family,
                              model_params=[{"density": 0.5}] * 3)
        result = run_cli("run", recipe, tmp_path / method, "--quiet", "--seed", "3")
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / method / "merge_report.json").read_text())
        big = [e for e in report["tensors"] if e["shape"] == [257, 32]]
        assert all(abs(k - 0.5) < 0.03 for e in big for k in e["kept_fraction"])


def test_tied_expert_head_comes_from_its_embedding(tmp_path, llama_family):
    """An expert saved with tied embeddings (no lm_head.weight) contributes its embedding as the head."""
    expert = tmp_path / "tied"
    shutil.copytree(llama_family["expert1"], expert)
    tensors = load_file(str(expert / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(expert / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((expert / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (expert / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yaml", "task_arithmetic", dict(llama_family, tied=expert), experts=("tied",))
    result = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    merged, base = load_dir(tmp_path / "out"), load_dir(llama_family["base"])
    torch.testing.assert_close(merged["lm_head.weight"], tensors["model.embed_tokens.weight"])
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert not any("lm_head" in w for w in report["warnings"])
    assert not torch.equal(merged["lm_head.weight"], base["lm_head.weight"])


def test_keys_mergekit_ignores_are_warned_about_under_quiet_and_kept_in_the_report(tmp_path, llama_family):
    """A mergekit recipe with keys this method does not use (copied from a model card) runs, says so on stderr
    even with --quiet, and the report keeps the warnings; `merge validate` accepts it too and says the same."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name: my-merge\nmerge_method: task_arithmetic\nbase_model: {llama_family['base']}\n"
                      f"models:\n  - model: {llama_family['expert1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                      f"  - model: {llama_family['expert2']}\n    parameters: {{weight: 1.0}}\n"
                      "parameters: {lambda: 0.5, normalize: 1.0, int8_mask: true}\ndtype: float32\n")
    checked = run_cli("validate", recipe)
    assert checked.exit_code == 0, checked.output
    result = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    for needle in ("model_name: ignored", "task_arithmetic does not use density", "does not use int8_mask",
                   "normalize: 1.0 read as True"):
        assert needle in result.stderr and needle in checked.stderr, needle
        assert any(needle in w for w in report["warnings"]), needle
    assert "density" not in report["recipe"]["models"][0]["parameters"]
    assert report["recipe"]["parameters"] == {"lambda": 0.5, "normalize": True}
    assert result.stdout == ""  # --quiet: nothing but warnings, and those on stderr


def _ties_recipe(tmp_path, family) -> str:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
                      f"  - model: {family['expert1']}\n    parameters: {{density: 0.5}}\n"
                      f"  - model: {family['expert2']}\n    parameters: {{density: 0.5}}\ndtype: float32\n")
    return recipe


def test_mergekit_outputs_config_and_model_card_front_matter(tmp_path, llama_family):
    recipe = _ties_recipe(tmp_path, llama_family)
    assert run_cli("run", recipe, tmp_path / "out", "--quiet").exit_code == 0
    out = tmp_path / "out"
    assert (out / "mergekit_config.yml").read_text() == recipe.read_text() == (out / "merge_recipe.yaml").read_text()
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("base_model:", f'- "{llama_family["base"]}"', f'- "{llama_family["expert1"]}"', "- merge",
                 "- mergekit", "- mergekit_lite", "library_name: transformers"):
        assert line in front, line
    assert (out / "tokenizer_config.json").exists()
    bare = run_cli("run", recipe, tmp_path / "bare", "--quiet", "--no-copy-tokenizer", "--no-write-model-card")
    assert bare.exit_code == 0, bare.output
    assert not (tmp_path / "bare" / "README.md").exists() and not (tmp_path / "bare" / "tokenizer_config.json").exists()
    assert tree_digest(tmp_path / "bare" / "model.safetensors") == tree_digest(out / "model.safetensors")


def test_mergekit_shard_flags_count_parameters_and_a_byte_size_below_every_tensor_is_a_warning(tmp_path, llama_family):
    recipe = _ties_recipe(tmp_path, llama_family)
    whole = run_cli("run", recipe, tmp_path / "whole", "--quiet", "--out-shard-size", "5B")
    assert whole.exit_code == 0, whole.output
    assert sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors")) == ["model.safetensors"]
    split = run_cli("run", recipe, tmp_path / "split", "--quiet", "--out-shard-size", "10K")
    assert split.exit_code == 0 and len(list((tmp_path / "split").glob("model-*.safetensors"))) > 1
    bytes_five = run_cli("run", recipe, tmp_path / "tiny", "--quiet", "--shard-size", "5B")
    assert bytes_five.exit_code == 0 and "each tensor goes in a file of its own" in " ".join(bytes_five.stderr.split())
    report = json.loads((tmp_path / "tiny" / "merge_report.json").read_text())
    assert any("mergekit's --out-shard-size counts parameters" in w for w in report["warnings"])
    bad = run_cli("run", recipe, tmp_path / "bad", "--out-shard-size", "lots")
    assert bad.exit_code == 2 and "--out-shard-size 'lots'" in bad.output and not (tmp_path / "bad").exists()


def test_trust_remote_code_is_refused_and_allow_crimes_merges_other_architectures(tmp_path, llama_family):
    recipe = _ties_recipe(tmp_path, llama_family)
    refused = run_cli("run", recipe, tmp_path / "out", "--trust-remote-code")
    assert refused.exit_code == 2 and "never runs code from a checkpoint" in refused.output
    assert not (tmp_path / "out").exists()
    other = tmp_path / "other"
    shutil.copytree(llama_family["expert2"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    recipe.write_text(recipe.read_text().replace(str(llama_family["expert2"]), str(other)))
    crime = run_cli("run", recipe, tmp_path / "crime", "--quiet")
    assert crime.exit_code == 2 and "--allow-crimes" in crime.output
    allowed = run_cli("run", recipe, tmp_path / "crime", "--quiet", "--allow-crimes", "--lazy-unpickle")
    assert allowed.exit_code == 0, allowed.output
    assert "is a mistral model, merged into a llama model (--allow-crimes)" in " ".join(allowed.stderr.split())
    assert run_cli("run", recipe, tmp_path / "x", "--cuda", "--device", "cpu").exit_code == 2

