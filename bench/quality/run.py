"""Merge quality on real data: train small models, merge them with `merge run`, score them, print tables.

    python bench/quality/run.py            # the full suite (cached under bench/out/quality), RESULTS.md + JSON
    python bench/quality/run.py --quick    # about a minute: two domains per modality, no grid, checks only

Trained checkpoints and every score are cached, so a rerun only does what is missing (`--fresh` clears).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # bench/: twin_overhead's paired timing

import torch  # noqa: E402

import suite  # noqa: E402
from tables import markdown  # noqa: E402


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}"


def self_merge_check(ws: suite.Workspace) -> dict:
    """A merge of one expert with itself must give that expert back, tensor for tensor and score for score."""
    from safetensors.torch import load_file

    paths = suite.vision_models(ws)
    expert = paths[ws.plan.vision_domains[0]]
    work = ws.root / "self_merge"
    work.mkdir(parents=True, exist_ok=True)
    recipe = suite.write_recipe(work / "recipe.yaml", "linear", None, [expert, expert], {})
    suite.merge_run(recipe, work / "out")
    merged = load_file(str(work / "out" / "model.safetensors"))
    original = load_file(str(expert / "model.safetensors"))
    task = suite.vision_task(ws.plan.vision_domains)
    result = {
        "identical_tensors": merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in original),
        "merged_scores": task.score(work / "out", "test"),
        "expert_scores": task.score(expert, "test"),
    }
    shutil.rmtree(work)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small CI version (checks, no grid)")
    parser.add_argument("--workdir", type=Path, default=None, help="cache directory (default bench/out/quality[-quick])")
    parser.add_argument("--fresh", action="store_true", help="delete the cache first")
    parser.add_argument("--results", type=Path, default=None, help="markdown output (default: RESULTS.md here, full run)")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1),
                        help="torch threads for training and scoring (default: one per CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    logging.getLogger("timm").setLevel(logging.ERROR)  # 1-channel inputs: timm notes it averages its RGB mean
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    plan = suite.Plan.fast() if args.quick else suite.Plan.full()
    root = args.workdir or HERE.parent / "out" / ("quality-quick" if args.quick else "quality")
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    ws = suite.Workspace(root, plan)
    started = time.perf_counter()
    report = suite.run(ws)
    report["self_merge"] = self_merge_check(ws)
    report["machine"] = machine()
    report["command"] = "python bench/quality/run.py" + (" --quick" if args.quick else "")
    report["wall_seconds"] = time.perf_counter() - started
    (root / "report.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    print(text)
    target = args.results or (None if args.quick else HERE / "RESULTS.md")
    if target is not None:
        target.write_text(text)
        (target.with_suffix(".json")).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
