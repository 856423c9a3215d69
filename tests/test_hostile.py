"""Failure matrix, round two: hostile and careless use. Every refusal is checked for exit code 2, one line, no
traceback, nothing at the output path (no hidden partial or lock either) and inputs unchanged by digest."""

from __future__ import annotations

import errno
import faulthandler
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lite.checkpoint import files as files_module
from mergekit_lite.checkpoint import writer as writer_module
from mergekit_lite.checkpoint.lock import lock_path
from mergekit_lite.checkpoint.writer import JOURNAL, CheckpointWriter, partial_dir
from mergekit_lite.cli import app
from mergekit_lite.errors import CheckpointError
from tests.conftest import tree_digest
from tests.forked_cli import ForkedMerge
from tests.test_failures import copy_model, recipe_text

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, out: Path | None, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert "Traceback" not in result.output and message.startswith("error:"), message
    assert len(message.strip().splitlines()) == 1, message  # one line (the terminal may wrap it; CliRunner does not)
    for needle in needles:
        assert needle in message, (needle, message)
    if out is not None:
        assert not os.path.lexists(out) and not partial_dir(out).exists() and not lock_path(out).exists()


@contextmanager
def hang_guard(seconds: float = 60.0):
    """Run a check that must not block (a FIFO nobody writes to) in this process: a hang ends the process after
    `seconds` with every thread's traceback (pytest-xdist reports the crash), so the suite's run time stays bounded."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def refuse_run(tmp_path: Path, text: str, *needles: str, inputs=(), args=()) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    before = [tree_digest(Path(p)) for p in inputs]
    out = tmp_path / "out"
    assert_refused(run_cli("run", recipe, out, *args), out, *needles)
    assert [tree_digest(Path(p)) for p in inputs] == before


@pytest.fixture()
def family(tmp_path, llama_family):
    """A private copy of the tiny Llama family (tests here put links, FIFOs and outputs inside it)."""
    root = tmp_path / "models"
    root.mkdir()
    copied = {}
    for name, path in llama_family.items():
        shutil.copytree(path, root / name)
        copied[name] = root / name
    return copied


# ---- 1. two merges to one output ----

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mergekit_lite.checkpoint.lock import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_run_on_a_locked_output_is_refused_at_once(tmp_path, family):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = tmp_path / "r.yaml"
        recipe.write_text(recipe_text(family))
        for extra in ([], ["--force"], ["--resume"]):
            result = run_cli("run", recipe, out, *extra)
            assert result.exit_code == 2 and "another merge" in result.stderr and f"pid {holder.pid}" in result.stderr
            assert not out.exists() and not partial_dir(out).exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock is gone with it, and the next run proceeds and cleans the lock file
    assert run_cli("run", recipe, out, "--quiet").exit_code == 0
    assert not lock_path(out).exists()


@pytest.mark.parametrize("runs, force", [(3, True), (3, False)])  # three racers: two against one
def test_racing_merges_publish_one_complete_output(tmp_path, runs, force):
    from mergekit_lite.examples import LLAMA_SMALL, llama_shaped_checkpoints

    paths = llama_shaped_checkpoints(tmp_path / "models", LLAMA_SMALL, 2, torch.bfloat16)
    recipe = tmp_path / "r.yaml"
    lines = ["merge_method: ties", f"base_model: {paths[0]}", "models:"]
    lines += [line for p in paths[1:] for line in (f"  - model: {p}", "    parameters: {weight: 1.0, density: 0.5}")]
    recipe.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    command = ["run", recipe, out, "--quiet"] + (["--force"] if force else [])
    for _round in range(2):  # the second round races over an existing output (replaced only with --force)
        # separate processes forked from one that has imported torch: they start within milliseconds of each other
        racers = [ForkedMerge(*command, logs=tmp_path / "logs") for _ in range(runs)]
        results = [(racer.wait(), racer.stderr) for racer in racers]
        assert all(code in (0, 2) for code, _ in results), results
        assert any(code == 0 for code, _ in results) or (not force and _round == 1), results
        for code, err in results:
            if code == 2:
                assert "another merge" in err or "already exists" in err, err
        report = json.loads((out / "merge_report.json").read_text())
        for entry in report["output"]["files"]:
            assert hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
        load_file(str(out / "model.safetensors"))
        assert not partial_dir(out).exists() and not lock_path(out).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---- 2. --force never deletes an input; --report never overwrites what is not a report ----

def test_output_that_is_or_holds_an_input_is_refused(tmp_path, family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family))
    models = family["base"].parent
    link = tmp_path / "link_to_base"
    link.symlink_to(family["base"])
    before = tree_digest(models)
    for out, relation in ((family["base"], "is"), (models, "contains"), (family["base"] / "sub", "lies inside"),
                          (link, "is")):
        result = run_cli("run", recipe, out, "--force")
        assert result.exit_code == 2 and f"output {relation} the input" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert tree_digest(models) == before and link.is_symlink()


def test_report_path_is_refused_unless_new_or_a_report(tmp_path, family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family))
    config = family["base"] / "config.json"
    before = tree_digest(family["base"])
    result = run_cli("run", recipe, tmp_path / "out", "--report", config)
    assert_refused(result, tmp_path / "out", "report lies inside the input")
    precious = tmp_path / "notes.json"
    precious.write_text('{"mine": true}')
    assert_refused(run_cli("run", recipe, tmp_path / "out", "--report", precious), tmp_path / "out",
                   "not a report written by mergekit_lite")
    assert precious.read_text() == '{"mine": true}' and tree_digest(family["base"]) == before
    report = tmp_path / "report.json"
    for attempt in range(2):  # new, then an earlier report of ours: both fine
        assert run_cli("run", recipe, tmp_path / f"out{attempt}", "--report", report, "--quiet").exit_code == 0
    assert json.loads(report.read_text())["output"]["path"].endswith("out1")


def test_twin_collapse_cannot_overwrite_its_input(tmp_path, twin_directory):
    before = tree_digest(twin_directory)
    for out in (twin_directory, twin_directory / "shared", twin_directory.parent):
        result = run_cli("twin-collapse", twin_directory, "--weights", "prose=1", "--out", out, "--force")
        assert result.exit_code == 2 and "the input" in result.stderr, result.stderr
    assert tree_digest(twin_directory) == before


# ---- 3. files from a checkpoint: regular, and inside it ----

def test_a_tokenizer_file_linking_out_of_the_checkpoint_is_refused(tmp_path, family):
    secret = tmp_path / "environ"
    secret.write_text("HF_TOKEN=hf_secret")
    (family["base"] / "tokenizer.json").unlink(missing_ok=True)
    (family["base"] / "tokenizer.json").symlink_to(secret)
    refuse_run(tmp_path, recipe_text(family), "tokenizer.json", "outside", inputs=[family["base"]])
    assert not any(b"hf_secret" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
                   and p != secret)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer_config.json", "config.json"])
def test_a_fifo_in_a_checkpoint_is_refused_without_hanging(tmp_path, family, name):
    target = family["expert1"] / name
    target.unlink()
    os.mkfifo(target)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family) + f"tokenizer_source: {family['expert1']}\n")
    with hang_guard():
        result = run_cli("run", recipe, tmp_path / "out")
    assert_refused(result, tmp_path / "out", "not a regular file")


def test_links_inside_the_checkpoint_and_into_a_cache_repos_blobs_are_read(tmp_path, family):
    """A Hugging Face cache snapshot: every file a link into the repo's blobs/; merges like the directory."""
    repo = tmp_path / "hub" / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for file in family["base"].iterdir():
        blob = repo / "blobs" / f"blob_{file.name}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(dict(family, base=snapshot)))
    assert run_cli("run", recipe, tmp_path / "a", "--quiet").exit_code == 0
    recipe.write_text(recipe_text(family))
    assert run_cli("run", recipe, tmp_path / "b", "--quiet").exit_code == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "tokenizer_config.json").read_bytes() == (family["base"] / "tokenizer_config.json").read_bytes()


