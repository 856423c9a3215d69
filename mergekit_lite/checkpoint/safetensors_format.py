"""The safetensors file layout: an 8-byte header length, a JSON header, then raw little-endian bytes.

Parsing the header ourselves lets `inspect` and the merge planner learn names, shapes and dtypes without
touching tensor data, and lets a corrupt file be refused with a message that says what is wrong.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_lite.checkpoint.files import open_regular, parse_json
from mergekit_lite.errors import CheckpointError, one_line

# A header larger than this is refused before it is read: real headers are kilobytes to a few megabytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)

DTYPE_OF_CODE: dict[str, torch.dtype] = dict(_DTYPES)
CODE_OF_DTYPE: dict[torch.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype, or a CheckpointError if safetensors cannot store it."""
    try:
        return CODE_OF_DTYPE[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from headers alone."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int
    offset: int = -1  # absolute byte offset of the data in `file` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis (the whole tensor for 0-d and 1-d tensors)."""
        return self.nbytes // self.shape[0] if len(self.shape) >= 2 and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Read and validate a safetensors header; refuse truncated, oversized or inconsistent files, and anything
    the safetensors library itself would refuse (so every input we accept, and every output we write from it,
    loads there too)."""
    fd = open_regular(path, None, "safetensors file")
    try:
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated or empty)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes but the file holds {size} (truncated or not safetensors)"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    parsed = parse_json(raw, str(path), "safetensors header")
    if not isinstance(parsed, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")
    data_start = 8 + header_len
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in parsed.items()}
    _check_offsets(path, parsed, size - data_start)
    _library_accepts(path)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start)


def _library_accepts(path: Path) -> None:
    """The safetensors library's own validation of the header (it reads the header and maps the file)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # the library raises its own SafetensorError and others for bad headers
        raise CheckpointError(f"{path}: the safetensors library refuses this file: {one_line(exc)}") from exc


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets; the file is corrupt")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPE_OF_CODE:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which this torch cannot load")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o < 2**63 for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = DTYPE_OF_CODE[code]
    nbytes = math.prod(shape) * element_size(dtype)
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} of shape {shape} {code} needs {nbytes} bytes but its offsets span "
            f"{offsets[1] - offsets[0]}; the file is corrupt"
        )
    return TensorInfo(name=name, shape=tuple(shape), dtype=dtype, file=path, nbytes=nbytes, offset=data_start + offsets[0])


def _check_offsets(path: Path, entries: dict, data_len: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library also demands."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], n) for n, e in entries.items())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin}, expected {cursor}; the file is corrupt")
        cursor = end
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: tensors cover {cursor} data bytes but the file holds {data_len} (truncated or corrupt)"
        )


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Build a header for tensors laid out in the given order; returns the bytes and each tensor's data offset.

    The JSON is padded with spaces so tensor data starts 8-byte aligned, as the safetensors library writes it.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets = []
    cursor = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * element_size(dtype)
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        offsets.append(cursor)
        cursor += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
