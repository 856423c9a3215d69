"""Crash safety: SIGKILL a merge at random moments, then check the output path and resume.

Each trial starts `merge run` on Llama-shaped checkpoints (4 layers, 7M parameters, base + 3 experts,
DARE-TIES with a seed), kills it with SIGKILL at a random time, and checks that the output path holds
either nothing or a complete checkpoint byte-identical to an uninterrupted run; when it holds nothing,
`merge run --resume` must finish the merge with the same bytes. Prints the counts and timings.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergekit_lite.checkpoint.writer import JOURNAL, partial_dir  # noqa: E402
from mergekit_lite.examples import LLAMA_SMALL, llama_shaped_checkpoints  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crash_safety_"))
    try:
        paths = llama_shaped_checkpoints(work / "models", LLAMA_SMALL, 3, torch.bfloat16)
        recipe = work / "recipe.yaml"
        lines = ["merge_method: dare_ties", f"base_model: {paths[0]}", "models:"]
        for path in paths[1:]:
            lines += [f"  - model: {path}", "    parameters: {weight: 1.0, density: 0.5}"]
        recipe.write_text("\n".join(lines) + "\nseed: 3\n")
        command = [sys.executable, "-m", "mergekit_lite", "run", str(recipe)]
        started = time.perf_counter()
        subprocess.run(command + [str(work / "reference"), "--quiet"], check=True, cwd=ROOT)
        full = time.perf_counter() - started
        expected = (work / "reference" / "model.safetensors").read_bytes()
        rng = random.Random(args.seed)
        counts = {"nothing at target": 0, "complete at target": 0, "broken at target": 0,
                  "resumed identical": 0, "resume kept tensors": 0}
        resume_seconds = []
        for trial in range(args.trials):
            out = work / f"out{trial}"
            proc = subprocess.Popen(command + [str(out), "--quiet"], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # Half the kills anywhere in the run, half in its last second, where tensors are being written.
            low = 0.2 if trial % 2 == 0 else max(0.2, full - 1.0)
            time.sleep(rng.uniform(low, full * 1.05))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if out.exists():
                good = (out / "model.safetensors").is_file() and (out / "model.safetensors").read_bytes() == expected
                counts["complete at target" if good else "broken at target"] += 1
                continue
            counts["nothing at target"] += 1
            journal = partial_dir(out) / JOURNAL
            if journal.is_file() and len(journal.read_text().splitlines()) > 1:
                counts["resume kept tensors"] += 1
            started = time.perf_counter()
            subprocess.run(command + [str(out), "--resume", "--quiet"], check=True, cwd=ROOT)
            resume_seconds.append(time.perf_counter() - started)
            if (out / "model.safetensors").read_bytes() == expected:
                counts["resumed identical"] += 1
        print(f"{args.trials} SIGKILL trials; an uninterrupted merge takes {full:.1f} s (start-up included)")
        for key, value in counts.items():
            print(f"  {key:<22}{value}")
        if resume_seconds:
            print(f"  resume time: mean {sum(resume_seconds) / len(resume_seconds):.1f} s")
        if counts["broken at target"] or counts["resumed identical"] != counts["nothing at target"]:
            raise SystemExit("FAILED: a trial left a broken output or a resume differed")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