def test_a_dangling_link_at_the_output_is_refused_before_merging(tmp_path, family):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family))
    result = run_cli("run", recipe, out)
    assert result.exit_code == 2 and "dangling symlink" in result.stderr and out.is_symlink()
    assert not partial_dir(out).exists()
    assert run_cli("run", recipe, out, "--force", "--quiet").exit_code == 0  # the link is replaced, not followed
    assert out.is_dir() and not out.is_symlink() and not (tmp_path / "nowhere").exists()


# ---- 4. pickles only with the flag ----

class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PAYLOAD_MARK', '/tmp/mergekit_lite_payload_ran')}",))


def _mlp_checkpoint(directory: Path, sizes=(16, 32, 4), seed: int = 0, config: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    save_file({k: v.contiguous() for k, v in torch.nn.Sequential(*layers).state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config or {"mergekit_lite_mlp": list(sizes)}))
    return directory


def test_a_timm_config_cannot_make_pleas_unpickle_a_file(tmp_path, monkeypatch, resnet_dir):
    mark = tmp_path / "payload_ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload()}, evil)
    model = tmp_path / "model"
    shutil.copytree(resnet_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.setdefault("model_args", {})["checkpoint_path"] = str(evil)
    (model / "config.json").write_text(json.dumps(config))
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(8, 3, 32, 32)}, str(data))
    text = f"merge_method: pleas\nmodels:\n  - model: {model}\n  - model: {resnet_dir}\ndata: {{path: {data}}}\n"
    refuse_run(tmp_path, text, "checkpoint_path", inputs=[model])
    assert not mark.exists()


