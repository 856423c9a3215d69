"""Wall time and peak memory of a TIES merge of Llama-shaped checkpoints, against mergekit and the I/O floor.

Builds (once, cached under --workdir) a synthetic Llama-shaped base and experts in bfloat16, two shards each,
whose experts are the base plus small noise, then runs in separate processes:
  * `merge run` (this project) with TIES, density 0.5, on 3 experts, and again on 8 experts;
  * the I/O floor: read every input tensor and write one output, no math;
  * mergekit's `mergekit-yaml` on the same recipe, when --mergekit-venv points at an environment holding it
    (`--install-mergekit` creates one with mergekit 0.1.5 from PyPI).
Prints each run's wall time and peak RSS, and the ratios the targets are stated in.

`--method NAME` (or `--method all`) instead runs that merge method (each of them) with both tools, in mergekit's
environment, on a recipe shaped for it (base and three experts, or the one or two models it takes), and prints
one row per method: wall time and peak RSS of each tool and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint  # noqa: E402
from mergekit_lite.cli import leave  # noqa: E402
from mergekit_lite.examples import LLAMA_BENCH as SHAPES  # noqa: E402
from mergekit_lite.examples import LLAMA_SMALL as SMALL  # noqa: E402
from mergekit_lite.examples import llama_shaped_checkpoints as make_checkpoints  # noqa: E402
from mergekit_lite.examples import llama_specs  # noqa: E402

def write_recipe(path: Path, checkpoints: list[Path], dtype: str) -> Path:
    lines = ["merge_method: ties", f"base_model: {checkpoints[0]}", "models:", f"  - model: {checkpoints[0]}"]
    for expert in checkpoints[1:]:
        lines += [f"  - model: {expert}", "    parameters: {weight: 1.0, density: 0.5}"]
    lines += ["parameters: {normalize: true}", f"dtype: {dtype}"]
    path.write_text("\n".join(lines) + "\n")
    return path


# Per method: how many experts besides the base, whether the base is named, and the recipe-wide parameters.
METHOD_SHAPES = {
    "linear": (3, False, {}), "task_arithmetic": (3, True, {}), "ties": (3, True, {}),
    "dare_ties": (3, True, {}), "dare_linear": (3, True, {}), "breadcrumbs": (3, True, {"gamma": 0.01}),
    "breadcrumbs_ties": (3, True, {"gamma": 0.01}), "della": (3, True, {"epsilon": 0.1}),
    "della_linear": (3, True, {"epsilon": 0.1}), "model_stock": (3, True, {}), "sce": (3, True, {"select_topk": 0.5}),
    "ram": (3, True, {}), "ramplus_tl": (3, True, {}), "multislerp": (3, True, {}), "karcher": (3, True, {}),
    "nuslerp": (2, True, {}), "slerp": (1, True, {"t": 0.5}), "nearswap": (1, True, {"t": 0.001}),
    "arcee_fusion": (1, True, {}), "passthrough": (1, False, {}),
}
WEIGHTED = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
            "della", "della_linear", "multislerp", "nuslerp"}
DENSITY = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def method_recipe(path: Path, method: str, checkpoints: list[Path], dtype: str) -> Path:
    """A recipe both tools run for `method`: the models it takes, weights and densities where it reads them."""
    count, with_base, params = METHOD_SHAPES[method]
    lines = [f"merge_method: {method}"] + ([f"base_model: {checkpoints[0]}"] if with_base else []) + ["models:"]
    if method == "arcee_fusion":  # mergekit's arcee_fusion counts the base among its two models
        lines.append(f"  - model: {checkpoints[0]}")
    for expert in checkpoints[1:1 + count]:
        lines.append(f"  - model: {expert}")
        settings = {**({"weight": 0.5} if method in WEIGHTED else {}), **({"density": 0.5} if method in DENSITY else {})}
        if settings:
            lines.append("    parameters: " + json.dumps(settings))
    if params:
        lines.append("parameters: " + json.dumps(params))
    lines.append(f"dtype: {dtype}")
    path.write_text("\n".join(lines) + "\n")
    return path


def compare_methods(methods: list[str], checkpoints: list[Path], workdir: Path, mergekit_venv: Path) -> dict:
    """Each method with both tools, in mergekit's environment (its torch build), one after the other."""
    mergekit = mergekit_venv / "bin" / "mergekit-yaml"
    if not mergekit.exists():
        raise SystemExit(f"--method needs mergekit: {mergekit} not found (--install-mergekit creates it)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    python = str(mergekit_venv / "bin" / "python")
    rows = {}
    print(f"\n{'method':<18}{'ours s':>8}{'mergekit s':>12}{'time':>8}{'ours MiB':>10}{'mergekit MiB':>14}{'memory':>8}",
          flush=True)
    for method in methods:
        recipe = method_recipe(workdir / f"{method}.yaml", method, checkpoints, "bfloat16")
        out, theirs = workdir / "merged", workdir / "merged_mergekit"
        ours = measure([python, "-m", "mergekit_lite", "run", str(recipe), str(out), "--force", "--quiet",
                        "--device", "cpu", "--seed", "1"], env)
        shutil.rmtree(theirs, ignore_errors=True)
        mk = measure([str(mergekit), str(recipe), str(theirs), "--lazy-unpickle"])
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)
        rows[method] = {"ours": ours, "mergekit": mk, "time_ratio": ours["seconds"] / mk["seconds"],
                        "memory_ratio": ours["peak_rss"] / mk["peak_rss"]}
        print(f"{method:<18}{ours['seconds']:>8.1f}{mk['seconds']:>12.1f}{rows[method]['time_ratio']:>7.3f}x"
              f"{ours['peak_rss'] / 2**20:>10.0f}{mk['peak_rss'] / 2**20:>14.0f}{rows[method]['memory_ratio']:>7.3f}x",
              flush=True)
    return rows


