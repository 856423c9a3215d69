"""What a checkpoint holds, and how far one checkpoint lies from another (the library behind `merge inspect`)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from mergekit_lite.checkpoint import Checkpoint
from mergekit_lite.layers import count_layers, layer_index
from mergekit_lite.pipeline import Progress


def summarize(ckpt: Checkpoint, largest: int = 10) -> dict[str, Any]:
    """A JSON-ready summary built from headers and config.json alone (no tensor data is read)."""
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for info in ckpt.tensors.values():
        entry = by_dtype[str(info.dtype).removeprefix("torch.")]
        entry["tensors"] += 1
        entry["parameters"] += info.numel
        entry["bytes"] += info.nbytes
    config = ckpt.config or {}
    architecture = config.get("architecture") or (config.get("architectures") or [None])[0] or config.get("model_type")
    biggest = sorted(ckpt.tensors.values(), key=lambda i: i.nbytes, reverse=True)[:largest]
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "kind": ckpt.kind,
        "architecture": architecture,
        "layers": count_layers(ckpt.config, ckpt.tensors),
        "shards": [str(p.name) for p in ckpt.shards],
        "tensor_count": len(ckpt.tensors),
        "parameter_count": ckpt.num_parameters,
        "bytes": ckpt.total_bytes,
        "dtypes": dict(sorted(by_dtype.items())),
        "largest_tensors": [_tensor_row(i) for i in biggest],
    }


def tensor_table(ckpt: Checkpoint) -> list[dict[str, Any]]:
    return [_tensor_row(info) for info in ckpt.tensors.values()]


def _tensor_row(info) -> dict[str, Any]:
    return {
        "name": info.name,
        "shape": list(info.shape),
        "dtype": str(info.dtype).removeprefix("torch."),
        "parameters": info.numel,
        "bytes": info.nbytes,
        "shard": info.file.name,
    }


def difference_stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Relative norm of b - a against a, and cosine similarity of a and b, computed in float32."""
    a32, b32 = a.reshape(-1).float(), b.reshape(-1).float()
    diff_sq = float(torch.sum((b32 - a32) ** 2))
    a_sq, b_sq = float(torch.sum(a32 * a32)), float(torch.sum(b32 * b32))
    dot = float(torch.dot(a32, b32))
    cosine = dot / math.sqrt(a_sq * b_sq) if a_sq > 0 and b_sq > 0 else float("nan")
    return {"diff_sq": diff_sq, "ref_sq": a_sq, "relative_diff": _ratio(diff_sq, a_sq), "cosine": cosine}


def _ratio(diff_sq: float, ref_sq: float) -> float:
    if ref_sq == 0:
        return 0.0 if diff_sq == 0 else float("inf")
    return math.sqrt(diff_sq / ref_sq)


def compare(a: Checkpoint, b: Checkpoint, device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """Per-tensor and per-layer relative difference of B from A, read one tensor pair at a time."""
    shared = [n for n in a.tensors if n in b.tensors]
    tensors, mismatched = [], []
    layers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    total = [0.0, 0.0]
    for name in shared:
        if a.tensors[name].shape != b.tensors[name].shape:
            mismatched.append({"name": name, "a": list(a.tensors[name].shape), "b": list(b.tensors[name].shape)})
            continue
        stats = difference_stats(a.get(name, device), b.get(name, device))
        tensors.append({"name": name, "relative_diff": stats["relative_diff"], "cosine": stats["cosine"]})
        layer = layer_index(name)
        key = "other" if layer is None else str(layer)
        for acc in (layers[key], total):
            acc[0] += stats["diff_sq"]
            acc[1] += stats["ref_sq"]
        if progress:
            progress()
    return {
        "a": str(a.path),
        "b": str(b.path),
        "relative_diff": _ratio(*total),
        "tensors": tensors,
        "layers": [{"layer": k, "relative_diff": _ratio(*v)} for k, v in sorted(layers.items(), key=_layer_key)],
        "only_in_a": [n for n in a.tensors if n not in b.tensors],
        "only_in_b": [n for n in b.tensors if n not in a.tensors],
        "shape_mismatch": mismatched,
    }


def _layer_key(item: tuple[str, list[float]]) -> tuple[int, int]:
    return (1, 0) if item[0] == "other" else (0, int(item[0]))
