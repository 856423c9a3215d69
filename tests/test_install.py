"""Installing next to a user's own torch: timm and torchvision are an extra that only timm checkpoints need, and
the command is installed under a second name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, blocker: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    return subprocess.run([sys.executable, "-m", "mergekit_lite", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _pleas_recipe(tmp_path: Path, resnet_dir: Path) -> Path:
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"merge_method: pleas\nmodels: [{{model: {resnet_dir}}}, {{model: {resnet_dir}}}]\n"
                      "data: {kind: generic, shape: [3, 32, 32]}\nparameters: {data_free: true}\n")
    return recipe


def test_tensor_wise_merges_run_without_timm_and_timm_models_say_what_to_install(tmp_path, llama_family, resnet_dir):
    """As if neither timm nor torchvision were installed: a tensor-wise merge never imports them, and a model
    that needs timm names the extra to install (one line, exit 2)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['timm'] = None\nsys.modules['torchvision'] = None\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {llama_family['base']}\nmodels:\n"
                      f"  - model: {llama_family['expert1']}\n  - model: {llama_family['expert2']}\n")
    merged = _run(tmp_path, blocker, "run", recipe, tmp_path / "out", "--quiet")
    assert merged.returncode == 0, merged.stderr
    refused = _run(tmp_path, blocker, "validate", _pleas_recipe(tmp_path, resnet_dir))
    assert refused.returncode == 2 and "pip install 'mergekit_lite[vision]'" in refused.stderr, refused.stderr
    assert "internal error" not in refused.stderr


def test_a_torchvision_built_for_another_torch_is_an_environment_problem(tmp_path, resnet_dir):
    """timm importing a torchvision whose compiled operators do not load (RuntimeError at import): exit 2 with
    what to install, not 'internal error (a bug)'."""
    blocker = tmp_path / "blocker"
    (blocker / "timm").mkdir(parents=True)
    (blocker / "timm" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    refused = _run(tmp_path, blocker, "validate", _pleas_recipe(tmp_path, resnet_dir))
    assert refused.returncode == 2, refused.stderr
    assert "torchvision release built for this torch" in refused.stderr and "internal error" not in refused.stderr


def test_the_command_is_also_installed_as_mergekit_lite():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("merge") == scripts.get("mergekit-lite") == "mergekit_lite.cli:main"