# A child's peak RSS as the kernel reports it starts at its parent's high-water mark, and this process
# grows large while it builds checkpoints. So each measured command is started by a fresh, small launcher.
_LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss": usage.ru_maxrss * 1024,
                  "code": os.waitstatus_to_exitcode(status), "stderr": err.decode(errors="replace")[-3000:]}))
"""


def measure(command: list[str], env: dict | None = None) -> dict:
    """Run a command; its wall time and peak RSS (that process's own, measured from a small launcher)."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], env=env, capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if row["code"] != 0:
        raise SystemExit(f"command failed ({row['code']}): {' '.join(command)}\n{row['stderr']}")
    return {"seconds": row["seconds"], "peak_rss": row["peak_rss"]}


def io_floor(checkpoints: list[Path], out: Path) -> None:
    """Read every tensor of every input once, as the merge reads them (plain reads, whole tensors), and
    write the base's tensors out: the cost with no math at all."""
    opened = [open_checkpoint(p) for p in checkpoints]
    base = opened[0]
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in base.tensors.items()]
    with CheckpointWriter(out, specs, force=True) as writer:
        for spec in specs:
            tensors = [ckpt.get(spec.name) for ckpt in opened]
            writer.write(spec.name, tensors[0])


def install_mergekit(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit==0.1.5"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "tensorwise")
    parser.add_argument("--small", action="store_true", help="a 4-layer model, for a quick look")
    parser.add_argument("--mergekit-venv", type=Path, default=ROOT / "bench" / "out" / "mergekit-venv")
    parser.add_argument("--install-mergekit", action="store_true", help="create --mergekit-venv with mergekit 0.1.5")
    parser.add_argument("--skip-8", action="store_true", help="skip the 8-expert memory run")
    parser.add_argument("--method", help="compare one merge method with mergekit (a name, or `all`)")
    parser.add_argument("--child-io-floor", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_io_floor:
        *inputs, out = args.child_io_floor
        io_floor([Path(p) for p in inputs], Path(out))
        leave(0)  # as `merge` leaves: without the interpreter's teardown of torch

    dims = SMALL if args.small else SHAPES
    workdir = args.workdir / ("small" if args.small else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    experts = 3 if args.skip_8 else 8
    print(f"building checkpoints in {workdir} (cached) ...", flush=True)
    checkpoints = make_checkpoints(workdir, dims, experts, torch.bfloat16)
    params = sum(t.numel for t in open_checkpoint(checkpoints[0]).tensors.values())
    print(f"{params / 1e6:.0f}M parameters per model, bfloat16, 2 shards each", flush=True)
    if args.method:
        if args.install_mergekit and not (args.mergekit_venv / "bin" / "mergekit-yaml").exists():
            install_mergekit(args.mergekit_venv)
        methods = sorted(METHOD_SHAPES) if args.method == "all" else [args.method]
        unknown = [m for m in methods if m not in METHOD_SHAPES]
        if unknown:
            raise SystemExit(f"unknown method {unknown[0]!r}; one of: all, {', '.join(sorted(METHOD_SHAPES))}")
        rows = compare_methods(methods, checkpoints, workdir, args.mergekit_venv)
        (workdir / f"methods_{args.method}.json").write_text(json.dumps(rows, indent=2))
        return
    three = write_recipe(workdir / "ties3.yaml", checkpoints[:4], "bfloat16")
    merge = [str(ROOT / ".venv" / "bin" / "merge")] if (ROOT / ".venv" / "bin" / "merge").exists() else [
        sys.executable, "-m", "mergekit_lite"]
    results = {}
    out = workdir / "merged"
    results["io_floor"] = measure([sys.executable, __file__, "--child-io-floor", *map(str, checkpoints[:4]), str(out)])
    results["ours_3"] = measure(merge + ["run", str(three), str(out), "--force", "--quiet", "--device", "cpu"])
    if not args.skip_8:
        eight = write_recipe(workdir / "ties8.yaml", checkpoints[:9], "bfloat16")
        results["ours_8"] = measure(merge + ["run", str(eight), str(out), "--force", "--quiet", "--device", "cpu"])
    if args.install_mergekit and not (args.mergekit_venv / "bin" / "mergekit-yaml").exists():
        install_mergekit(args.mergekit_venv)
    mergekit = args.mergekit_venv / "bin" / "mergekit-yaml"
    if mergekit.exists():
        # Both tools in one environment (mergekit's, with its torch build), so neither pays for a different torch.
        venv_python = str(args.mergekit_venv / "bin" / "python")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        results["ours_3_same_env"] = measure(
            [venv_python, "-m", "mergekit_lite", "run", str(three), str(out), "--force", "--quiet", "--device", "cpu"], env)
        results["io_floor_same_env"] = measure(
            [venv_python, __file__, "--child-io-floor", *map(str, checkpoints[:4]), str(out)], env)
        shutil.rmtree(workdir / "merged_mergekit", ignore_errors=True)
        results["mergekit_3"] = measure([str(mergekit), str(three), str(workdir / "merged_mergekit"), "--lazy-unpickle"])
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(workdir / "merged_mergekit", ignore_errors=True)

    largest = max(s.nbytes for s in llama_specs(dims, torch.float32))
    print(f"\n{'run':<28}{'wall s':>9}{'peak RSS MiB':>14}")
    for name, row in results.items():
        print(f"{name:<28}{row['seconds']:>9.1f}{row['peak_rss'] / 2**20:>14.0f}")
    ours = results["ours_3"]
    print(f"\nours / I/O floor: time {ours['seconds'] / results['io_floor']['seconds']:.2f}x, "
          f"memory {ours['peak_rss'] / results['io_floor']['peak_rss']:.2f}x")
    if "mergekit_3" in results:
        mk, same = results["mergekit_3"], results["ours_3_same_env"]
        floor = results["io_floor_same_env"]
        print("same environment as mergekit (its torch build):")
        print(f"  ours / mergekit:  time {same['seconds'] / mk['seconds']:.3f}x (target <= 0.15), "
              f"memory {same['peak_rss'] / mk['peak_rss']:.3f}x (target <= 0.5)")
        print(f"  I/O floor / mergekit: time {floor['seconds'] / mk['seconds']:.3f}x, memory {floor['peak_rss'] / mk['peak_rss']:.3f}x")
    if "ours_8" in results:
        extra = results["ours_8"]["peak_rss"] - ours["peak_rss"]
        print(f"8 experts vs 3: +{extra / 2**20:.0f} MiB; budget 5 extra inputs' largest tensor (float32) = "
              f"{5 * largest / 2**20:.0f} MiB -> {'within' if extra <= 5 * largest else 'OVER'}")
    (workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