def test_a_recipe_cannot_turn_pickles_on(tmp_path, family):
    refuse_run(tmp_path, recipe_text(family) + "allow_pickle: true\n", "allow_pickle", "--allow-pickle")


def test_pt_data_needs_the_flag(tmp_path):
    a = _mlp_checkpoint(tmp_path / "a")
    b = _mlp_checkpoint(tmp_path / "b", seed=1)
    data = tmp_path / "x.pt"
    torch.save(torch.randn(64, 16), data)
    text = f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\ndata: {{path: {data}}}\nparameters: {{samples: 64}}\n"
    refuse_run(tmp_path, text, "x.pt", "--allow-pickle")
    recipe = tmp_path / "recipe.yaml"
    assert run_cli("run", recipe, tmp_path / "ok", "--allow-pickle", "--quiet").exit_code == 0


# ---- 5. silent wrong results ----

def test_integer_weights_are_not_averaged_into_float_ones(tmp_path, family):
    name = "model.layers.0.mlp.up_proj.weight"
    edited = copy_model(family, "expert1", tmp_path, lambda t: t.update({name: (t[name] * 100).to(torch.int8)}))
    refuse_run(tmp_path, recipe_text(edited, ("edited", "expert2")), name, "int8", "float32", inputs=[edited["edited"]])


def test_integer_tensors_in_every_model_are_copied_with_a_warning(tmp_path, family):
    def add_ids(tensors):
        tensors["position_ids"] = torch.arange(2**62, 2**62 + 8, dtype=torch.int64)
        tensors["mask"] = torch.tensor([True, False, True])

    edited = {}
    for name in ("base", "expert1", "expert2"):
        (tmp_path / name).mkdir()
        edited[name] = copy_model(family, name, tmp_path / name, add_ids)["edited"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(edited))
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "2 integer or boolean tensor(s) copied" in result.stderr
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(merged["position_ids"], torch.arange(2**62, 2**62 + 8, dtype=torch.int64))
    assert torch.equal(merged["mask"], torch.tensor([True, False, True]))


