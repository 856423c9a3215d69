"""Failure matrix for `merge run`: each case checks the message, the exit code, that nothing appears at the
output path and that no input changed; plus property-based tests that no traceback reaches the user."""

from __future__ import annotations

import errno
import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.checkpoint import writer as writer_module
from mergekit_lite.checkpoint.safetensors_format import read_header
from mergekit_lite.checkpoint.writer import partial_dir
from mergekit_lite.cli import app
from mergekit_lite.errors import CheckpointError, RecipeError
from mergekit_lite.dispatch import parse_recipe
from tests.conftest import tree_digest

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def recipe_text(family: dict, experts=("expert1", "expert2"), method: str = "ties", extra: str = "") -> str:
    lines = [f"merge_method: {method}", f"base_model: {family['base']}", "models:"]
    params = "{weight: 1.0}" if method == "task_arithmetic" else "{weight: 1.0, density: 0.5}"
    for name in experts:
        lines += [f"  - model: {family[name]}", f"    parameters: {params}"]
    return "\n".join(lines) + "\n" + extra


def copy_model(family: dict, name: str, tmp_path, edit) -> dict:
    """A copy of one model of the family with its tensors edited by `edit(dict)`."""
    target = tmp_path / f"edited_{name}"
    shutil.copytree(family[name], target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return dict(family, edited=target)


def expect_refusal(tmp_path, text: str, *needles: str, inputs=()) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    before = [tree_digest(p) for p in inputs]
    out = tmp_path / "out"
    result = run_cli("run", recipe, out)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.startswith("error:")
    for needle in needles:
        assert needle in result.stderr.replace("\n", ""), (needle, result.stderr)
    assert not out.exists() and not partial_dir(out).exists()
    assert [tree_digest(p) for p in inputs] == before


def test_nan_in_an_input_is_refused_naming_the_tensor(tmp_path, llama_family):
    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")

    family = copy_model(llama_family, "expert2", tmp_path, poison)
    expect_refusal(tmp_path, recipe_text(family, ("expert1", "edited")), "model.layers.1.mlp.up_proj.weight",
                   "NaN or Inf", str(family["edited"]), inputs=[family["edited"]])


def test_inf_in_the_base_is_refused(tmp_path, llama_family):
    def poison(tensors):
        tensors["model.norm.weight"][0] = float("inf")

    family = copy_model(llama_family, "base", tmp_path, poison)
    family["base"] = family["edited"]
    expect_refusal(tmp_path, recipe_text(family), "model.norm.weight", "NaN or Inf")


def test_mixed_dtypes_merge_in_float32(tmp_path, llama_family):
    family = copy_model(llama_family, "expert1", tmp_path, lambda t: t.update({k: v.half() for k, v in t.items()}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, ("edited", "expert2"), "task_arithmetic"))
    result = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(llama_family["base"] / "model.safetensors"))
    e1 = load_file(str(family["edited"] / "model.safetensors"))
    e2 = load_file(str(llama_family["expert2"] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == torch.float32  # the base's dtype
    expected = base[name] + (e1[name].float() - base[name]) + (e2[name] - base[name])
    torch.testing.assert_close(merged[name], expected)


@pytest.mark.parametrize("mangle, needle", [
    (lambda data: data[: len(data) - 100], "truncated"),
    (lambda data: b"", "too short"),
    (lambda data: data[:8] + b"{" * 20 + data[28:], "not valid JSON"),
    (lambda data: struct.pack("<Q", 10**15) + data[8:], "header claims"),
])
def test_corrupt_input_refused_by_run(tmp_path, llama_family, mangle, needle):
    target = tmp_path / "broken"
    shutil.copytree(llama_family["expert1"], target)
    weights = target / "model.safetensors"
    weights.write_bytes(mangle(weights.read_bytes()))
    family = dict(llama_family, broken=target)
    expect_refusal(tmp_path, recipe_text(family, ("broken", "expert2")), needle, "broken", inputs=[target])


def test_output_path_that_is_a_file(tmp_path, llama_family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(llama_family))
    out = tmp_path / "out"
    out.write_text("precious")
    result = run_cli("run", recipe, out)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert out.read_text() == "precious"
    assert run_cli("run", recipe, out, "--force", "--quiet").exit_code == 0
    assert (out / "model.safetensors").is_file()


def test_output_parent_missing_or_a_file(tmp_path, llama_family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(llama_family))
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "no" / "such" / "out", tmp_path / "afile" / "out"):
        result = run_cli("run", recipe, out)
        assert result.exit_code == 2 and "parent directory" in result.stderr


def test_output_directory_not_writable(tmp_path, llama_family, monkeypatch):
    """Permissions are checked before any work (simulated: the test runs as root, which ignores them)."""
    import os

    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(llama_family))
    parent = tmp_path / "locked"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(parent.absolute()) else real_access(path, mode))
    result = run_cli("run", recipe, parent / "out")
    assert result.exit_code == 2 and "not writable" in result.stderr
    assert list(parent.iterdir()) == []


