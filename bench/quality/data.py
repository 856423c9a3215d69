"""Real data that ships with packages: scikit-learn's handwritten digits and text from Python's own install.

Image domains share the ten digit labels and the same image split; each applies one fixed transform.
Text domains are English prose (pydoc's topic help), Python source from the standard library, and Unicode
character names (from `unicodedata`). A second family of text domains, used only to check defaults chosen on
the first, comes from the installed packages: torch's C++ headers, the packages' METADATA descriptions,
scikit-learn's CSV tables and the packages' JSON files. Every split is fixed by a seed; the test split is never
used to choose settings.
"""

from __future__ import annotations

import inspect
import os
import sysconfig
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 16
SPLIT_SEED = 0
SPLITS = ("train", "val", "test")


def _seeded_noise(x: torch.Tensor, salt: int) -> torch.Tensor:
    """Noise fixed per image position (the same image always gets the same noise)."""
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(salt))


def _blur(x: torch.Tensor) -> torch.Tensor:
    grid = torch.arange(5, dtype=torch.float32) - 2
    kernel = torch.exp(-grid**2 / (2 * 1.2**2))
    kernel = (kernel[:, None] * kernel[None, :]) / kernel.sum() ** 2
    return torch.nn.functional.conv2d(x, kernel[None, None], padding=2)


