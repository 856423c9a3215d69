"""Wall time and peak memory of a TIES merge of Llama-shaped checkpoints, against mergekit and the I/O floor.

Builds (once, cached under --workdir) a synthetic Llama-shaped base and experts in bfloat16, two shards each,
whose experts are the base plus small noise, then runs in separate processes:
  * `merge run` (this project) with TIES, density 0.5, on 3 experts, and again on 8 experts;
  * the I/O floor: read every input tensor and write one output, no math;
  * mergekit's `mergekit-yaml` on the same recipe, when --mergekit-venv points at an environment holding it
    (`--install-mergekit` creates one with mergekit 0.1.5 from PyPI).
Prints each run's wall time and peak RSS, and the ratios the targets are stated in.
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
    parser.add_argument("--child-io-floor", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_io_floor:
        *inputs, out = args.child_io_floor
        io_floor([Path(p) for p in inputs], Path(out))
        return

    dims = SMALL if args.small else SHAPES
    workdir = args.workdir / ("small" if args.small else "full")
    workdir.mkdir(parents=True, exist_ok=True)
    experts = 3 if args.skip_8 else 8
    print(f"building checkpoints in {workdir} (cached) ...", flush=True)
    checkpoints = make_checkpoints(workdir, dims, experts, torch.bfloat16)
    params = sum(t.numel for t in open_checkpoint(checkpoints[0]).tensors.values())
    print(f"{params / 1e6:.0f}M parameters per model, bfloat16, 2 shards each", flush=True)
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