def test_full_disk_keeps_work_for_resume(tmp_path, llama_family, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(llama_family, method="task_arithmetic"))
    assert run_cli("run", recipe, tmp_path / "reference", "--quiet").exit_code == 0
    real_write = writer_module._write_all
    calls = {"n": 0}

    def filling_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data, offset)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(writer_module, "_write_all", filling_disk)
        result = run_cli("run", recipe, out)
    assert result.exit_code == 2 and "No space left on device" in result.stderr and "--resume" in result.stderr
    assert not out.exists() and partial_dir(out).exists()
    assert run_cli("run", recipe, out, "--resume", "--quiet").exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()


def test_same_recipe_and_seed_are_byte_identical_and_hashed(tmp_path, llama_family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(llama_family, method="della", extra="seed: 4\n"))
    for name in ("a", "b"):
        assert run_cli("run", recipe, tmp_path / name, "--quiet").exit_code == 0
    reports = [json.loads((tmp_path / n / "merge_report.json").read_text()) for n in ("a", "b")]
    hashes = [[f["sha256"] for f in r["output"]["files"]] for r in reports]
    assert hashes[0] == hashes[1]
    import hashlib

    assert hashes[0][0] == hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()


# Property-based: whatever the recipe text or header bytes, the user sees an error of ours, never a traceback.

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)),
    max_leaves=8,
)
recipe_keys = st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                               "tokenizer_source", "seed", "shard_size", "slices", "bogus"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(recipe_keys, yaml_values, max_size=6))
def test_any_recipe_structure_gives_recipe_error_or_recipe(data):
    import yaml

    text = yaml.safe_dump(data)
    try:
        parse_recipe(text)
    except RecipeError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_recipe_text_gives_recipe_error_or_recipe(text):
    try:
        parse_recipe(text)
    except RecipeError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 400), value=st.integers(0, 255), cut=st.integers(0, 600))
def test_corrupted_headers_give_checkpoint_error(tmp_path_factory, position, value, cut):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    directory = tmp_path_factory.mktemp("hdr")
    path = directory / "model.safetensors"
    save_file(tensors, str(path))
    data = bytearray(path.read_bytes())
    data[min(position, len(data) - 1)] = value
    path.write_bytes(bytes(data[: len(data) - cut] if cut < len(data) else data))
    try:
        header = read_header(path)
        for name in header.tensors:  # whatever parses must also read back, or fail cleanly
            from mergekit_lite.checkpoint import open_checkpoint

            open_checkpoint(path).read_rows(name, 0, header.tensors[name].shape[0] if header.tensors[name].shape else 1)
    except CheckpointError:
        pass


def test_cli_never_shows_a_traceback_for_garbage_recipes(tmp_path):
    for index, text in enumerate(["", "[", "merge_method: 7", "models: 3\nmerge_method: ties", "\x00\x01", "a: b: c"]):
        recipe = tmp_path / f"r{index}.yaml"
        recipe.write_text(text)
        result = run_cli("run", recipe, tmp_path / "out")
        assert result.exit_code == 2, (text, result.output)
        assert "Traceback" not in result.output
        assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


def test_a_config_cannot_point_the_tool_elsewhere(tmp_path, llama_family):
    """Paths inside a checkpoint's config or tokenizer files are not followed; only known names are copied."""
    sentinel = tmp_path / "secret.txt"
    sentinel.write_text("SENTINEL-CONTENT")
    base = tmp_path / "base"
    shutil.copytree(llama_family["base"], base)
    config = json.loads((base / "config.json").read_text())
    config.update(tokenizer_file=str(sentinel), auto_map={"AutoModel": "../secret.txt"}, output_dir=str(tmp_path / "x"))
    (base / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_file"] = str(sentinel)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    family = dict(llama_family, base=base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, method="task_arithmetic"))
    result = run_cli("run", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "x").exists()
    for file in (tmp_path / "out").iterdir():
        assert b"SENTINEL-CONTENT" not in file.read_bytes()
    allowed = {"model.safetensors", "config.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "generation_config.json", "README.md", "merge_recipe.yaml", "mergekit_config.yml", "merge_report.json"}
    assert {p.name for p in (tmp_path / "out").iterdir()} <= allowed