def test_a_base_with_no_tensors_is_refused(tmp_path, family):
    save_file({}, str(family["base"] / "model.safetensors"))
    refuse_run(tmp_path, recipe_text(family), "holds no tensors")


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize("header, needle", [
    ({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "invalid shape"),
    ({"__metadata__": {"format": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
])
def test_headers_the_safetensors_library_refuses_are_refused(tmp_path, family, header, needle):
    _raw_safetensors(family["expert1"] / "model.safetensors", header, bytes(8))
    refuse_run(tmp_path, recipe_text(family), needle)


def test_one_model_under_two_spellings_is_one_model(tmp_path, family):
    recipe = tmp_path / "r.yaml"
    outputs = []
    for index, spelling in enumerate((str(family["base"]), str(family["base"]) + "/", f"{family['base']}/../base")):
        text = recipe_text(family).replace("models:\n", f"models:\n  - model: {spelling}\n", 1)
        recipe.write_text(text)
        assert run_cli("run", recipe, tmp_path / f"o{index}", "--quiet").exit_code == 0
        outputs.append((tmp_path / f"o{index}" / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def method_recipe(path: Path, method: str, models: list[Path]) -> Path:
    """A recipe for `method` over base models[0] and the rest as experts, with the parameters it takes
    (`ties_model`: TIES trimmed over the whole model)."""
    method, scope = ("ties", ["parameters: {trim_scope: model}"]) if method == "ties_model" else (method, [])
    experts = models[1:2] if method == "slerp" else models[1:]
    params = {"slerp": None, "model_stock": None, "linear": "{weight: 1.0}", "task_arithmetic": "{weight: 1.0}"}
    lines = [f"merge_method: {method}", f"base_model: {models[0]}", "models:"]
    for model in experts:
        given = params.get(method, "{weight: 1.0, density: 0.5}")
        lines += [f"  - model: {model}"] + ([f"    parameters: {given}"] if given else [])
    lines += (["parameters: {t: 0.3}"] if method == "slerp" else []) + scope
    path.write_text("\n".join(lines + ["seed: 7"]) + "\n")
    return path


THREAD_METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs", "della",
                  "model_stock"]


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Tensors large enough (256 x 1024) for torch and BLAS to split their reductions across threads."""
    root = tmp_path_factory.mktemp("wide")
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(256, 1024, generator=gen), "b.weight": torch.randn(1024, generator=gen)}
    paths = []
    for index in range(3):
        tensors = base if index == 0 else {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        path = root / f"m{index}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("method", THREAD_METHODS + ["ties_model"])
def test_every_method_gives_the_same_bytes_at_any_thread_count(tmp_path, wide_family, method):
    recipe = method_recipe(tmp_path / "r.yaml", method, wide_family)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            assert run_cli("run", recipe, tmp_path / f"t{count}", "--quiet", "--device", "cpu").exit_code == 0
            results.append((tmp_path / f"t{count}" / "model.safetensors").read_bytes())
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


# ---- 6. resume ----

def test_ctrl_c_while_resume_rechecks_keeps_the_work(tmp_path, family, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, method="task_arithmetic"))
    assert run_cli("run", recipe, tmp_path / "reference", "--quiet").exit_code == 0
    out = tmp_path / "out"
    real_record = CheckpointWriter.record
    calls = {"n": 0}

    def interrupted(self, name, entry):
        real_record(self, name, entry)
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointWriter, "record", interrupted)
        assert run_cli("run", recipe, out).exit_code == 130
    journaled = (partial_dir(out) / JOURNAL).read_text()
    with monkeypatch.context() as patch:
        patch.setattr(CheckpointWriter, "_verified", lambda self, records: (_ for _ in ()).throw(KeyboardInterrupt))
        assert run_cli("run", recipe, out, "--resume").exit_code == 130
    assert (partial_dir(out) / JOURNAL).read_text() == journaled  # the interrupted work is still there
    assert run_cli("run", recipe, out, "--resume", "--quiet").exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()
    report = json.loads((out / "merge_report.json").read_text())
    assert any("resumed: 6 tensor(s)" in w for w in report["warnings"]), report["warnings"]


def test_resume_refuses_when_an_input_changed_in_place(tmp_path, family, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, method="task_arithmetic"))
    out = tmp_path / "out"
    real_record = CheckpointWriter.record

    def interrupted(self, name, entry):
        real_record(self, name, entry)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointWriter, "record", interrupted)
        assert run_cli("run", recipe, out).exit_code == 130
    weights = family["expert1"] / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; modification time put back below
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_cli("run", recipe, out, "--resume")
    assert result.exit_code == 2 and "another recipe, inputs or settings" in result.stderr


@pytest.fixture()
def twin_directory(tmp_path, llama_family):
    text_dir = tmp_path / "twin_data"
    text_dir.mkdir()
    lines = ["merge_method: twin", f"base_model: {llama_family['base']}", "models:"]
    for index, task in enumerate(("prose", "code")):
        ids = torch.randint(index * 100, index * 100 + 90, (24, 16), generator=torch.Generator().manual_seed(index))
        np.save(text_dir / f"{task}.npy", ids.numpy())
        lines += [f"  - model: {llama_family[f'expert{index + 1}']}", f"    task: {task}",
                  f"    data: {{path: {text_dir / f'{task}.npy'}}}"]
    lines += ["parameters: {rank: 0.25, router_samples: 24, router_epochs: 5}", "seed: 1"]
    recipe = tmp_path / "twin.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    out = tmp_path / "twin"
    assert run_cli("run", recipe, out, "--quiet").exit_code == 0
    return out


def _twin_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.safetensors"))}


@pytest.mark.parametrize("stage", ["shared", "compress", "router"])
def test_an_interrupted_twin_merge_resumes_to_the_same_bytes(tmp_path, twin_directory, monkeypatch, stage):
    import mergekit_lite.twin.build as build
    import mergekit_lite.twin.factoring as factoring

    recipe = twin_directory.parent / "twin.yaml"
    out = tmp_path / "again"
    if stage == "shared":
        target, attribute = CheckpointWriter, "record"
    elif stage == "compress":
        target, attribute = factoring, "low_rank"
    else:
        target, attribute = build, "train_router"
    original = getattr(target, attribute)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 or attribute == "train_router":
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(target, attribute, interrupted)
        result = run_cli("run", recipe, out)
    assert result.exit_code == 130 and not out.exists() and partial_dir(out).exists()
    assert run_cli("run", recipe, out).exit_code == 2  # without --resume the partial work is not thrown away
    result = run_cli("run", recipe, out, "--resume")
    assert result.exit_code == 0, result.output
    assert _twin_files(out) == _twin_files(twin_directory)
    assert not partial_dir(out).exists() and not any(p.name.startswith(".") for p in out.rglob("*"))


# ---- crashes and hangs that must be one line and exit 2 ----

def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        bomb.append(f"{level}: &{level} [{', '.join(['*' + previous] * 9)}]")
    bomb.append("merge_method: ties\nmodels: *i")
    refuse_run(tmp_path, "\n".join(bomb) + "\n", "expands to more than")


@pytest.mark.parametrize("text", ["models: " + "[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "- \n" for i in range(200))])
def test_absurdly_nested_recipes_are_refused(tmp_path, text):
    refuse_run(tmp_path, text, "nested")


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json", "header"])
def test_absurdly_nested_json_is_refused(tmp_path, family, file):
    deep = "[" * 100_000 + "]" * 100_000
    if file == "header":
        _raw_safetensors(family["expert1"] / "model.safetensors", {}, b"")
        body = ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + deep + "}}").encode()
        (family["expert1"] / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + bytes(8))
    else:
        (family["expert1"] / file).write_text(deep)
    refuse_run(tmp_path, recipe_text(family), "nested too deeply")


def test_a_config_claiming_huge_layers_is_refused_before_allocating(tmp_path):
    a = _mlp_checkpoint(tmp_path / "a")
    b = _mlp_checkpoint(tmp_path / "b", seed=1)
    (b / "config.json").write_text(json.dumps({"mergekit_lite_mlp": [16, 2_000_000, 2_000_000, 4]}))
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(32, 16)}, str(data))
    refuse_run(tmp_path, f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\ndata: {{path: {data}}}\n",
               "config.json describes a model of", inputs=[b])


@pytest.mark.parametrize("shape", [[0, 16], [2**40, 0], [0]])
def test_empty_tensors_are_copied_by_every_method(tmp_path, wide_family, shape):
    paths = []
    for index, source in enumerate(wide_family):
        tensors = load_file(str(source))
        tensors["empty.weight"] = torch.empty(0)
        path = tmp_path / f"m{index}.safetensors"
        save_file(tensors, str(path))
        header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        header = json.loads(path.read_bytes()[8: 8 + header_len])
        header["empty.weight"]["shape"] = shape
        data = path.read_bytes()[8 + header_len:]
        _raw_safetensors(path, header, data)
        paths.append(path)
    for method in THREAD_METHODS:
        recipe = method_recipe(tmp_path / f"{method}.yaml", method, paths)
        assert run_cli("validate", recipe).exit_code == 0
        result = run_cli("run", recipe, tmp_path / method, "--quiet")
        assert result.exit_code == 0, (method, result.output)
        with safe_open(str(tmp_path / method / "model.safetensors"), framework="pt") as handle:
            assert list(handle.get_slice("empty.weight").get_shape()) == shape


def test_a_non_utf8_output_name(tmp_path, family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family))
    out = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    result = run_cli("run", recipe, out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "merge_report.json").read_text())["output"]["path"] == str(out)


@pytest.mark.parametrize("failing", ["README.md", "merge_report.json", "config.json", "tokenizer_config.json", JOURNAL])
def test_a_full_disk_while_writing_the_small_files(tmp_path, family, monkeypatch, failing):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, method="task_arithmetic"))
    out = tmp_path / "out"
    real_open = open
    real_record = CheckpointWriter.record

    def full_open(path, mode="r", *args, **kwargs):
        if Path(path).name == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    def full_journal(self, name, entry):
        self._journal = real_open("/dev/full", "w")  # the disk fills between two journal lines
        real_record(self, name, entry)

    with monkeypatch.context() as patch:
        if failing == JOURNAL:
            patch.setattr(CheckpointWriter, "record", full_journal)
        else:
            patch.setattr(writer_module, "open", full_open, raising=False)
            patch.setattr(files_module, "open", full_open, raising=False)
        result = run_cli("run", recipe, out)
    assert result.exit_code == 2 and "No space left on device" in result.stderr and "--resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and partial_dir(out).exists() and not lock_path(out).exists()
    assert run_cli("run", recipe, out, "--resume", "--quiet").exit_code == 0


def test_a_recipe_read_from_a_pipe_is_recorded_whole(tmp_path, family):
    fifo = tmp_path / "recipe.fifo"
    os.mkfifo(fifo)
    text = recipe_text(family)

    def feed():
        with open(fifo, "w") as handle:
            handle.write(text)

    feeder = threading.Thread(target=feed)
    feeder.start()
    result = run_cli("run", fifo, tmp_path / "out", "--quiet")
    feeder.join()
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "merge_recipe.yaml").read_text() == text


@pytest.fixture()
def mlp_pair(tmp_path):
    return _mlp_checkpoint(tmp_path / "a"), _mlp_checkpoint(tmp_path / "b", seed=1)


@pytest.mark.parametrize("tensor, needle", [
    (torch.randn(32, 3, 8, 8), "cannot run on these inputs"),
    (torch.randint(0, 4, (32,)), "labels?"),
    (torch.randn(1, 16), "at least 2"),
    (torch.ones(32, 16, dtype=torch.bool), "bool"),
    (torch.full((32, 16), float("nan")), "NaN"),
    (torch.empty(0, 16), "no samples"),
])
def test_malformed_pleas_data_is_refused(tmp_path, mlp_pair, tensor, needle):
    data = tmp_path / "x.safetensors"
    save_file({"x": tensor}, str(data))
    a, b = mlp_pair
    refuse_run(tmp_path, f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\ndata: {{path: {data}}}\n",
               needle, inputs=[a, b, data])


@pytest.mark.parametrize("ids, needle", [
    (np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32), "token ids"),
    (np.full((24, 16), 10**6, dtype=np.int64), "outside the vocabulary"),
    (np.zeros((1, 16), dtype=np.int64), "at least 2"),
])
def test_malformed_twin_data_is_refused(tmp_path, llama_family, ids, needle):
    np.save(tmp_path / "bad.npy", ids)
    np.save(tmp_path / "good.npy", np.arange(24 * 16).reshape(24, 16) % 200)
    text = (f"merge_method: twin\nbase_model: {llama_family['base']}\nmodels:\n"
            f"  - model: {llama_family['expert1']}\n    task: a\n    data: {{path: {tmp_path / 'good.npy'}}}\n"
            f"  - model: {llama_family['expert2']}\n    task: b\n    data: {{path: {tmp_path / 'bad.npy'}}}\n"
            "parameters: {router_samples: 24, router_epochs: 2}\n")
    refuse_run(tmp_path, text, needle)


@pytest.mark.parametrize("content", [b'{"schema": "mergekit_lite.report/1"}', b'{"schema": "mergekit_lite.report/1", '
                                     b'"timings_seconds": 3, "peak_memory": {}}', b"\xff\xfe\x00garbage", b"[" * 50_000])
def test_merge_report_on_a_file_that_is_not_a_report(tmp_path, content):
    path = tmp_path / "r.json"
    path.write_bytes(content)
    assert_refused(run_cli("report", path), None)


def test_merge_report_on_a_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "merge_report.json")
    with hang_guard():
        result = run_cli("report", tmp_path)
    assert_refused(result, None, "not a regular file")


def test_nan_twin_collapse_weights_are_refused(tmp_path, twin_directory):
    for weights in ("prose=nan", "prose=inf,code=1"):
        assert_refused(run_cli("twin-collapse", twin_directory, "--weights", weights, "--out", tmp_path / "c"),
                       tmp_path / "c", "finite")


# ---- property-based: whatever the header, what is accepted loads in the safetensors library ----

header_values = st.one_of(st.integers(-3, 2**64 + 3), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
                          st.none())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["F32", "BF16", "I8", "BOOL", "U64", "F8_E4M3", "X9", 3]),
       shape=st.lists(st.one_of(st.integers(0, 6), header_values), max_size=3),
       offsets=st.one_of(st.just(None), st.lists(header_values, max_size=3)),
       metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=3), header_values, max_size=2)),
       extra=st.integers(0, 16))
def test_accepted_headers_load_in_the_safetensors_library(tmp_path_factory, dtype, shape, offsets, metadata, extra):
    from mergekit_lite.checkpoint import open_checkpoint
    from mergekit_lite.checkpoint.safetensors_format import DTYPE_OF_CODE, element_size

    size = 0
    if isinstance(dtype, str) and dtype in DTYPE_OF_CODE and all(type(d) is int and 0 <= d < 7 for d in shape):
        size = int(np.prod(shape)) * element_size(DTYPE_OF_CODE[dtype])
    header = {"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets if offsets is not None else [0, size]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    path = tmp_path_factory.mktemp("hdr") / "model.safetensors"
    _raw_safetensors(path, header, bytes(size + (extra if extra % 4 == 0 else 0)))
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    with safe_open(str(path), framework="pt") as handle:
        for name, info in ckpt.tensors.items():
            assert tuple(handle.get_slice(name).get_shape()) == info.shape
            ckpt.read_rows(name, 0, info.shape[0] if len(info.shape) >= 2 else 1)


def test_a_full_disk_error_from_the_os_is_one_line(tmp_path, family, monkeypatch):
    """The real errno path (not a stand-in message): ENOSPC while streaming tensors."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, method="task_arithmetic"))

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_write_all", full)
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["fifo", "link out", "empty"])
def test_an_image_folder_with_a_fifo_a_link_out_or_nothing(tmp_path, resnet_dir, kind):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    if kind != "empty":
        for index in range(4):
            Image.fromarray(np.full((32, 32, 3), index * 60, dtype=np.uint8)).save(folder / f"{index}.png")
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(outside)
    if kind == "fifo":
        os.mkfifo(folder / "z.png")
    elif kind == "link out":
        (folder / "z.png").symlink_to(outside)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: pleas\nmodels:\n  - model: {resnet_dir}\n  - model: {resnet_dir}\n"
                      f"data: {{path: {folder}}}\n")
    with hang_guard():
        result = run_cli("run", recipe, tmp_path / "out")
    needle = {"fifo": "not a regular file", "link out": "outside", "empty": "no images found"}[kind]
    assert_refused(result, tmp_path / "out", needle)


def test_a_text_data_fifo_is_refused_without_hanging(tmp_path, llama_family):
    os.mkfifo(tmp_path / "prose.txt")
    (tmp_path / "code.txt").write_text("def f():\n    return 1\n" * 200)
    text = (f"merge_method: twin\nbase_model: {llama_family['base']}\nmodels:\n"
            f"  - model: {llama_family['expert1']}\n    task: prose\n    data: {{path: {tmp_path / 'prose.txt'}}}\n"
            f"  - model: {llama_family['expert2']}\n    task: code\n    data: {{path: {tmp_path / 'code.txt'}}}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with hang_guard():
        result = run_cli("run", recipe, tmp_path / "out")
    assert_refused(result, tmp_path / "out", "not a regular file")


def test_an_interrupted_pleas_merge_resumes(tmp_path, mlp_pair, monkeypatch):
    a, b = mlp_pair
    data = tmp_path / "x.safetensors"
    save_file({"x": torch.randn(64, 16)}, str(data))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\ndata: {{path: {data}}}\n")
    assert run_cli("run", recipe, tmp_path / "reference", "--quiet").exit_code == 0
    out = tmp_path / "out"
    real_write = CheckpointWriter.write
    calls = {"n": 0}

    def interrupted(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointWriter, "write", interrupted)
        assert run_cli("run", recipe, out).exit_code == 130
    assert run_cli("run", recipe, out).exit_code == 2  # the partial work is not thrown away silently
    assert run_cli("run", recipe, out, "--resume", "--quiet").exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                                     st.sampled_from(["../x.safetensors", "/etc/passwd", "model.safetensors", ""])),
                           lambda children: st.one_of(st.lists(children, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), children, max_size=3)),
                           max_leaves=6)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.one_of(json_values, st.fixed_dictionaries({"weight_map": json_values})),
       config=st.one_of(st.none(), json_values))
