"""Hub ids in recipes, resolved through huggingface_hub: from a cache laid out exactly as huggingface_hub lays it
out (blobs, snapshots, refs), offline, with revision pinning; and the refusals when a repository is neither
cached nor reachable. Each merge runs in a process of its own (forked: tests/forked_cli.py), since huggingface_hub
reads its environment when it is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fake_hub import cache_repo
from tests.forked_cli import forked_merge



def _merge(tmp_path: Path, recipe_text: str, out: Path, cache: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    recipe = tmp_path / f"{out.name}.yaml"
    recipe.write_text(recipe_text)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    return forked_merge("run", recipe, out, "--quiet", logs=tmp_path / "logs", cwd=cwd or tmp_path, env=env)


@pytest.fixture
def hub_cache(tmp_path, llama_family):
    cache = tmp_path / "hub"
    main, tagged = "a" * 40, "b" * 40
    cache_repo(cache, "org/tiny-base", llama_family["base"], {"main": main})
    cache_repo(cache, "org/tiny-expert", llama_family["expert1"], {"main": main, "v1": tagged})
    return cache, main, tagged


def _recipe(base: str, expert: str, other: Path) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {expert}\n  - model: {other}\n"
            "parameters: {lambda: 0.5}\ndtype: float32\n")


def test_hub_ids_resolve_from_the_cache_offline_and_are_recorded(tmp_path, llama_family, hub_cache):
    cache, main, tagged = hub_cache
    hub = _merge(tmp_path, _recipe("org/tiny-base", "org/tiny-expert@v1", llama_family["expert2"]),
                 tmp_path / "hub_out", cache)
    assert hub.returncode == 0, hub.stderr
    local = _merge(tmp_path, _recipe(llama_family["base"], llama_family["expert1"], llama_family["expert2"]),
                   tmp_path / "local_out", cache)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "hub_out" / "model.safetensors").read_bytes() == (tmp_path / "local_out" / "model.safetensors").read_bytes()
    report = json.loads((tmp_path / "hub_out" / "merge_report.json").read_text())
    hubs = {item["hub"]["id"]: item["hub"] for item in report["inputs"] if "hub" in item}
    assert hubs == {"org/tiny-base": {"id": "org/tiny-base", "revision": "main", "commit": main},
                    "org/tiny-expert": {"id": "org/tiny-expert", "revision": "v1", "commit": tagged}}
    assert report["recipe"]["base_model"] == "org/tiny-base"  # as written, not the snapshot path
    assert report["recipe"]["models"][0]["model"] == "org/tiny-expert@v1"
    front = (tmp_path / "hub_out" / "README.md").read_text().split("---")[1]
    assert '- "org/tiny-base"' in front and '- "org/tiny-expert@v1"' in front


def test_a_local_directory_wins_over_a_hub_id_spelled_the_same(tmp_path, llama_family, hub_cache):
    cache, _, _ = hub_cache
    shutil.copytree(llama_family["expert2"], tmp_path / "org" / "tiny-expert")  # ./org/tiny-expert exists
    result = _merge(tmp_path, _recipe("org/tiny-base", "org/tiny-expert", llama_family["expert1"]),
                    tmp_path / "out", cache, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    expert = next(item for item in report["inputs"] if item["path"].endswith("tiny-expert"))
    assert "hub" not in expert and "snapshots" not in expert["path"]


@pytest.mark.parametrize("reference, needle", [
    ("org/not-cached", "not in the Hugging Face cache"),
    ("org/tiny-expert@v9", "not in the Hugging Face cache"),
])
def test_offline_and_not_cached_is_one_line_naming_the_command_that_fetches_it(tmp_path, llama_family, hub_cache,
                                                                                reference, needle):
    cache, _, _ = hub_cache
    result = _merge(tmp_path, _recipe("org/tiny-base", reference, llama_family["expert2"]), tmp_path / "out", cache)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert needle in " ".join(lines) and "hf download" in " ".join(lines)
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def _download(tmp_path: Path, recipe_text: str, out: Path, endpoint: str, cache: Path, *flags: str):
    recipe = tmp_path / f"{out.name}.yaml"
    recipe.write_text(recipe_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    return forked_merge("run", recipe, out, "--quiet", *flags, logs=tmp_path / "logs", cwd=tmp_path, env=env)


def test_a_real_download_from_a_hub_on_the_loopback_address(tmp_path, llama_family):
    """huggingface_hub downloads from a local stand-in (HF_ENDPOINT): only the files a merge reads, into the
    standard cache layout; a pinned revision, a missing repository and a missing revision each say what they are."""
    from tests.fake_hub import FakeHub

    files = {p.name: p.read_bytes() for p in llama_family["base"].iterdir() if p.is_file()}
    files.update({"pytorch_model.bin": b"not needed", "training_args.bin": b"not needed", "notes/large.ckpt": b"x"})
    repos = {"org/served-base": {"refs": {"main": "c" * 40, "v1": "d" * 40}, "files": files}}
    cache = tmp_path / "hub"
    recipe = lambda base: _recipe(base, str(llama_family["expert1"]), llama_family["expert2"])  # noqa: E731
    with FakeHub(repos) as hub:
        fetched = _download(tmp_path, recipe("org/served-base@v1"), tmp_path / "out", hub.endpoint, cache)
        assert fetched.returncode == 0, fetched.stderr
        missing = _download(tmp_path, recipe("org/nowhere"), tmp_path / "missing", hub.endpoint, cache)
        wrong = _download(tmp_path, recipe("org/served-base@v9"), tmp_path / "wrong", hub.endpoint, cache)
        asked = [path for _, path in hub.requests]
    snapshot = cache / "models--org--served-base" / "snapshots" / ("d" * 40)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(n for n in files if n.endswith((".json", ".safetensors"))
                                                               or n.startswith("tokenizer") or n in ("vocab.json", "merges.txt"))
    assert not any(path.endswith((".bin", ".ckpt")) for path in asked)  # pickles only with --allow-pickle
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [item["hub"] for item in report["inputs"] if "hub" in item] == [
        {"id": "org/served-base", "revision": "v1", "commit": "d" * 40}]
    local = _merge(tmp_path, _recipe(llama_family["base"], llama_family["expert1"], llama_family["expert2"]),
                   tmp_path / "local", cache)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    assert missing.returncode == 2 and "no such repository on the hub" in missing.stderr
    assert wrong.returncode == 2 and "no revision 'v9'" in " ".join(wrong.stderr.split())
    assert not (tmp_path / "missing").exists() and not (tmp_path / "wrong").exists()

