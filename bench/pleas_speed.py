"""How long PLeaS takes to merge two ResNet-18-sized models at width 1.0 with 1,000 samples.

Two timm resnet18 models (11.2M parameters each, different random initialisations, batch-norm statistics
from a few forward passes), saved in timm's hub layout; 1,000 inputs of 3x32x32 in a tensor file; then
`merge run` on a PLeaS recipe in this process (the command's own entry), timed, with its report's split.

    python bench/pleas_speed.py [--samples 1000] [--size 32] [--target-width 1.0] [--device cpu|cuda|auto]
                                 [--tune-steps 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def build(out: Path, size: int, samples: int) -> tuple[Path, Path, Path]:
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in (0, 1):
        target = out / f"resnet18_seed{seed}"
        if not (target / "config.json").exists():
            torch.manual_seed(seed)
            model = timm.create_model("resnet18", num_classes=10)
            with torch.no_grad():
                model.train()
                for _ in range(4):
                    model(torch.randn(32, 3, size, size))
            save_for_hf(model.eval(), str(target), model_args={"num_classes": 10}, safe_serialization=True)
        paths.append(target)
    data = out / f"inputs_{samples}x{size}.safetensors"
    if not data.exists():
        gen = torch.Generator().manual_seed(0)
        save_file({"images": torch.randn(samples, 3, size, size, generator=gen)}, str(data))
    return paths[0], paths[1], data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--target-width", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "pleas_speed")
    parser.add_argument("--device", default="auto", help="where the merge runs (auto: CUDA when present)")
    parser.add_argument("--tune-steps", type=int, default=0, help="tuning toward the combined outputs (default 0, "
                        "as for a merge with data)")
    args = parser.parse_args(argv)
    a, b, data = build(args.workdir, args.size, args.samples)
    recipe = args.workdir / "recipe.yaml"
    recipe.write_text(
        f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\n"
        f"data: {{path: {data}, key: images}}\n"
        f"parameters: {{target_width: {args.target_width}, samples: {args.samples}, batch_size: 100, "
        f"tune_steps: {args.tune_steps}}}\n")
    from mergekit_lite.cli import app

    started = time.perf_counter()
    app(["run", str(recipe), str(args.workdir / "merged"), "--force", "--quiet", "--device", args.device], prog_name="merge",
        standalone_mode=False)
    wall = time.perf_counter() - started
    report = json.loads((args.workdir / "merged" / "merge_report.json").read_text())
    timings = report["timings_seconds"]
    print(f"resnet18 x2, {args.samples} samples of 3x{args.size}x{args.size}, target width {args.target_width}, "
          f"on {report['device']}, {torch.get_num_threads()} threads")
    print(f"wall {wall:.1f} s (load {timings['read']:.1f} s, merge {timings['compute']:.1f} s, "
          f"write {timings['write']:.1f} s); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"compute ratio {report['pleas']['compute_ratio']:.3f}, groups {len(report['pleas']['groups'])}, "
          f"mean match quality {sum(g['match_quality'] for g in report['pleas']['groups']) / len(report['pleas']['groups']):.3f}")
    tuning = report["pleas"].get("tuning")
    if tuning:
        print(f"tuned {tuning['steps']} steps in {tuning['seconds']:.1f} s: relative output gap "
              f"{tuning['output_gap_before']:.4f} -> {tuning['output_gap_after']:.4f}")
    print(f"under a minute: {'yes' if wall < 60 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