def test_any_index_or_config_is_read_or_refused_in_one_line(tmp_path_factory, index, config):
    from mergekit_lite.checkpoint import open_checkpoint

    directory = tmp_path_factory.mktemp("idx")
    save_file({"w": torch.ones(2)}, str(directory / "model.safetensors"))
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    try:
        open_checkpoint(directory)
    except CheckpointError as exc:
        assert "\n" not in str(exc)


def test_data_free_images_of_unrecorded_size_are_asked_for_before_any_work(tmp_path, resnet_dir):
    model = tmp_path / "model"
    shutil.copytree(resnet_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.pop("pretrained_cfg", None)
    (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: pleas\nmodels:\n  - model: {model}\n  - model: {model}\n"
                      "parameters: {data_free: true}\n")
    for command in (["validate", recipe], ["run", recipe, tmp_path / "out"]):
        assert_refused(run_cli(*command), tmp_path / "out", "does not record the input size", "shape: [3, 32, 32]")


def test_seeds_out_of_range_are_refused(tmp_path, family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family, method="dare_ties"))
    for seed in ("-1", str(2**64)):
        result = run_cli("run", recipe, tmp_path / "out", "--seed", seed)
        assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "out").exists()
    refuse_run(tmp_path, recipe_text(family, method="dare_ties") + f"seed: {2**64}\n", "seed", "2**63")


