"""PLeaS on two model families, the second one built apart from the quality suite that chose the defaults.

- second (default): two timm `test_resnet`s at their default widths, three input channels, trained from scratch
  with different seeds on 32 px digit images;
- first: the quality suite's pairs (narrow one-channel 16 px ResNets, seeds 1 and 2; one pair on the same task,
  one on the two halves of the labels), built as the suite builds them.

Prints each model's test accuracy, the ensemble, averaging, and PLeaS at width 1.0 with the task's unlabeled
training images and data-free (generic images), with the time, phases and peak memory of each merge (`merge
run` in a subprocess). `--compare-samples` adds data-free at 1,000 inputs (the default before it became 256).

    python bench/pleas_families.py [--family first] [--workdir DIR] [--compare-samples]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "quality"))

import data  # noqa: E402
import models  # noqa: E402
import suite  # noqa: E402
from data import ImageSet  # noqa: E402

SIZE = 32


def digits_32(split: str) -> ImageSet:
    """The suite's clean digits split, at 32 px and three channels."""
    images = data.image_domain("clean", split)
    resized = torch.nn.functional.interpolate(images.images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ImageSet(resized.repeat(1, 3, 1, 1).contiguous(), images.labels)


def train(seed: int, directory: Path, epochs: int) -> Path:
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    models.train_vision(model, digits_32("train"), epochs=epochs, lr=0.05, seed=seed, weight_decay=5e-4)
    save_for_hf(model, str(directory), model_args={"num_classes": 10}, safe_serialization=True)
    return directory


def accuracy(directory: Path, test: ImageSet) -> float:
    from mergekit_lite.pleas import load_model

    return models.accuracy(models.vision_probabilities(load_model(directory), test), test.labels)


def merge(recipe: str, work: Path, name: str) -> tuple[Path, float, float]:
    """`merge run` in a subprocess: (output, seconds, peak RSS in GiB of that process)."""
    path = work / f"{name}.yaml"
    path.write_text(recipe)
    out = work / name
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergekit_lite", "run", str(path), str(out), "--force", "--quiet"],
                   check=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    report = json.loads((out / "merge_report.json").read_text())
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in report.get("timings_seconds", {}).items())
    print(f"  {name}: {phases}", flush=True)
    return out, seconds, report["peak_memory"]["rss_bytes"] / 2**30


def second_family(work: Path, epochs: int) -> list[tuple[str, list[Path], ImageSet, ImageSet, list[int]]]:
    a = work / "a" if (work / "a" / "model.safetensors").exists() else train(1, work / "a", epochs)
    b = work / "b" if (work / "b" / "model.safetensors").exists() else train(2, work / "b", epochs)
    return [(f"two test_resnets (3 x 32 px digits, seeds 1 and 2, {epochs} epochs)", [a, b], digits_32("train"),
             digits_32("test"), [3, SIZE, SIZE])]


def first_family(work: Path) -> list[tuple[str, list[Path], ImageSet, ImageSet, list[int]]]:
    """The quality suite's experiment-3 pairs, trained as the suite trains them (cached in `work`)."""
    pairs = []
    for name, labels_pair in suite.SCRATCH_PAIRS.items():
        paths = suite.scratch_pair(work, suite.Plan.full(), labels_pair, print)
        size = data.IMAGE_SIZE
        pairs.append((f"quality suite pair, {name} (1 x {size} px digits)", paths, data.image_domain("clean", "train"),
                      data.image_domain("clean", "test"), [1, size, size]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("first", "second"), default="second")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of the second family")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--compare-samples", action="store_true", help="also data-free at 1,000 inputs")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pleas_families_"))
    work.mkdir(parents=True, exist_ok=True)
    pairs = second_family(work, args.epochs) if args.family == "second" else first_family(work)
    from safetensors.torch import save_file

    from mergekit_lite.pleas import load_model

    for pair_index, (title, (a, b), train_set, test, shape) in enumerate(pairs):
        unlabeled = work / f"train_images_{pair_index}.safetensors"
        save_file({"images": train_set.images.contiguous()}, str(unlabeled))
        rows = [("model A", accuracy(a, test), None, None), ("model B", accuracy(b, test), None, None)]
        loaded = [load_model(p) for p in (a, b)]
        mean = sum(models.vision_probabilities(m, test) for m in loaded) / 2
        rows.append(("ensemble", models.accuracy(mean, test.labels), None, None))
        head = f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\n"
        generic = f"data: {{kind: generic, shape: {shape}}}\n"
        recipes = {
            "averaging": f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n",
            "PLeaS 1.0x, task images": head + f"data: {{path: {unlabeled}}}\nparameters: {{samples: 1078}}\n",
            "PLeaS 1.0x, data-free": head + generic + "parameters: {data_free: true}\n",
        }
        if args.compare_samples:
            recipes["PLeaS 1.0x, data-free, 1000"] = head + generic + "parameters: {data_free: true, samples: 1000}\n"
        for index, (name, recipe) in enumerate(recipes.items()):
            out, seconds, rss = merge(recipe, work, f"merge{pair_index}_{index}")
            rows.append((name, accuracy(out, test), seconds, rss))
        print(f"{title}, test accuracy:")
        with_data = next(seconds for name, _, seconds, _ in rows if name == "PLeaS 1.0x, task images")
        for name, acc, seconds, rss in rows:
            extra = f"  {seconds:6.1f} s  peak RSS {rss:.2f} GiB" if seconds is not None else ""
            if seconds is not None and "data-free" in name:
                extra += f"  ({seconds / with_data:.1f}x the merge with data)"
            print(f"  {name:<30}{acc:7.1%}{extra}", flush=True)


if __name__ == "__main__":
    main()
