"""Device selection: CUDA merges equal CPU merges where a GPU exists; a clear error where it does not."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_lite.cli import app
from mergekit_lite.device import resolve_device
from mergekit_lite.errors import UserError

runner = CliRunner()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _recipe(tmp_path, family, method):
    from mergekit_lite.methods import get_method

    known = {p.name for p in get_method(method).params}
    parameters = {k: v for k, v in {"weight": 1.0, "density": 0.4}.items() if k in known}
    lines = [f"merge_method: {method}", f"base_model: {family['base']}", "models:"]
    for name in ("expert1", "expert2", "expert3"):
        lines += [f"  - model: {family[name]}", f"    parameters: {parameters}".replace("'", "")]
    path = tmp_path / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_auto_is_cpu_without_cuda_and_bad_specs_are_user_errors():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(UserError, match="not valid|not supported"):
        resolve_device("tpu:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_run_on_cuda_without_cuda_is_exit_2(tmp_path, llama_family):
    result = runner.invoke(app, ["run", str(_recipe(tmp_path, llama_family, "ties")), str(tmp_path / "out"),
                                 "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr
    assert not (tmp_path / "out").exists()


@cuda
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "breadcrumbs", "model_stock"])
def test_cuda_merge_equals_cpu_merge(tmp_path, llama_family, method):
    recipe = _recipe(tmp_path, llama_family, method) if method != "model_stock" else None
    if recipe is None:
        recipe = tmp_path / "ms.yaml"
        recipe.write_text(f"merge_method: model_stock\nbase_model: {llama_family['base']}\nmodels:\n"
                          + "".join(f"  - model: {llama_family[n]}\n" for n in ("expert1", "expert2", "expert3")))
    for device in ("cpu", "cuda"):
        result = runner.invoke(app, ["run", str(recipe), str(tmp_path / device), "--device", device, "--quiet"])
        assert result.exit_code == 0, result.output
    on_cpu = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    on_gpu = load_file(str(tmp_path / "cuda" / "model.safetensors"))
    for name, tensor in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], tensor, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_dare_is_reproducible(tmp_path, llama_family):
    recipe = _recipe(tmp_path, llama_family, "dare_ties")
    for name in ("a", "b"):
        result = runner.invoke(app, ["run", str(recipe), str(tmp_path / name), "--device", "cuda", "--seed", "9", "--quiet"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