def test_the_current_home_or_root_directory_is_not_an_output(tmp_path, family, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family))
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), "/"):
        result = run_cli("run", recipe, out, "--force")
        assert result.exit_code == 2 and "name a new directory" in result.stderr, (out, result.stderr)
    assert (work / "precious.txt").read_text() == "mine"


@pytest.mark.parametrize("edit", [
    lambda m: m.update(tasks="prose"),
    lambda m: m.update(tasks=["../x"]),
    lambda m: m["tensors"].update({next(iter(m["tensors"])): {"kind": "factors", "shape": [2, 2], "rank": "3"}}),
    lambda m: m["tensors"].update({next(iter(m["tensors"])): [1, 2]}),
])
def test_a_damaged_twin_manifest_is_refused(tmp_path, twin_directory, edit):
    damaged = tmp_path / "damaged"
    shutil.copytree(twin_directory, damaged)
    manifest = json.loads((damaged / "twin.json").read_text())
    edit(manifest)
    (damaged / "twin.json").write_text(json.dumps(manifest))
    assert_refused(run_cli("twin-collapse", damaged, "--weights", "prose=1", "--out", tmp_path / "c"), tmp_path / "c",
                   "malformed")


def test_a_report_carrying_markup_is_refused_not_crashed_on(tmp_path, family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(family))
    assert run_cli("run", recipe, tmp_path / "out", "--quiet").exit_code == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    report["method"] = "[/bold]"
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert_refused(run_cli("report", tmp_path / "r.json"), None)
