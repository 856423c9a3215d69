"""What going through Ray costs, and how long a merge takes on N nodes.

1. Measured: the 271M-parameter benchmark of bench/tensorwise.py (base and three experts, TIES, bfloat16)
   merged locally and on a Ray cluster of two single-CPU workers started here (`ray start`, loopback), each run in
   a fresh process, alternated three times; prints the median wall times and their ratio (the cost of Ray:
   joining the cluster, the workers loading torch, every task planning the merge again).
2. Modelled: a merge reads every input byte once and writes the output once. On N nodes that read from shared
   storage, the time is about max(bytes read / (N x node read rate), bytes read / storage rate) + bytes written /
   min(N x node write rate, storage rate) + compute / (N x cores), plus a fixed start-up cost. Prints that for the
   sizes given (default: eight 70B experts and their base in bfloat16) on 1, 4 and 16 nodes; the rates are
   arguments, with the defaults written in docs/cluster.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tensorwise import measure, write_recipe  # noqa: E402

GB = 1e9


def model_seconds(models: int, parameters: float, bytes_per_parameter: float, nodes: int, node_read: float,
                  node_write: float, storage: float, compute_per_byte: float, startup: float) -> dict[str, float]:
    """The modelled wall time of a merge of `models` inputs (base included) into one output on `nodes` nodes."""
    read = models * parameters * bytes_per_parameter
    written = parameters * bytes_per_parameter
    reading = max(read / (nodes * node_read), read / storage)
    writing = written / min(nodes * node_write, storage)
    compute = read * compute_per_byte / nodes
    return {"read_GB": read / GB, "seconds": startup + reading + writing + compute, "reading": reading,
            "writing": writing, "compute": compute}


def _cluster(temp: str, env: dict) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
                    *common], check=True, env=env, capture_output=True)
    subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], check=True, env=env, capture_output=True)
    return f"127.0.0.1:{port}"


def measured(workdir: Path, repeats: int) -> dict[str, dict]:
    from mergekit_lite.examples import LLAMA_BENCH, llama_shaped_checkpoints

    import torch

    checkpoints = llama_shaped_checkpoints(workdir, LLAMA_BENCH, 3, torch.bfloat16)
    recipe = write_recipe(workdir / "ties3.yaml", checkpoints[:4], "bfloat16")
    out = workdir / "merged"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    merge = [sys.executable, "-m", "mergekit_lite", "run", str(recipe), str(out), "--force", "--quiet", "--device",
             "cpu", "--shard-size", "70MB"]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    runs: dict[str, list[dict]] = {"local": [], "ray_2_workers": []}
    try:
        address = _cluster(temp, env)
        time.sleep(1)
        for _ in range(repeats):  # alternated, so that a slow spell of the machine hits both
            runs["local"].append(measure(merge, env))
            runs["ray_2_workers"].append(measure(merge + ["--ray", address], env))
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=env, capture_output=True)
    rows = {name: {"seconds": statistics.median(r["seconds"] for r in found),
                   "peak_rss": max(r["peak_rss"] for r in found), "all_seconds": [r["seconds"] for r in found]}
            for name, found in runs.items()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "tensorwise" / "full")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated; medians are compared")
    parser.add_argument("--model-only", action="store_true", help="print the model, measure nothing")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--parameters", type=float, default=70e9)
    parser.add_argument("--bytes-per-parameter", type=float, default=2.0)
    parser.add_argument("--node-read", type=float, default=1.25, help="GB/s one node reads from shared storage")
    parser.add_argument("--node-write", type=float, default=1.25, help="GB/s one node writes to it")
    parser.add_argument("--storage", type=float, default=20.0, help="GB/s the shared storage serves in all")
    parser.add_argument("--compute", type=float, default=4.0,
                        help="seconds of merge math per GB read on one core (a task runs on one core)")
    parser.add_argument("--cores", type=int, default=16, help="cores per node, each running one task")
    parser.add_argument("--startup", type=float, default=30.0, help="seconds to plan and start the tasks")
    args = parser.parse_args()
    if not args.model_only:
        rows = measured(args.workdir, args.repeats)
        print(f"{'run':<16}{'median s':>9}{'peak RSS MiB':>14}  each run, s")
        for name, row in rows.items():
            each = " ".join(f"{seconds:.1f}" for seconds in row["all_seconds"])
            print(f"{name:<16}{row['seconds']:>9.1f}{row['peak_rss'] / 2**20:>14.0f}  {each}")
        print(f"ray (2 workers) / local: {rows['ray_2_workers']['seconds'] / rows['local']['seconds']:.2f}x "
              "(target <= 1.3)")
        (args.workdir / "ray_scale.json").write_text(json.dumps(rows, indent=2))
    models = args.experts + 1
    print(f"\nmodel: {args.experts} experts + base of {args.parameters / 1e9:.0f}B parameters, "
          f"{args.bytes_per_parameter:g} bytes each; node read {args.node_read} GB/s, write {args.node_write} GB/s, "
          f"storage {args.storage} GB/s, {args.compute} s of math per GB and core, {args.cores} cores per node, "
          f"{args.startup:.0f} s start-up")
    print(f"{'nodes':>6}{'read GB':>10}{'reading s':>11}{'writing s':>11}{'math s':>9}{'total min':>11}")
    for nodes in (1, 4, 16):
        row = model_seconds(models, args.parameters, args.bytes_per_parameter, nodes, args.node_read * GB,
                            args.node_write * GB, args.storage * GB, args.compute / args.cores / GB, args.startup)
        print(f"{nodes:>6}{row['read_GB']:>10.0f}{row['reading']:>11.0f}{row['writing']:>11.0f}{row['compute']:>9.0f}"
              f"{row['seconds'] / 60:>11.1f}")


if __name__ == "__main__":
    main()
