"""Inference time of a Twin-Merging runtime against the shared model alone, at realistic layer sizes.

The quality suite's models are tiny, so there the fixed cost of each extra kernel call dominates. Here the
same runtime (mergekit_lite.twin: routed layers + router on the stem feature) wraps a GPT-2-small-shaped
transformer (124M parameters) and a ResNet-50, with T tasks at rank 0.1 of min(m, n). Factors are random
(timing does not depend on their values); rows are routed to tasks at random, top-1 and soft (all tasks).

    python bench/twin_overhead.py            # prints a table of time ratios (twin and shared run in turn)
    python bench/twin_overhead.py --models gpt2 --task-weight-budget 0   # factors only in linear layers
    python bench/twin_overhead.py --models resnet50 --image-size 64 --images 64   # small images: task lanes
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch

from mergekit_lite.twin.compress import rank_for
from mergekit_lite.twin.install import install_routes
from mergekit_lite.twin.routed import keep_task_weights
from mergekit_lite.twin.router import Router, pooled_features, route_weights
from mergekit_lite.twin.policy import DEFAULT_POLICY
from mergekit_lite.twin.runtime import TwinModel
from mergekit_lite.twin.store import StackedDelta


def random_deltas(model: torch.nn.Module, tasks: int, rank: float, seed: int = 0) -> dict[str, StackedDelta]:
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if tensor.dim() < 2:
            deltas[name] = StackedDelta(tuple(tensor.shape), dense=torch.randn(tasks, *tensor.shape, generator=gen) * 1e-3)
            continue
        rows, cols = tensor.shape[0], math.prod(tensor.shape[1:])
        r = rank_for((rows, cols), rank)
        deltas[name] = StackedDelta(tuple(tensor.shape), lefts=torch.randn(tasks, rows, r, generator=gen) * 1e-3,
                                    rights=torch.randn(tasks, r, cols, generator=gen) * 1e-3)
    return deltas


def paired_ms(first, second, repeats: int) -> tuple[float, float, float]:
    """Median wall times (ms) of two functions run in turn `repeats` times, and the median of the per-turn ratios
    second / first (a slow spell of the machine lands on both)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)

    def seconds(fn) -> float:
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started

    first(), second()
    sync()
    pairs = [(seconds(first), seconds(second)) for _ in range(repeats)]
    return (1000 * statistics.median(a for a, _ in pairs), 1000 * statistics.median(b for _, b in pairs),
            statistics.median(b / a for a, b in pairs))


@torch.no_grad()
def measure(name: str, build, inputs: torch.Tensor, tasks: int, repeats: int, output, device: str,
            budget: int) -> list[dict]:
    shared = build().eval().to(device)
    twin = build().eval()
    install_routes(twin, random_deltas(twin, tasks, 0.1))
    twin.to(device)
    kept_layers, kept_bytes = keep_task_weights(twin, budget)
    inputs = inputs.to(device)
    features = pooled_features(twin, "stem", inputs)
    router = Router(features.shape[1], tasks).eval().to(device)
    runtime = TwinModel(twin, router, [f"task{t}" for t in range(tasks)], "stem", 1, [])
    fast_shared = fast_inputs = None
    if inputs.dim() == 4 and device == "cpu":
        fast_shared = copy.deepcopy(shared).to(memory_format=torch.channels_last)
        fast_inputs = inputs.contiguous(memory_format=torch.channels_last)
    rows = []
    for label, top_k in (("top-1", 1), ("soft (all tasks)", 0)):
        def routed():
            runtime.route(inputs)  # the router's cost; its choice is replaced by a random one below
            weights = route_weights(torch.randn(len(inputs), tasks, device=device), top_k)
            return output(runtime(inputs, weights=weights))

        shared_ms, twin_ms, ratio = paired_ms(lambda: output(shared(inputs)), routed, repeats)
        lanes = {True: "yes", False: "no (failed the check)", None: "no"}[runtime.uses_lanes] if top_k == 1 else "–"
        fast = "–"
        if fast_shared is not None:  # images: also against the shared model in its fastest CPU layout
            fast = f"{paired_ms(lambda: output(fast_shared(fast_inputs)), routed, repeats)[2]:.2f}"
        rows.append({"model": name, "tasks": tasks, "routing": label, "shared_ms": shared_ms, "twin_ms": twin_ms,
                     "ratio": ratio, "kept_layers": kept_layers, "kept_mib": kept_bytes / 2**20, "lanes": lanes,
                     "ratio_channels_last": fast})
        print(f"| {name} | {tasks} | {label} | {kept_layers} ({kept_bytes / 2**20:.0f} MiB) | {lanes} | "
              f"{shared_ms:.0f} | {twin_ms:.0f} | {ratio:.2f} | {fast} |", flush=True)
    return rows


def gpt2_small() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=256))


def resnet50() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet50", pretrained=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="+", choices=["gpt2", "resnet50"], default=["gpt2", "resnet50"])
    parser.add_argument("--image-size", type=int, default=160, help="ResNet-50 input side in pixels")
    parser.add_argument("--images", type=int, default=0, help="ResNet-50 batch (default: 16 on the CPU, 128 on a GPU)")
    parser.add_argument("--task-weight-budget", type=float, default=DEFAULT_POLICY.task_weight_budget / 2**20, metavar="MIB",
                        help="memory that linear layers may spend on per-task weights (TwinModel.load's default)")
    args = parser.parse_args(argv)
    budget = int(args.task_weight_budget * 2**20)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("| model | tasks | routing | linear layers with kept task weights | task lanes | shared ms | twin ms | time × "
          "| × shared channels-last |\n|---|---|---|---|---|---|---|---|---|")
    batch = 8 if args.device == "cpu" else 64
    tokens = torch.randint(0, 50257, (batch, 128), generator=torch.Generator().manual_seed(0))
    side = args.image_size
    images = torch.randn(args.images or 2 * batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    for tasks in args.tasks:
        if "gpt2" in args.models:
            measure(f"GPT-2 small (124M), {batch} x 128 tokens", gpt2_small, tokens, tasks, args.repeats,
                    lambda r: r.logits, args.device, budget)
        if "resnet50" in args.models:
            measure(f"ResNet-50, {len(images)} x 3 x {side} x {side}", resnet50, images, tasks, args.repeats, lambda r: r,
                    args.device, budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
