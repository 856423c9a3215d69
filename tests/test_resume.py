"""Interrupted merges: nothing half-written at the output path, and --resume finishes them identically."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergekit_lite import engine, examples
from mergekit_lite.checkpoint.safetensors_format import read_header
from mergekit_lite.checkpoint.writer import JOURNAL, partial_dir
from tests.forked_cli import ForkedMerge, forked_merge

runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app_module().app, [str(a) for a in args])


def app_module():
    from mergekit_lite import cli

    return cli


def recipe_for(tmp_path: Path, family: dict, method: str = "dare_ties", extra: str = "") -> Path:
    lines = [f"merge_method: {method}", f"base_model: {family['base']}", "models:"]
    for name in ("expert1", "expert2", "expert3"):
        lines += [f"  - model: {family[name]}", "    parameters: {weight: 1.0, density: 0.5}"]
    path = tmp_path / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\nseed: 11\n" + extra)
    return path


def interrupt_after(count: int, monkeypatch) -> None:
    """Make the engine raise KeyboardInterrupt (as Ctrl-C does) when it reaches tensor number `count`."""
    original = engine._merge_tensor
    seen = {"n": 0}

    def flaky(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == count:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_merge_tensor", flaky)


def test_interrupted_run_resumes_to_identical_output(tmp_path, llama_family, monkeypatch):
    recipe = recipe_for(tmp_path, llama_family)
    assert run_cli("run", recipe, tmp_path / "reference", "--quiet").exit_code == 0
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(12, patch)
        result = run_cli("run", recipe, out)
    assert result.exit_code == 130 and "--resume" in result.stderr
    assert not out.exists()
    journal = (partial_dir(out) / JOURNAL).read_text().splitlines()
    assert len(journal) == 1 + 11  # fingerprint + the eleven tensors finished before the interruption
    blocked = run_cli("run", recipe, out)
    assert blocked.exit_code == 2 and "--resume" in blocked.stderr
    resumed = run_cli("run", recipe, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert not partial_dir(out).exists() and not (out / JOURNAL).exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert any("resumed: 11 tensor(s)" in w for w in report["warnings"])
    assert len(report["tensors"]) == 21


def test_resume_recomputes_a_damaged_tensor(tmp_path, llama_family, monkeypatch):
    recipe = recipe_for(tmp_path, llama_family, "ties")
    assert run_cli("run", recipe, tmp_path / "reference", "--quiet").exit_code == 0
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(15, patch)
        assert run_cli("run", recipe, out).exit_code == 130
    shard = partial_dir(out) / "model.safetensors"
    first_done = json.loads((partial_dir(out) / JOURNAL).read_text().splitlines()[1])["tensor"]
    info = read_header(shard).tensors[first_done]
    data = bytearray(shard.read_bytes())
    data[info.offset + 5] ^= 0xFF  # flip bits inside a tensor the journal calls finished
    shard.write_bytes(bytes(data))
    assert run_cli("run", recipe, out, "--resume", "--quiet").exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()
    report = json.loads((out / "merge_report.json").read_text())
    assert any("resumed: 13 tensor(s)" in w for w in report["warnings"])  # 14 finished, 1 failed its checksum


def test_resume_refuses_a_different_recipe(tmp_path, llama_family, monkeypatch):
    recipe = recipe_for(tmp_path, llama_family)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(5, patch)
        assert run_cli("run", recipe, out).exit_code == 130
    changed = recipe_for(tmp_path, llama_family, extra="dtype: bfloat16\n")
    result = run_cli("run", changed, out, "--resume")
    assert result.exit_code == 2 and "another recipe" in result.stderr
    assert run_cli("run", changed, out, "--force", "--quiet").exit_code == 0  # --force starts over


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    paths = examples.llama_shaped_checkpoints(root, examples.LLAMA_SMALL, 3, torch.bfloat16)
    return {"base": paths[0], "expert1": paths[1], "expert2": paths[2], "expert3": paths[3]}


def test_sigkill_at_random_points_never_leaves_a_broken_output(tmp_path, medium_family):
    """A merge killed with SIGKILL at a random moment of the merge itself (the commands are forked from a process
    that has imported torch already) leaves nothing or a complete output; --resume then finishes it exactly."""
    recipe = recipe_for(tmp_path, medium_family)
    logs = tmp_path / "logs"
    reference = tmp_path / "reference"
    assert forked_merge("--help", logs=logs).returncode == 0  # the fork server is up: the timing below is the run's
    started = time.perf_counter()
    done = forked_merge("run", recipe, reference, "--quiet", logs=logs)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    duration = time.perf_counter() - started
    expected = (reference / "model.safetensors").read_bytes()
    rng = random.Random(5)
    outcomes = {"nothing": 0, "journal": 0, "complete": 0}
    trial = 0
    # random moments until two kills have landed after tensors were journalled (at least six trials, at most 16:
    # a kill lands there about half the time)
    while trial < 16 and (trial < 6 or outcomes["journal"] < 2):
        out = tmp_path / f"out{trial}"
        trial += 1
        command = ForkedMerge("run", recipe, out, "--quiet", logs=logs)
        time.sleep(rng.uniform(0.0, duration * 1.1))
        command.kill()
        if out.exists():
            assert (out / "model.safetensors").read_bytes() == expected
            outcomes["complete"] += 1
            continue
        outcomes["nothing"] += 1
        journal = partial_dir(out) / JOURNAL
        outcomes["journal"] += journal.is_file() and '"tensor"' in journal.read_text()  # tensors were written
        resumed = forked_merge("run", recipe, out, "--resume", "--quiet", logs=logs)
        assert resumed.returncode == 0, resumed.stderr
        assert (out / "model.safetensors").read_bytes() == expected
    # kills cut merges short after they had journalled tensors, and --resume finished them
    assert outcomes["journal"] >= 1, outcomes
