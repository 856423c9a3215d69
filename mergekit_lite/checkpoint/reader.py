"""Open a checkpoint (HF / timm directory, sharded or not, or one file) and read tensors lazily.

Only headers are read when a checkpoint is opened; a tensor's rows are read with plain file reads when asked
for, so only what is in use occupies memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.checkpoint.files import (checked_file, inside, load_json, open_regular, real,
                                           resume_fingerprint, roots_of)
from mergekit_lite.checkpoint.safetensors_format import TensorInfo, read_header
from mergekit_lite.errors import CheckpointError, one_line

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = ("pytorch_model.bin", "model.pt", "model.pth")
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class Checkpoint:
    """An opened checkpoint: what it holds (from headers) and how to fetch each tensor."""

    path: Path
    format: str  # "safetensors", "safetensors-sharded", "pickle", "pickle-sharded"
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None
    shards: list[Path]
    _pickled: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def kind(self) -> str:
        """'timm', 'transformers' or 'tensors' (no config to say)."""
        if self.config is None:
            return "tensors"
        if "architecture" in self.config:
            return "timm"
        return "transformers"

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """Read one whole tensor onto `device`."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return self.read_rows(name, 0, info.shape[0] if len(info.shape) >= 2 else 1).to(device)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along the first axis, read with plain file reads into a CPU tensor.

        Plain reads, not a memory map: only the rows asked for occupy memory, so streaming a large model
        keeps the process small. A 0-d or 1-d tensor is one row. `out`, a flat uint8 tensor at least as
        large as the rows, is filled and viewed instead of allocating.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        whole = len(info.shape) < 2
        if info.offset < 0:  # pickled: already in memory
            tensor = self._pickled_state(info.file)[name]
            return tensor.clone() if whole else tensor[start:stop].clone()
        row_bytes = info.row_bytes
        first, count = (0, 1) if whole else (start, stop - start)
        size = count * row_bytes
        buffer = out[:size] if out is not None and out.numel() >= size else torch.empty(size, dtype=torch.uint8)
        if buffer.numel():
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = open_regular(info.file, None, "safetensors file")
            view = memoryview(buffer.numpy())
            position, done = info.offset + first * row_bytes, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], position + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: ended while reading tensor {name!r}; the file is truncated")
                done += got
        shape = info.shape if whole else (count, *info.shape[1:])
        return buffer.view(info.dtype).reshape(shape)

    def _pickled_state(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            self._pickled[file] = load_pickled(file)
        return self._pickled[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())


def open_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint directory or file; every user mistake becomes a CheckpointError naming the path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory" + (" (a dangling link)" if path.is_symlink() else ""))
    if not path.is_dir():
        return _open_file(path, allow_pickle)
    roots = roots_of(path)
    config = _read_config(path, roots)
    present = lambda name: os.path.lexists(path / name)  # noqa: E731  (links and FIFOs are refused when read)
    if present(SAFETENSORS_INDEX):
        return _open_sharded(path, path / SAFETENSORS_INDEX, config, "safetensors-sharded", allow_pickle, roots)
    if present(SAFETENSORS_SINGLE):
        return _from_files(path, [checked_file(path / SAFETENSORS_SINGLE, roots, "weights file")], config, "safetensors")
    others = sorted(path.glob("*.safetensors"))
    if len(others) == 1:
        return _from_files(path, [checked_file(others[0], roots, "weights file")], config, "safetensors")
    if present(PICKLE_INDEX) or any(present(name) for name in PICKLE_SINGLE):
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: holds only pickled weights (.bin/.pt), which can run code when loaded; "
                "pass --allow-pickle to load them with torch.load(weights_only=True)"
            )
        if present(PICKLE_INDEX):
            return _open_sharded(path, path / PICKLE_INDEX, config, "pickle-sharded", allow_pickle, roots)
        file = next(path / name for name in PICKLE_SINGLE if present(name))
        return _from_pickle(path, checked_file(file, roots, "weights file"), config)
    if len(others) > 1:
        raise CheckpointError(
            f"{path}: holds {len(others)} .safetensors files but no {SAFETENSORS_INDEX} to say how they fit together"
        )
    raise CheckpointError(
        f"{path}: no weights found (looked for {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, or pickled weights)"
    )


