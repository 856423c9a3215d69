"""Opening files named by checkpoints and recipes without being led astray.

A checkpoint directory is untrusted: a tokenizer file may be a symlink to a secret elsewhere, `model.safetensors`
may be a FIFO that blocks every read, a config may nest ten thousand levels deep. Every file the tool reads from
a checkpoint goes through here: it must be a regular file whose real path lies inside the checkpoint (or, for a
Hugging Face cache snapshot, inside the same cached repository's `blobs/`), it is opened without blocking, and
JSON is parsed with a size cap and without a RecursionError escaping.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable, Sequence

from mergekit_lite.errors import CheckpointError, UserError, one_line

# config.json, indexes, manifests and reports are kilobytes to a few megabytes.
MAX_JSON_BYTES = 64 * 1024 * 1024


def real(path: str | Path) -> Path:
    """The path with every symlink resolved (the path need not exist)."""
    return Path(os.path.realpath(path))


def cache_blobs(directory: Path) -> Path | None:
    """`.../models--org--name/blobs` when `directory` is a snapshot of a Hugging Face cache repository."""
    snapshots = directory.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
        return repo / "blobs"
    return None


def roots_of(directory: str | Path) -> list[Path]:
    """Where the files of a checkpoint directory may really lie: the directory itself, and a cache repo's blobs."""
    resolved = real(directory)
    blobs = cache_blobs(resolved)
    return [resolved] + ([real(blobs)] if blobs is not None else [])


def inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def checked_file(path: str | Path, roots: Sequence[Path] | None, what: str = "file") -> Path:
    """The real path of `path`, refused unless it is a regular file inside one of `roots` (None: anywhere,
    for a file the user named directly)."""
    path = Path(path)
    resolved = real(path)
    if roots is not None and not inside(resolved, roots):
        raise CheckpointError(f"{path}: {what} is a link to {resolved}, outside {roots[0]}; refusing to read it "
                              "(copy the file into the checkpoint instead)")
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} does not exist" + (" (a dangling link)" if path.is_symlink() else "")) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: {what} is not a regular file (a directory, FIFO or device); refusing to read it")
    return resolved


def open_regular(path: str | Path, roots: Sequence[Path] | None, what: str = "file") -> int:
    """A read-only descriptor of a checked regular file. O_NONBLOCK, so that a FIFO swapped in after the check
    cannot block the open; the type is checked again on the descriptor."""
    resolved = checked_file(path, roots, what)
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open {what}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: {what} is not a regular file; refusing to read it")
    return fd


def read_limited(path: str | Path, roots: Sequence[Path] | None, what: str, limit: int) -> bytes:
    """A checked file's bytes, refused when it holds more than `limit`."""
    fd = open_regular(path, roots, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {what} is {size:,} bytes, more than the {limit:,} such a file can need")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise CheckpointError(f"{path}: {what} grew past {limit:,} bytes while being read")
    return data


def parse_json(data: bytes | str, where: str, what: str) -> Any:
    """JSON from bytes, every failure (bad UTF-8, bad syntax, absurd nesting) a one-line CheckpointError."""
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} is nested too deeply to be a real {what}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {what} is not valid JSON: {one_line(exc)}") from exc


def load_json(path: str | Path, roots: Sequence[Path] | None, what: str = "JSON file",
              limit: int = MAX_JSON_BYTES) -> Any:
    return parse_json(read_limited(path, roots, what, limit), str(path), what)


def copy_checked(source: Path, target: Path, roots: Sequence[Path] | None, what: str = "file") -> None:
    """Copy a checked regular file's bytes (never a link, FIFO or device) into `target`."""
    fd = open_regular(source, roots, what)
    with os.fdopen(fd, "rb") as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1 << 22)


def refuse_overlap(target: str | Path, inputs: Iterable[str | Path], role: str) -> None:
    """Refuse an output (or report) path that is, contains or lies inside an input, symlinks resolved: --force
    would delete the input, or the output would be written into it."""
    target_real = real(target)
    for item in inputs:
        if not os.path.lexists(item):
            continue
        source = real(item)
        if target_real == source or target_real.is_relative_to(source) or source.is_relative_to(target_real):
            relation = ("is" if target_real == source else
                        "lies inside" if target_real.is_relative_to(source) else "contains")
            raise UserError(f"{target}: the {role} {relation} the input {item}; choose a path apart from the inputs")


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings name one file or directory (`base`, `base/`, `./base`, a link to it)."""
    return real(a) == real(b)


WHOLE_FILE_BYTES = 16 * 1024 * 1024  # every run pays this read, so only small files are hashed whole
SAMPLED_BLOCKS = 64
SAMPLE_BYTES = 64 * 1024


def content_fingerprint(path: str | Path) -> str:
    """A fingerprint of a weights file's content for --resume: the whole file up to 16 MiB; past that its size,
    first 64 KiB (the header, for most files) and 64 blocks of 64 KiB spread evenly over the rest, so that it
    stays cheap on multi-gigabyte shards. In a large file it catches a file replaced or rewritten, not a change
    confined to bytes between the samples."""
    digest = hashlib.sha256()
    fd = open_regular(path, None, "weights file")
    try:
        size = os.fstat(fd).st_size
        digest.update(str(size).encode())
        if size <= WHOLE_FILE_BYTES:
            offsets = range(0, size, 1 << 22)
            length = 1 << 22
        else:
            offsets = [0] + [size * (i + 1) // (SAMPLED_BLOCKS + 1) for i in range(SAMPLED_BLOCKS)] + [size - SAMPLE_BYTES]
            length = SAMPLE_BYTES
        for offset in offsets:
            digest.update(os.pread(fd, length, offset))
    finally:
        os.close(fd)
    return digest.hexdigest()


def shard_fingerprint(path: str | Path) -> str:
    """A weights file's identity for --resume: real path, size, modification time and sampled content."""
    info = os.stat(path)
    return f"{real(path)}|{info.st_size}|{info.st_mtime_ns}|{content_fingerprint(path)}"


def resume_fingerprint(recipe: dict, settings: str, shards: Iterable[str | Path]) -> str:
    """What an interrupted run must share with a new one for --resume to keep its work: the recipe, settings
    (seed, shard size) and every input file (path, size, modification time, content)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    digest.update(settings.encode())
    for shard in shards:
        digest.update(shard_fingerprint(shard).encode())
    return digest.hexdigest()


def replace_file(path: str | Path, data: bytes) -> None:
    """Write a small file beside its final path and rename it into place: never half a file at `path`."""
    path = Path(path)
    temporary = path.absolute().parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        try:
            temporary.unlink()
        except OSError:
            pass
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def check_report_target(path: str | Path) -> None:
    """A --report path may be new, or a report this tool wrote; anything else there is not ours to overwrite."""
    path = Path(path)
    if not os.path.lexists(path):
        if not path.absolute().parent.is_dir():
            raise UserError(f"{path}: --report: parent directory {path.absolute().parent} does not exist")
        return
    if path.is_symlink() or not path.is_file():
        raise UserError(f"{path}: --report: exists and is not a regular file; choose another path")
    try:
        existing = load_json(path, None, "report")
    except CheckpointError:
        existing = None
    if not (isinstance(existing, dict) and str(existing.get("schema", "")).startswith(REPORT_SCHEMA_PREFIX)):
        raise UserError(f"{path}: --report: exists and is not a report written by mergekit_lite; refusing to "
                        "overwrite it (remove it or choose another path)")


REPORT_SCHEMA_PREFIX = "mergekit_lite.report/"
