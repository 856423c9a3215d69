"""Crash safety: SIGKILL merges at random moments, then check the output path and resume.

Three kinds of trial, `--trials` each (20 by default):
- merge: `merge run` on Llama-shaped checkpoints (8 layers, 42M parameters, base + 3 experts, DARE-TIES with a
  seed) killed at a random time; the output path must hold nothing or a complete checkpoint byte-identical to an
  uninterrupted run, and when it holds nothing, `merge run --resume` must finish with the same bytes;
- resume: the same merge killed once, then killed again at a random time while `--resume` continues it (while
  it re-checks the journal, or while it merges the rest); a last `--resume` must still give the same bytes;
- twin: a Twin-Merging run (shared merge, compression, router training) on smaller ones (4 layers, 7M), killed at a
  random time; nothing or a complete directory at the path, and `--resume` gives every file of an uninterrupted
  run, byte for byte.
Prints the counts and timings; exits non-zero if any trial left a broken output or resumed to other bytes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergekit_lite.checkpoint.writer import JOURNAL, partial_dir  # noqa: E402
from mergekit_lite.examples import LLAMA_SMALL, llama_shaped_checkpoints  # noqa: E402
from mergekit_lite.twin.build import STAGES  # noqa: E402

COMMAND = [sys.executable, "-m", "mergekit_lite", "run"]
LLAMA_MEDIUM = {"hidden": 512, "layers": 8, "intermediate": 1408, "vocab": 16000, "heads": 8}


def run_killed(recipe: Path, out: Path, delay: float, extra: tuple[str, ...] = ()) -> None:
    proc = subprocess.Popen(COMMAND + [str(recipe), str(out), "--quiet", *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def run_to_end(recipe: Path, out: Path, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(COMMAND + [str(recipe), str(out), "--quiet", *extra], check=True, cwd=ROOT)
    return time.perf_counter() - started


def weights(directory: Path) -> dict[str, bytes]:
    """Every safetensors file under a merged directory, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.safetensors"))}


def kept_work(out: Path) -> bool:
    """Whether an interrupted run left work for --resume: journaled tensors, or finished Twin-Merging stages."""
    partial = partial_dir(out)
    if not partial.exists():
        return False
    journaled = sum(max(0, len(j.read_text().splitlines()) - 1) for j in partial.rglob(JOURNAL))
    return journaled > 0 or (partial / STAGES).exists()


def startup_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergekit_lite", "--version"], check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - started


def trials(kind: str, recipe: Path, work: Path, count: int, rng: random.Random) -> bool:
    """Run `count` trials of one kind; print what they left; True when every one was safe."""
    full = run_to_end(recipe, work / f"{kind}_reference")
    startup = startup_seconds()
    expected = weights(work / f"{kind}_reference")
    counts = {"nothing at target": 0, "complete at target": 0, "broken at target": 0, "resumed identical": 0,
              "resume kept work": 0}
    resume_seconds = []
    for trial in range(count):
        out = work / f"{kind}{trial}"
        work_time = max(full - startup, 0.1)
        if kind == "resume":  # killed mid-merge, then the resume killed early (re-checking) or anywhere after
            run_killed(recipe, out, startup + rng.uniform(0.2, 0.8) * work_time)
            if not out.exists():
                run_killed(recipe, out, startup + rng.uniform(0.0, 0.8) * work_time, ("--resume",))
        else:
            # Half the kills anywhere after start-up, half in the last second, where files are sealed and
            # published (a Twin-Merging run's stages are spread out, so its kills are all anywhere).
            low = startup if trial % 2 == 0 or kind == "twin" else max(startup, full - 1.0)
            run_killed(recipe, out, rng.uniform(low, full * 1.05))
        if out.exists():
            complete = weights(out) == expected
            counts["complete at target" if complete else "broken at target"] += 1
            continue
        counts["nothing at target"] += 1
        counts["resume kept work"] += kept_work(out)
        resume_seconds.append(run_to_end(recipe, out, "--resume"))
        counts["resumed identical"] += weights(out) == expected
    print(f"{kind}: {count} SIGKILL trials; an uninterrupted run takes {full:.1f} s (start-up included)")
    for key, value in counts.items():
        print(f"  {key:<22}{value}")
    if resume_seconds:
        print(f"  resume time: mean {sum(resume_seconds) / len(resume_seconds):.1f} s")
    return not counts["broken at target"] and counts["resumed identical"] == counts["nothing at target"]


def write_recipes(work: Path) -> dict[str, Path]:
    paths = llama_shaped_checkpoints(work / "models", LLAMA_SMALL, 3, torch.bfloat16)
    # a merge long enough (about 3 s of work past start-up) for kills to land inside it, not only around it
    medium = llama_shaped_checkpoints(work / "medium", LLAMA_MEDIUM, 3, torch.bfloat16)
    merge = work / "merge.yaml"
    lines = ["merge_method: dare_ties", f"base_model: {medium[0]}", "models:"]
    for path in medium[1:]:
        lines += [f"  - model: {path}", "    parameters: {weight: 1.0, density: 0.5}"]
    merge.write_text("\n".join(lines) + "\nseed: 3\n")
    twin = work / "twin.yaml"
    lines = ["merge_method: twin", f"base_model: {paths[0]}", "models:"]
    for index, path in enumerate(paths[1:3]):
        ids = np.random.default_rng(index).integers(index * 4000, index * 4000 + 3000, (64, 32))
        np.save(work / f"task{index}.npy", ids)
        lines += [f"  - model: {path}", f"    task: task{index}", f"    data: {{path: {work / f'task{index}.npy'}}}"]
    twin.write_text("\n".join(lines) + "\nparameters: {rank: 0.1, router_samples: 64, router_epochs: 20}\nseed: 3\n")
    return {"merge": merge, "resume": merge, "twin": twin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="merge,resume,twin", help="comma-separated: merge, resume, twin")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crash_safety_"))
    try:
        recipes = write_recipes(work)
        rng = random.Random(args.seed)
        safe = [trials(kind, recipes[kind], work, args.trials, rng) for kind in args.kinds.split(",")]
        if not all(safe):
            raise SystemExit("FAILED: a trial left a broken output or a resume differed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
