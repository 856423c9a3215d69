"""Merges on a real Ray cluster: a head and a second node started here as separate processes (`ray start`), each
with its own resource label, on the loopback address, torn down at the end. Each output shard is one task; the
output is byte-identical to a local run, also after a worker is killed mid-merge (Ray runs its task again) and
after the driver is killed and the merge is resumed."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.forked_cli import ForkedMerge, forked_merge

# The cluster's nodes and drivers (this process too) share a token (Ray's token authentication), made for this
# run; Ray reads it when it is imported.
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                  RAY_AUTH_TOKEN=os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32))
ENV = dict(os.environ)
ray = pytest.importorskip("ray")
RAY = str(Path(sys.executable).parent / "ray")
SHARD = "12KB"  # the tiny models' merge (140 KB, 21 tensors) in about ten shards: ten tasks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_node(*args: str, env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block ARGS` in a session of its own (see `_wait_until_up`)."""
    with open(log, "w") as out:
        return subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_until_up(node: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if node.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(node.args)} failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _stop_node(node: subprocess.Popen) -> None:
    """SIGKILL to every process in the node's session (its services and the workers they started), and to no
    other: a Ray cluster of the user's on this machine is left alone."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == node.pid:
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue
    node.wait(timeout=60)


@pytest.fixture(scope="module")
def node_hub():
    """A stand-in hub on the loopback address that the cluster's nodes download from, and each node's own hub
    cache (not shared with the driver's or with each other)."""
    from tests.fake_hub import FakeHub

    temp = Path(tempfile.mkdtemp(prefix="rayhub", dir="/tmp"))
    with FakeHub({}) as hub:
        yield hub, {node: temp / node for node in NODES}


NODES = ("head_node", "second_node")


def _node_env(hub, cache: Path) -> dict:
    env = {k: v for k, v in ENV.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.with_name(cache.name + "_home")),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    return env


@pytest.fixture(scope="module")
def cluster(node_hub):
    """ADDRESS of a two-node cluster (one CPU each) on this machine; each node resolves hub ids into its own cache
    from the stand-in hub."""
    hub, caches = node_hub
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    port = _free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    nodes, logs = [], (temp / "head.log", temp / "second.log")
    try:  # the second node starts with the head: it waits for the head's services to answer
        nodes.append(_start_node("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                                 f"--temp-dir={temp}", '--resources={"head_node": 1}', *common,
                                 env=_node_env(hub, caches["head_node"]), log=logs[0]))
        nodes.append(_start_node(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                                 '--resources={"second_node": 1}', *common, env=_node_env(hub, caches["second_node"]),
                                 log=logs[1]))
        for node, log in zip(nodes, logs):
            _wait_until_up(node, log)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            _stop_node(node)


def _recipe(tmp_path: Path, family: dict, method: str, extra: str = "") -> Path:
    params = "{weight: 1.0}" if method == "task_arithmetic" else "{weight: 1.0, density: 0.5}"
    lines = [f"merge_method: {method}", f"base_model: {family['base']}", "models:"]
    for name in ("expert1", "expert2", "expert3"):
        lines += [f"  - model: {family[name]}", f"    parameters: {params}"]
    path = tmp_path / f"{method}.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _run(recipe: Path, out: Path, *flags: str, timeout: int = 300, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    """`merge run` in a driver process of its own (a new Ray job)."""
    return forked_merge("run", recipe, out, "--quiet", "--shard-size", SHARD, *flags, logs=out.parent / "logs",
                        env=env or ENV, timeout=timeout)


def _merge_here(recipe: Path, out: Path) -> None:
    """The local run to compare with, in this process (no cluster)."""
    from mergekit_lite import merge

    merge(recipe, out, shard_size=SHARD)


def _shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def driver(cluster):
    """This process as a driver of the cluster (connected once: its workers stay warm between merges)."""
    from mergekit_lite.ray_session import connect, load_worker

    connect(ray, cluster, "mergekit_lite.cluster")
    # both nodes' workers loaded before the first merge, so that neither is still busy when its tasks are placed
    ready = [ray.remote(num_cpus=1, resources={node: 1})(load_worker).remote("mergekit_lite.cluster") for node in NODES]
    ray.get(ready, timeout=120)
    yield cluster
    ray.shutdown()


@pytest.mark.parametrize("method, extra", [
    ("ties", ""), ("dare_ties", "seed: 5\n"), ("task_arithmetic", ""), ("ties", "parameters: {trim_scope: model}\n"),
], ids=["ties", "dare_ties", "task_arithmetic", "ties model scope"])
def test_a_cluster_merge_is_byte_identical_to_a_local_one(tmp_path, llama_family, driver, method, extra):
    from mergekit_lite import merge

    recipe = _recipe(tmp_path, llama_family, method, extra)
    ours = merge(recipe, tmp_path / "local", shard_size=SHARD)
    report = merge(recipe, tmp_path / "ray", shard_size=SHARD, ray=driver)
    shards = _shards(tmp_path / "local")
    assert len(shards) >= 8 and _shards(tmp_path / "ray") == shards
    assert report["ray"]["tasks"] == len(shards) and len(report["ray"]["nodes"]) == 2  # both nodes merged
    assert [t["name"] for t in report["tensors"]] == [t["name"] for t in ours["tensors"]]
    # model-scope TIES: the thresholds came from the tasks' histograms (two rounds), not a pass on the driver
    assert report["ray"].get("first_pass_rounds", 0) == (2 if "trim_scope" in extra else 0)


def _task_pids() -> list[int]:
    """Worker processes running a shard task now (Ray titles them after the function)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ray::merge_shard" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_hub_ids_resolve_in_each_nodes_own_cache(tmp_path, llama_family, cluster, node_hub):
    """The driver resolves a hub id from its cache (offline) and sends its commit; each node's tasks resolve that
    commit into the node's own cache (downloading it there), and the bytes are a local run's."""
    from tests.fake_hub import cache_repo

    hub, caches = node_hub
    commit = "e" * 40
    hub.repos["org/ray-expert"] = {"refs": {"main": commit}, "files": {
        p.name: p.read_bytes() for p in llama_family["expert1"].iterdir() if p.is_file()}}
    driver_cache = tmp_path / "driver_hub"
    cache_repo(driver_cache, "org/ray-expert", llama_family["expert1"], {"main": commit})
    env = {k: v for k, v in ENV.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(driver_cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {llama_family['base']}\nmodels:\n"
                      "  - model: org/ray-expert\n    parameters: {weight: 1.0, density: 0.5}\n"
                      f"  - model: {llama_family['expert2']}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    local = _run(recipe, tmp_path / "local", env=env)
    assert local.returncode == 0, local.stderr
    merged = _run(recipe, tmp_path / "ray", "--ray", cluster, env=env)
    assert merged.returncode == 0, merged.stderr
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
    report = json.loads((tmp_path / "ray" / "merge_report.json").read_text())
    # each node that ran tasks fetched the driver's commit into its own cache (a node whose one CPU was still busy
    # starting its workers may have run none: the scheduler decides, not the test)
    holding = [node for node, cache in caches.items()
               if (cache / "models--org--ray-expert" / "snapshots" / commit / "model.safetensors").is_file()]
    assert holding and len(holding) == len(report["ray"]["nodes"]), (holding, report["ray"]["nodes"])


def test_a_worker_killed_mid_merge_is_retried_and_the_output_is_the_same(tmp_path, llama_family, cluster):
    recipe = _recipe(tmp_path, llama_family, "ties")
    _merge_here(recipe, tmp_path / "local")
    driver = ForkedMerge("run", recipe, tmp_path / "ray", "--quiet", "--shard-size", SHARD, "--ray", cluster,
                         logs=tmp_path / "logs", env=ENV)  # a driver process of its own: a new Ray job, cold workers
    killed, deadline = None, time.monotonic() + 120
    while killed is None and not driver.ended() and time.monotonic() < deadline:
        pids = _task_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.005)
    assert killed is not None, "no task was seen running"
    assert driver.wait() == 0, driver.stderr
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")


def test_a_killed_driver_leaves_nothing_and_resume_finishes_it(tmp_path, llama_family, cluster, driver):
    """A driver process killed mid-merge publishes nothing; `--resume` (here from this process, a driver whose
    workers are warm) finishes the same bytes."""
    from mergekit_lite import merge

    recipe = _recipe(tmp_path, llama_family, "ties")
    _merge_here(recipe, tmp_path / "local")
    out = tmp_path / "ray"
    doomed = ForkedMerge("run", recipe, out, "--quiet", "--shard-size", SHARD, "--ray", cluster, logs=tmp_path / "logs",
                         env=ENV)
    journal = tmp_path / ".ray.partial" / ".merge_journal.jsonl"
    deadline = time.monotonic() + 120
    while not doomed.ended() and time.monotonic() < deadline:
        if journal.exists() and journal.read_text().count('"tensor"') >= 3:
            break
        time.sleep(0.01)
    doomed.kill()
    assert not out.exists()
    report = merge(recipe, out, shard_size=SHARD, ray=driver, resume=True)
    assert _shards(out) == _shards(tmp_path / "local")
    assert any("resumed" in w for w in report["warnings"])
    assert report == json.loads((out / "merge_report.json").read_text())


def test_without_ray_the_flag_says_what_to_install(monkeypatch):
    import builtins

    from mergekit_lite.ray_session import import_ray
    from mergekit_lite.errors import UserError

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"pip install 'mergekit_lite\[ray\]'"):
        import_ray()


def test_a_bare_ray_flag_means_a_local_cluster():
    from mergekit_lite.cli import bare_ray_flag

    assert bare_ray_flag(["run", "r.yaml", "out", "--ray"]) == ["run", "r.yaml", "out", "--ray", "local"]
    assert bare_ray_flag(["run", "r.yaml", "out", "--ray", "--quiet"])[4] == "local"
    assert bare_ray_flag(["run", "r.yaml", "out", "--ray", "10.0.0.1:6379"])[4] == "10.0.0.1:6379"


@pytest.mark.parametrize("address, needle", [("127.0.0.1:1", "nothing answers"), ("no-port", "not an address")])
def test_an_address_nothing_answers_on_is_one_line_at_once(tmp_path, llama_family, address, needle):
    recipe = _recipe(tmp_path, llama_family, "ties")
    started = time.monotonic()
    result = _run(recipe, tmp_path / "out", "--ray", address, timeout=120)
    assert result.returncode == 2 and needle in result.stderr and time.monotonic() - started < 60, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_twin_merge_on_the_cluster_equals_the_local_one(tmp_path, driver):
    """Twin-Merging with --ray: the shared merge and the factoring of every task's delta run as tasks on both nodes.
    The shared expert, the dense deltas and the router are the local run's bytes; the factors are the same up to
    float rounding (LAPACK's SVD rounds differently with another thread count), so their products are compared."""
    from mergekit_lite import merge
    from mergekit_lite.examples import make_family

    paths = make_family(tmp_path / "models", "gpt2", experts=2, scale=0.2)
    texts = {"prose": "The river ran past the old mill in the evening light. " * 40,
             "code": "def add(a, b):\n    return a + b\n" * 60}
    models = []
    for index, (task, text) in enumerate(texts.items()):
        (tmp_path / f"{task}.txt").write_text(text, encoding="utf-8")
        models.append({"model": str(paths[f"expert{index + 1}"]), "task": task,
                       "data": {"path": str(tmp_path / f"{task}.txt"), "length": 16}})
    recipe = {"merge_method": "twin", "base_model": str(paths["base"]), "models": models,
              "parameters": {"router_samples": 24, "router_epochs": 5, "rank": 0.25, "factor_dtype": "float32"}}
    merge(recipe, tmp_path / "local", shard_size=SHARD)
    report = merge(recipe, tmp_path / "ray", shard_size=SHARD, ray=driver)
    assert len(report["ray"]["nodes"]) == 2 and report["ray"]["tasks"] > 2
    for part in ("shared", "router.safetensors"):
        assert _tree(tmp_path / "ray" / part) == _tree(tmp_path / "local" / part), part
    ours, theirs = (_experts(tmp_path / where / "experts") for where in ("local", "ray"))
    assert ours.keys() == theirs.keys()
    factored = 0
    for name in ours:
        if name.endswith(".right"):
            continue
        if name.endswith(".left"):
            stem = name.removesuffix(".left")
            product = lambda t: t[name].double() @ t[f"{stem}.right"].double()  # noqa: E731
            torch.testing.assert_close(product(theirs), product(ours), rtol=1e-5, atol=1e-6)
            factored += 1
        else:
            assert torch.equal(theirs[name], ours[name]), name
    assert factored > 0


def _experts(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {name: tensor for shard in sorted(directory.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def _tree(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    return {str(p.relative_to(path.parent)): p.read_bytes() for p in files}


def test_pleas_refuses_ray_in_one_line(tmp_path, llama_family):
    from mergekit_lite import merge
    from mergekit_lite.errors import UserError

    recipe = {"merge_method": "pleas", "models": [{"model": str(llama_family["expert1"])},
                                                   {"model": str(llama_family["expert2"])}]}
    with pytest.raises(UserError, match="--ray: pleas merges whole models in one process"):
        merge(recipe, tmp_path / "out", ray="local")
    assert not (tmp_path / "out").exists()
