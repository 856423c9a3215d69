"""`merge inspect`: output for good checkpoints, and one clear line with exit code 2 for each bad input."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mergekit_lite.cli import app
from tests.conftest import tree_digest

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_inspect_json(llama_family):
    result = invoke("inspect", llama_family["base"], "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["tensor_count"] == 21 and summary["layers"] == 2
    assert summary["dtypes"]["float32"]["tensors"] == 21
    assert summary["largest_tensors"][0]["shape"] in ([257, 32], [32, 257])


def test_inspect_human_and_tensor_list(llama_sharded):
    result = invoke("inspect", llama_sharded, "--tensors")
    assert result.exit_code == 0, result.output
    assert "safetensors-sharded" in result.stdout
    assert "model.layers.1.mlp.down_proj.weight" in result.stdout
    assert "all tensors" in result.stdout


def test_inspect_against(llama_family):
    result = invoke("inspect", llama_family["base"], "--against", llama_family["expert2"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["tensors"]) == 21 and report["relative_diff"] > 0
    human = invoke("inspect", llama_family["base"], "--against", llama_family["expert2"])
    assert "per layer" in human.stdout and "most changed" in human.stdout


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert "Traceback" not in result.output
    assert message.startswith("error:"), message
    for needle in needles:
        assert needle in message.replace("\n", ""), (needle, message)


def test_missing_path(tmp_path):
    _assert_user_error(invoke("inspect", tmp_path / "nope"), "nope", "no such file or directory")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _assert_user_error(invoke("inspect", tmp_path), "no weights found")


@pytest.mark.parametrize(
    "mangle, needle",
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: b"", "too short"),
        (lambda data: data[:8] + b"\xff" * 16 + data[24:], "not valid JSON"),
        (lambda data: struct.pack("<Q", 2**62) + data[8:], "header claims"),
    ],
    ids=["truncated", "zero_length", "corrupt_header", "absurd_header_size"],
)
def test_corrupt_safetensors(tmp_path, llama_family, mangle, needle):
    ckpt = _copy(llama_family["base"], tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(mangle(weights.read_bytes()))
    before = tree_digest(ckpt)
    _assert_user_error(invoke("inspect", ckpt), "model.safetensors", needle)
    assert tree_digest(ckpt) == before


def test_index_names_missing_shard(tmp_path, llama_sharded):
    ckpt = _copy(llama_sharded, tmp_path / "ckpt")
    victim = sorted(ckpt.glob("model-*.safetensors"))[0]
    victim.unlink()
    _assert_user_error(invoke("inspect", ckpt), victim.name, "does not exist")


def test_index_path_outside_directory(tmp_path, llama_sharded):
    ckpt = _copy(llama_sharded, tmp_path / "ckpt")
    shutil.copy(sorted(ckpt.glob("model-*.safetensors"))[0], tmp_path / "outside.safetensors")
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    index_file.write_text(json.dumps(index))
    _assert_user_error(invoke("inspect", ckpt), "outside", "refusing")


def test_unsupported_format(tmp_path):
    file = tmp_path / "weights.onnx"
    file.write_bytes(b"\x00" * 32)
    _assert_user_error(invoke("inspect", file), "weights.onnx", "unsupported format")


def test_pickle_refused_without_flag(tmp_path):
    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    _assert_user_error(invoke("inspect", tmp_path), "--allow-pickle")
    assert invoke("inspect", tmp_path, "--allow-pickle").exit_code == 0


def test_debug_flag_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_console_script_exit_code(tmp_path, llama_family):
    """The installed entry point, as a user runs it: it leaves without the interpreter's teardown, so its exit
    status and everything it printed (to a pipe here) must still come through."""
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_lite", "inspect", str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file or directory" in proc.stderr
    shown = subprocess.run([sys.executable, "-m", "mergekit_lite", "inspect", str(llama_family["base"]), "--json"],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stderr == ""
    assert json.loads(shown.stdout) == json.loads(invoke("inspect", llama_family["base"], "--json").stdout)


def test_a_profiled_command_still_writes_its_profile(tmp_path):
    """Under a profiler (or a debugger, or coverage) the command ends the usual way, so the tool's results are
    written after it: the quick exit is only for plain runs."""
    stats = tmp_path / "merge.prof"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "mergekit_lite", "--help"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "run" in proc.stdout, proc.stderr
    assert stats.stat().st_size > 0
