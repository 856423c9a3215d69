"""Where a routed Twin-Merging forward pass spends its time (torch profiler), for one model of twin_overhead.py.

    python bench/twin_profile.py --model resnet50 --device cuda --tasks 4
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from twin_overhead import gpt2_small, random_deltas, resnet50
from mergekit_lite.twin.install import install_routes
from mergekit_lite.twin.router import Router
from mergekit_lite.twin.runtime import TwinModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("resnet50", "gpt2"), default="resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    build = resnet50 if args.model == "resnet50" else gpt2_small
    twin = build().eval()
    install_routes(twin, random_deltas(twin, args.tasks, 0.1))
    twin.to(args.device)
    if args.model == "resnet50":
        x = torch.randn(args.batch, 3, 160, 160, device=args.device)
    else:
        x = torch.randint(0, 50257, (args.batch, 128), device=args.device)
    weights = torch.nn.functional.one_hot(torch.randint(0, args.tasks, (args.batch,)), args.tasks).float().to(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    runtime = TwinModel(twin, Router(1, args.tasks), [str(t) for t in range(args.tasks)], "stem", 1, [])
    with torch.no_grad():
        for _ in range(2):
            runtime(x, weights=weights)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            runtime(x, weights=weights)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