def _rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    angle = torch.tensor(degrees * torch.pi / 180)
    matrix = torch.tensor([[torch.cos(angle), -torch.sin(angle), 0.0], [torch.sin(angle), torch.cos(angle), 0.0]])
    grid = torch.nn.functional.affine_grid(matrix.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def _shear(x: torch.Tensor, amount: float) -> torch.Tensor:
    matrix = torch.tensor([[1.0, amount, 0.0], [0.0, 1.0, 0.0]])
    grid = torch.nn.functional.affine_grid(matrix.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def _occlude(x: torch.Tensor) -> torch.Tensor:
    """A 6x6 patch blanked at a position fixed per image."""
    gen = torch.Generator().manual_seed(7)
    corners = torch.randint(0, IMAGE_SIZE - 6, (len(x), 2), generator=gen)
    out = x.clone()
    for i, (row, col) in enumerate(corners.tolist()):
        out[i, :, row: row + 6, col: col + 6] = 0.0
    return out


def _stripes(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[..., ::3, :] = torch.clamp(out[..., ::3, :] + 0.6, max=1.0)
    return out


# Domain name -> transform of a batch of images (N, 1, H, W) in [0, 1]. Each keeps every digit readable
# (no rotation by 180 degrees that turns a 6 into a 9), so one model can serve all of them.
IMAGE_DOMAINS = {
    "clean": lambda x: x,
    "invert": lambda x: 1.0 - x,
    "noise": lambda x: x + 0.35 * _seeded_noise(x, 3),
    "blur": _blur,
    "rotate": lambda x: _rotate(x, 30.0),
    "thick": lambda x: torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1),
    "occlude": _occlude,
    "stripes": _stripes,
    "shear": lambda x: _shear(x, 0.45),
}
# The base model's home domain; the others are where experts specialise.
HOME_DOMAIN = "clean"


def _shift(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Moved by whole pixels, the space it leaves blank (digits sit in the middle, so nothing is cut)."""
    return torch.nn.functional.pad(x, (max(cols, 0), max(-cols, 0), max(rows, 0), max(-rows, 0)))[
        ..., max(-rows, 0): max(-rows, 0) + x.shape[-2], max(-cols, 0): max(-cols, 0) + x.shape[-1]]


def _edges(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude (Sobel): the strokes' outlines instead of the strokes."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = torch.nn.functional.conv2d(x, sobel[None, None], padding=1)
    gy = torch.nn.functional.conv2d(x, sobel.t()[None, None], padding=1)
    return torch.clamp((gx.square() + gy.square()).sqrt() / 2.0, max=1.0)


def _zoom_out(x: torch.Tensor) -> torch.Tensor:
    """The digit at 60 % size, centred."""
    small = round(0.6 * x.shape[-1])
    inner = torch.nn.functional.interpolate(x, size=(small, small), mode="bilinear", align_corners=False)
    before = (x.shape[-1] - small) // 2
    after = x.shape[-1] - small - before
    return torch.nn.functional.pad(inner, (before, after, before, after))


def _salt_and_pepper(x: torch.Tensor) -> torch.Tensor:
    """12 % of pixels set to black or white, fixed per image position."""
    gen = torch.Generator().manual_seed(11)
    flip = torch.rand(x.shape, generator=gen)
    out = x.clone()
    out[flip < 0.06] = 0.0
    out[flip > 0.94] = 1.0
    return out


# A second set of domains (other transforms of the same digits), used only to check defaults chosen on the first
# with another model type (bench/twin_families.py --family vision).
SECOND_IMAGE_DOMAINS = {
    "mirror": lambda x: x.flip(-1),
    "contrast": lambda x: 0.35 + 0.3 * x,
    "shift": lambda x: _shift(x, 3, -3),
    "edges": _edges,
    "zoom": _zoom_out,
    "salt": _salt_and_pepper,
}


def _split_indices(n: int, seed: int = SPLIT_SEED, fractions=(0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut1 = int(fractions[0] * n)
    cut2 = cut1 + int(fractions[1] * n)
    return {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 1, IMAGE_SIZE, IMAGE_SIZE), normalised
    labels: torch.Tensor  # (N,) int64


@lru_cache(maxsize=None)  # the same on every call, and a run asks dozens of times
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                             align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def image_domain(domain: str, split: str, labels: tuple[int, ...] | None = None) -> ImageSet:
    """One domain's split, optionally restricted to some labels (the label-split tasks)."""
    images, targets = _digits()
    index = torch.as_tensor(_split_indices(len(targets))[split])
    x = {**IMAGE_DOMAINS, **SECOND_IMAGE_DOMAINS}[domain](images[index]).contiguous()
    y = targets[index]
    if labels is not None:
        keep = torch.isin(y, torch.tensor(labels))
        x, y = x[keep], y[keep]
    return ImageSet((x - 0.5) / 0.5, y)


def subsample(data: ImageSet, fraction: float, seed: int) -> ImageSet:
    n = len(data.labels)
    keep = torch.as_tensor(np.random.default_rng(seed).permutation(n)[: max(1, int(fraction * n))])
    return ImageSet(data.images[keep], data.labels[keep])


def concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


# ---- text ----

@lru_cache(maxsize=None)
def _prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@lru_cache(maxsize=None)
def _python_source(limit: int = 1_500_000) -> str:
    """Standard-library modules in name order until `limit` characters (the same files on every run)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, size = [], 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as handle:
            text = inspect.cleandoc(handle.read())
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n\n".join(parts)


@lru_cache(maxsize=None)
def _unicode_names() -> str:
    lines = []
    for code in range(0x20, 0x30000):
        name = unicodedata.name(chr(code), None)
        if name:
            lines.append(f"U+{code:04X} {name}")
    return "\n".join(lines)


TEXT_DOMAINS = {"prose": _prose, "code": _python_source, "unicode": _unicode_names}


# ---- a second text family (other domains), used only to check defaults chosen on the first ----

def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _files_text(paths: list[str], limit: int, per_file: int = 200_000) -> str:
    """Files in the given (sorted) order, each cut at `per_file` characters, until `limit` characters."""
    parts, size = [], 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read(per_file)
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "\n\n".join(parts)


def _cpp_headers(limit: int = 1_500_000) -> str:
    """C++ headers that ship with torch (c10 and ATen core)."""
    root = os.path.join(_site_packages(), "torch", "include")
    found = []
    for sub in ("c10", os.path.join("ATen", "core")):
        for folder, _dirs, files in os.walk(os.path.join(root, sub)):
            found += [os.path.join(folder, f) for f in files if f.endswith(".h")]
    return _files_text(sorted(found), limit)


def _package_descriptions(limit: int = 1_500_000) -> str:
    """Installed packages' METADATA files: headers, then each long description (Markdown or reStructuredText)."""
    root = _site_packages()
    found = [os.path.join(root, d, "METADATA") for d in os.listdir(root) if d.endswith(".dist-info")]
    return _files_text(sorted(p for p in found if os.path.isfile(p)), limit)


def _csv_tables(limit: int = 1_500_000) -> str:
    """scikit-learn's bundled data sets as CSV text (numbers, a header line each)."""
    import gzip

    root = os.path.join(_site_packages(), "sklearn", "datasets", "data")
    parts = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(".csv"):
            with open(path, encoding="utf-8") as handle:
                parts.append(handle.read())
        elif name.endswith(".csv.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                parts.append(handle.read())
    return "\n".join(parts)[:limit]


def _json_documents(limit: int = 1_500_000) -> str:
    """JSON files that ship inside the installed packages (software bills of materials, configs, label maps)."""
    found = []
    for folder, _dirs, files in os.walk(_site_packages()):
        found += [os.path.join(folder, f) for f in files if f.endswith(".json")]
    return _files_text(sorted(found), limit, per_file=60_000)


SECOND_TEXT_DOMAINS = {"cpp": _cpp_headers, "markdown": _package_descriptions, "csv": _csv_tables,
                       "json": _json_documents}


def text_domain(domain: str, split: str, block: int = 4096) -> torch.Tensor:
    """The domain's bytes for one split: the text is cut into blocks, and blocks are dealt to the splits by
    a seeded shuffle (so the splits never share text)."""
    source = TEXT_DOMAINS[domain] if domain in TEXT_DOMAINS else SECOND_TEXT_DOMAINS[domain]
    data = np.frombuffer(source().encode("utf-8"), dtype=np.uint8)
    blocks = [data[i: i + block] for i in range(0, len(data) - block + 1, block)]
    chosen = _split_indices(len(blocks), seed=SPLIT_SEED + 1, fractions=(0.8, 0.1, 0.1))[split]
    return torch.from_numpy(np.concatenate([blocks[i] for i in sorted(chosen)]).astype(np.int64))
