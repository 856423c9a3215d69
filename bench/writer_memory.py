"""Peak memory of the streaming writer while it writes a ~2 GB sharded checkpoint.

Each tensor is made, written and dropped before the next, so the writer's peak should stay near one tensor
above the baseline; a writer that buffers a shard (or the model) would show gigabytes instead.
Prints baseline RSS, peak RSS, the largest tensor, and their ratio.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mergekit_lite.checkpoint import CheckpointWriter, TensorSpec, open_checkpoint  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total-gb", type=float, default=2.0)
    parser.add_argument("--tensor-mb", type=float, default=64.0, help="size of each float32 tensor")
    parser.add_argument("--shard-gb", type=float, default=0.5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    numel = int(args.tensor_mb * 2**20 / 4)
    count = int(args.total_gb * 2**30 / (numel * 4))
    specs = [TensorSpec(f"layers.{i}.weight", torch.float32, (numel // 1024, 1024)) for i in range(count)]
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    out = scratch / "ckpt"
    gen = torch.Generator().manual_seed(0)
    torch.randn(16, generator=gen)  # warm up allocator and RNG before the baseline
    baseline = rss_bytes()
    started = time.perf_counter()
    try:
        with CheckpointWriter(out, specs, max_shard_bytes=int(args.shard_gb * 2**30)) as writer:
            for spec in specs:
                tensor = torch.empty(spec.shape).uniform_(generator=gen)
                writer.write(spec.name, tensor)
                del tensor
        elapsed = time.perf_counter() - started
        peak = peak_rss_bytes()
        ckpt = open_checkpoint(out)
        written = ckpt.total_bytes
        shards = len(ckpt.shards)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tensor_bytes = numel * 4
    over = peak - baseline
    print(f"wrote {written / 2**30:.2f} GiB in {shards} shards, {count} tensors of {tensor_bytes / 2**20:.0f} MiB, {elapsed:.1f} s")
    print(f"baseline RSS        {baseline / 2**20:8.0f} MiB")
    print(f"peak RSS            {peak / 2**20:8.0f} MiB")
    print(f"peak above baseline {over / 2**20:8.0f} MiB = {over / tensor_bytes:.2f} x one tensor, "
          f"{over / written:.3f} x the checkpoint")


if __name__ == "__main__":
    main()
