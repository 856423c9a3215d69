"""PLeaS on a model family its defaults were not chosen on: two timm `test_resnet`s at their default widths,
three input channels, trained from scratch with different seeds on 32 px digit images (the quality suite's
models are narrower, one-channel and 16 px). Prints each model's test accuracy, the ensemble, averaging, and
PLeaS at width 1.0 with the task's unlabeled training images and data-free (generic images), with the time and
peak memory of each merge (`merge run` in a subprocess).
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
    return out, seconds, report["peak_memory"]["rss_bytes"] / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pleas_second_family_"))
    work.mkdir(parents=True, exist_ok=True)
    test = digits_32("test")
    a = work / "a" if (work / "a" / "model.safetensors").exists() else train(1, work / "a", args.epochs)
    b = work / "b" if (work / "b" / "model.safetensors").exists() else train(2, work / "b", args.epochs)
    from safetensors.torch import save_file

    unlabeled = work / "train_images.safetensors"
    save_file({"images": digits_32("train").images}, str(unlabeled))
    rows = [("model A", accuracy(a, test), None, None), ("model B", accuracy(b, test), None, None)]
    from mergekit_lite.pleas import load_model

    loaded = [load_model(p) for p in (a, b)]
    mean = sum(models.vision_probabilities(m, test) for m in loaded) / 2
    rows.append(("ensemble", models.accuracy(mean, test.labels), None, None))
    head = f"merge_method: pleas\nmodels:\n  - model: {a}\n  - model: {b}\n"
    recipes = {
        "averaging": f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n",
        "PLeaS 1.0x, task images": head + f"data: {{path: {unlabeled}}}\nparameters: {{samples: 1078}}\n",
        "PLeaS 1.0x, data-free": head + "data: {kind: generic, shape: [3, 32, 32]}\nparameters: {data_free: true}\n",
    }
    for index, (name, recipe) in enumerate(recipes.items()):
        out, seconds, rss = merge(recipe, work, f"merge{index}")
        rows.append((name, accuracy(out, test), seconds, rss))
    print(f"two test_resnets (3 x 32 px digits, seeds 1 and 2, {args.epochs} epochs), test accuracy:")
    for name, acc, seconds, rss in rows:
        extra = f"  {seconds:6.1f} s  peak RSS {rss:.2f} GiB" if seconds is not None else ""
        print(f"  {name:<28}{acc:7.1%}{extra}")


if __name__ == "__main__":
    main()