def _open_file(path: Path, allow_pickle: bool) -> Checkpoint:
    """A file the user named: it may itself be a link anywhere, but the files beside it that it brings along
    (config, index shards) must lie in its directory."""
    roots = roots_of(path.parent)
    config = _read_config(path.parent, roots)
    if path.name.endswith(".index.json"):
        return _open_sharded(path.parent, path, config, "safetensors-sharded", allow_pickle, roots)
    file = checked_file(path, None, "weights file")
    if path.suffix == ".safetensors":
        return _from_files(path, [file], config, "safetensors")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: pickled weights can run code when loaded; pass --allow-pickle to load them with "
                "torch.load(weights_only=True)"
            )
        return _from_pickle(path, file, config)
    raise CheckpointError(f"{path}: unsupported format (expected .safetensors, a checkpoint directory, or .bin/.pt)")


def _read_config(directory: Path, roots: list[Path] | None = None) -> dict[str, Any] | None:
    file = directory / "config.json"
    if not os.path.lexists(file):
        return None
    config = load_json(file, roots if roots is not None else roots_of(directory), "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    return config


def _from_files(path: Path, files: list[Path], config: dict | None, fmt: str) -> Checkpoint:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).tensors.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} appears in both {tensors[name].file.name} and {file.name}")
            tensors[name] = info
    return Checkpoint(path=path, format=fmt, tensors=tensors, config=config, shards=files)


def _open_sharded(directory: Path, index: Path, config: dict | None, fmt: str, allow_pickle: bool,
                  roots: list[Path]) -> Checkpoint:
    parsed = load_json(index, roots, "index file")
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid index file (needs a 'weight_map' object)")
    odd = [value for value in weight_map.values() if not isinstance(value, str)]
    if odd:
        raise CheckpointError(f"{index}: shard name {odd[0]!r} is not a file name")
    shard_names = sorted(set(weight_map.values()))
    files = [_shard_path(index, roots, name) for name in shard_names]
    if fmt.startswith("pickle"):
        ckpt = Checkpoint(path=directory, format=fmt, tensors={}, config=config, shards=files)
        for file in files:
            for name, tensor in ckpt._pickled_state(file).items():
                ckpt.tensors[name] = _info_of(name, tensor, file)
    else:
        ckpt = _from_files(directory, files, config, fmt)
    missing = [name for name in weight_map if name not in ckpt.tensors]
    if missing:
        raise CheckpointError(f"{index}: names {len(missing)} tensor(s) its shards do not hold, e.g. {missing[0]!r}")
    return ckpt


def _shard_path(index: Path, roots: list[Path], name: object) -> Path:
    """A shard path from an index: relative, inside the checkpoint directory (or its cache repo), present and
    a regular file."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index}: shard name {name!r} is not a file name")
    root = roots[0]
    candidate = real(root / name)
    if Path(name).is_absolute() or not inside(candidate, roots):
        raise CheckpointError(f"{index}: shard path {name!r} points outside {root}; refusing to read it")
    if not os.path.lexists(root / name):
        raise CheckpointError(f"{index}: names shard {name!r}, which does not exist in {root}")
    return checked_file(root / name, roots, "shard")


def load_pickled(file: Path) -> dict[str, torch.Tensor]:
    """Load pickled weights with weights_only=True, so the pickle can build tensors but run no code."""
    try:
        state = torch.load(checked_file(file, None, "pickled weights"), map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot load pickled weights safely: {one_line(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: does not hold a flat dict of tensors")
    return state


def _info_of(name: str, tensor: torch.Tensor, file: Path) -> TensorInfo:
    return TensorInfo(
        name=name, shape=tuple(tensor.shape), dtype=tensor.dtype, file=file, nbytes=tensor.numel() * tensor.element_size()
    )


def _from_pickle(path: Path, file: Path, config: dict | None) -> Checkpoint:
    ckpt = Checkpoint(path=path, format="pickle", tensors={}, config=config, shards=[file])
    for name, tensor in ckpt._pickled_state(file).items():
        ckpt.tensors[name] = _info_of(name, tensor, file)
    return ckpt


def run_fingerprint(recipe: dict, settings: str, inputs: list[str], allow_pickle: bool = False) -> str:
    """resume_fingerprint over the weights files of the checkpoints at `inputs`."""
    shards = []
    for path in inputs:
        ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
        shards += ckpt.shards
        ckpt.close()
    return resume_fingerprint(recipe, settings, shards)
