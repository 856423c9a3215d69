"""Streaming, sharded, atomic checkpoint writer.

All output names, shapes and dtypes are known before any math runs, so every shard's header is written first
and each tensor's bytes go straight to their final offset as soon as they exist: memory stays at one tensor,
not one shard. Everything is written into a hidden sibling directory that is renamed into place only once
complete, so an interrupted merge never leaves a half-written checkpoint at the target path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lite.checkpoint.files import checked_file, copy_checked, load_json, read_limited, real, roots_of
from mergekit_lite.checkpoint.lock import output_lock
from mergekit_lite.checkpoint.safetensors_format import element_size, encode_header
from mergekit_lite.errors import UserError

DEFAULT_SHARD_BYTES = 5 * 1024**3
CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1024 * 1024
SUPPORT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a larger tensor gets a shard alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count <= 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def check_output_path(out_dir: Path, force: bool) -> None:
    """Refuse an output path we may not write, before any work is done. A symlink at the path, dangling or
    not, counts as existing: --force replaces the link itself, never what it points to."""
    if out_dir.name in ("", ".", "..") or real(out_dir) in (real(Path.cwd()), real(Path.home()), Path("/")):
        raise UserError(f"{out_dir}: name a new directory for the output, not the current, home or root directory")
    parent = out_dir.absolute().parent
    if not parent.is_dir():
        raise UserError(f"{out_dir}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out_dir}: parent directory {parent} is not writable")
    if os.path.lexists(out_dir) and not force:
        what = "is a dangling symlink" if out_dir.is_symlink() and not out_dir.exists() else "already exists"
        raise UserError(f"{out_dir}: {what}; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_symlink() and not out_dir.is_dir() and not out_dir.is_file():
        raise UserError(f"{out_dir}: exists and is neither a file nor a directory")


RESUME_HINT = "; the partial output is kept, so after freeing space `merge run ... --resume` continues it"


def write_small_file(path: Path, data: bytes, hint: str = "") -> None:
    """Write one of the small files (config, card, recipe, report); a full disk is the user's to fix."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}{hint}") from exc


class CheckpointWriter:
    """Write a checkpoint of known tensors into `out_dir`, atomically; use as a context manager.

    `write(name, tensor)` may be called in any order; leaving the block without an exception publishes the
    directory, an exception removes the partial one.
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: list[TensorSpec],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        force: bool = False,
        metadata: dict[str, str] | None = None,
        resume: bool = False,
        fingerprint: str = "",
    ) -> None:
        self.out_dir = Path(out_dir)
        check_output_path(self.out_dir, force)
        self.force = force
        self.resume = resume
        self.fingerprint = fingerprint
        self.completed: dict[str, dict] = {}  # tensors already written by an interrupted run, verified
        self._crc: dict[str, int] = {}
        self._journal = None
        self.specs = {spec.name: spec for spec in specs}
        if len(self.specs) != len(specs):
            raise ValueError("duplicate tensor names in writer plan")
        self.shards = plan_shards(specs, max_shard_bytes)
        self.shard_names = shard_file_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self.tmp_dir = partial_dir(self.out_dir)
        self._location: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self._fds: list[int] = []
        self._pending = set(self.specs)
        self._written: dict[str, int] = {}
        # A shard is hashed in the background in file order as its tensors are finished, and fsynced once its
        # last one is, while the merge goes on.
        self._shard_of = {spec.name: i for i, shard in enumerate(self.shards) for spec in shard}
        self._unwritten = [{spec.name for spec in shard} for shard in self.shards]
        self._hashers: list[ShardHasher] = []
        self._seals: dict[int, Future] = {}
        self._sealer: ThreadPoolExecutor | None = None
        self._lock = None
        self.resumed = False  # whether an interrupted run's partial output is being continued

    def __enter__(self) -> CheckpointWriter:
        self._lock = output_lock(self.out_dir)
        self._lock.__enter__()
        try:
            check_output_path(self.out_dir, self.force)  # again, now that no other run can change it
            return self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> CheckpointWriter:
        previous = _read_journal(self.tmp_dir / JOURNAL) if self.tmp_dir.exists() else None
        if previous is not None and not self.resume and not self.force:
            raise UserError(
                f"{self.out_dir}: an interrupted merge left {self.tmp_dir.name}; pass --resume to continue it "
                "or --force to start over"
            )
        if self.resume and previous is not None and previous[0] != self.fingerprint:
            raise UserError(
                f"{self.out_dir}: the interrupted merge in {self.tmp_dir.name} used another recipe, inputs or "
                "settings; rerun without --resume (and with --force) to start over"
            )
        continuing = self.resume and previous is not None
        self.resumed = continuing
        try:
            if not continuing:
                if self.tmp_dir.exists():
                    shutil.rmtree(self.tmp_dir)
                self.tmp_dir.mkdir()
            for shard, file_name in zip(self.shards, self.shard_names):
                header, offsets = encode_header([(s.name, s.dtype, s.shape) for s in shard], self.metadata)
                size = len(header) + sum(s.nbytes for s in shard)
                path = self.tmp_dir / file_name
                flags = os.O_RDWR | os.O_CREAT | (0 if continuing else os.O_TRUNC)
                fd = os.open(path, flags, 0o644)
                self._fds.append(fd)
                if not (continuing and os.fstat(fd).st_size == size and os.pread(fd, len(header), 0) == header):
                    _write_all(fd, header, 0)
                    os.ftruncate(fd, size)
                for spec, offset in zip(shard, offsets):
                    self._location[spec.name] = (fd, len(header) + offset)
                self._hashers.append(ShardHasher(fd, sorted((self._location[spec.name][1], spec.nbytes, spec.name)
                                                            for spec in shard)))
            if continuing:
                self.completed = self._verified(previous[1])
            self._journal = open(self.tmp_dir / JOURNAL, "a" if continuing else "w", encoding="utf-8")
            if not continuing:
                self._journal.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
                self._journal.flush()
        except OSError as exc:
            self._abort(keep=continuing)
            raise UserError(f"{self.tmp_dir}: cannot write: {exc.strerror or exc}") from exc
        except BaseException:
            self._abort(keep=continuing)  # e.g. Ctrl-C while re-checking: the interrupted work stays resumable
            raise
        return self

    def _verified(self, journaled: dict[str, dict]) -> dict[str, dict]:
        """The journaled tensors whose bytes on disk still match their checksum."""
        good = {}
        for name, record in journaled.items():
            spec = self.specs.get(name)
            if spec is None:
                continue
            fd, offset = self._location[name]
            crc, done = 0, 0
            while done < spec.nbytes:
                block = os.pread(fd, min(1 << 24, spec.nbytes - done), offset + done)
                if not block:
                    break
                crc = zlib.crc32(block, crc)
                done += len(block)
            if done == spec.nbytes and crc == record["crc"]:
                good[name] = record.get("entry", {})
                self._done(name)
        return good

    def record(self, name: str, entry: dict) -> None:
        """Note in the journal that a tensor is complete, with its checksum and report entry, for --resume."""
        if self._journal is None or name in self._pending:
            return
        try:
            self._journal.write(json.dumps({"tensor": name, "crc": self._crc.get(name, 0), "entry": entry}) + "\n")
            self._journal.flush()
        except OSError as exc:
            raise UserError(f"{self.tmp_dir / JOURNAL}: cannot write: {exc.strerror or exc}{RESUME_HINT}") from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not in the writer's plan")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"{name}: planned {spec.dtype} {spec.shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start + len(rows)) of a planned tensor (the whole tensor when it is 0-d or 1-d)."""
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"tensor {name!r} is not in the writer's plan")
        whole = len(spec.shape) < 2
        expected = spec.shape if whole else (rows.shape[0], *spec.shape[1:])
        if rows.dtype != spec.dtype or tuple(rows.shape) != tuple(expected) or (not whole and start + rows.shape[0] > spec.shape[0]):
            raise ValueError(f"{name}: rows {start}.. of {spec.dtype} {spec.shape} do not fit {rows.dtype} {tuple(rows.shape)}")
        row_bytes = spec.nbytes // spec.shape[0] if not whole and spec.shape[0] else spec.nbytes
        fd, offset = self._location[name]
        data = tensor_bytes(rows)
        self._pwrite(fd, data, offset + (0 if whole else start * row_bytes))
        self._crc[name] = zlib.crc32(data, self._crc.get(name, 0))  # rows arrive in order
        self._written[name] = self._written.get(name, 0) + len(data)
        if self._written[name] >= spec.nbytes:
            self._done(name)

    def accept(self, name: str, crc: int) -> None:
        """A tensor another process wrote into this output's shard files (a Ray task), with its checksum."""
        if name not in self.specs:
            raise KeyError(f"tensor {name!r} is not in the writer's plan")
        self._crc[name] = crc
        self._written[name] = self.specs[name].nbytes
        self._done(name)

    def _done(self, name: str) -> None:
        """A tensor is complete: hash what its shard now has complete from the hashed part on; the last one of a
        shard seals it."""
        self._pending.discard(name)
        shard = self._shard_of[name]
        left = self._unwritten[shard]
        left.discard(name)
        if shard in self._seals:
            return
        if self._sealer is None:
            self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-seal")
        hasher = self._hashers[shard]
        end = hasher.complete_until(left)
        if end is not None:
            self._sealer.submit(hasher.add, end)
        if not left:
            self._seals[shard] = self._sealer.submit(hasher.seal)

    def shard_digest(self, file_name: str) -> str | None:
        """The sha256 of a finished shard, computed in the background (None if it was not sealed here)."""
        future = self._seals.get(self.shard_names.index(file_name)) if file_name in self.shard_names else None
        return future.result() if future is not None else None

    def _pwrite(self, fd: int, data, offset: int) -> None:
        try:
            _write_all(fd, data, offset)
        except OSError as exc:
            raise UserError(f"{self.tmp_dir}: cannot write: {exc.strerror or exc}{RESUME_HINT}") from exc

    def add_file(self, relative_name: str, content: str | bytes) -> None:
        # surrogateescape: a path with a non-UTF-8 byte (in a card or recipe) is written back as its own bytes
        data = content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
        write_small_file(self.tmp_dir / relative_name, data, RESUME_HINT)

    def copy_config(self, source_dir: Path, updates: dict | None = None) -> bool:
        """Copy config.json from a source checkpoint, with `updates` applied; False when it has none."""
        config_file = source_dir / "config.json"
        if not os.path.lexists(config_file):
            return False
        config = load_json(config_file, roots_of(source_dir), "config.json")
        if not isinstance(config, dict):
            raise UserError(f"{config_file}: must hold a JSON object")
        config.update(updates or {})
        self.add_file("config.json", json.dumps(config, indent=2) + "\n")
        return True

    def copy_support_files(self, source_dir: Path, only: tuple[str, ...] | None = None) -> list[str]:
        """Copy tokenizer, generation and preprocessing files (known names only, or those in `only`) from a
        source checkpoint."""
        names = [name for name in support_files(source_dir) if only is None or name in only]
        for name in names:
            try:
                copy_checked(source_dir / name, self.tmp_dir / name, roots_of(source_dir), name)
            except OSError as exc:
                raise UserError(f"{self.tmp_dir / name}: cannot write: {exc.strerror or exc}{RESUME_HINT}") from exc
        return names

    def set_chat_template(self, template: str) -> None:
        """Write the output's chat template as transformers saves one (chat_template.jinja), and drop any template
        the copied tokenizer_config.json carried, which the file would otherwise contradict."""
        config_file = self.tmp_dir / "tokenizer_config.json"
        if config_file.exists():
            config = load_json(config_file, [self.tmp_dir], "tokenizer_config.json")
            if isinstance(config, dict) and "chat_template" in config:
                del config["chat_template"]
                self.add_file("tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        self.add_file(CHAT_TEMPLATE_FILE, template)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # An interruption or a full disk keeps what was written, for --resume; anything else is discarded.
            self._abort(keep=issubclass(exc_type, (KeyboardInterrupt, OSError)) or _is_write_failure(exc))
            return
        try:
            if self._pending:
                raise RuntimeError(f"{len(self._pending)} planned tensor(s) were never written, e.g. {min(self._pending)}")
            for shard, hasher in enumerate(self._hashers):
                if shard in self._seals:
                    self._seals[shard].result()
                else:
                    os.fsync(hasher.fd)
            self._close_fds()
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            (self.tmp_dir / JOURNAL).unlink(missing_ok=True)
            if len(self.shards) > 1:
                self.add_file("model.safetensors.index.json", json.dumps(self._index(), indent=2) + "\n")
            self._publish()
        except BaseException:
            self._abort(keep=False)
            raise
        self._release()

    @property
    def files(self) -> list[str]:
        return list(self.shard_names) if self.shards else []

    def _index(self) -> dict:
        weight_map = {spec.name: file for shard, file in zip(self.shards, self.shard_names) for spec in shard}
        total = sum(spec.nbytes for spec in self.specs.values())
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

    def _publish(self) -> None:
        old = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            if not self.force:
                raise UserError(f"{self.out_dir}: appeared while merging; pass --force to replace it")
            old = self.out_dir.absolute().parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, old)
        os.replace(self.tmp_dir, self.out_dir)
        _fsync_dir(self.out_dir.absolute().parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()

    def _close_fds(self) -> None:
        for future in self._seals.values():  # never close a file under a running seal
            future.exception()
        if self._sealer is not None:  # hashing of unfinished shards (a failed run) is not waited for
            self._sealer.shutdown(wait=True, cancel_futures=True)
            self._sealer = None
        while self._fds:
            os.close(self._fds.pop())

    def _abort(self, keep: bool = False) -> None:
        try:
            self._close_fds()
            if self._journal is not None:
                journal, self._journal = self._journal, None
                try:
                    journal.close()
                except OSError:
                    pass  # a full disk refuses the last buffered line; the lines before it stand
            if not keep:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(None, None, None)


JOURNAL = ".merge_journal.jsonl"


def partial_dir(out_dir: Path) -> Path:
    """The hidden sibling directory an output is built in (the same name every run, so it can be resumed)."""
    return out_dir.absolute().parent / f".{out_dir.name}.partial"


def _read_journal(path: Path) -> tuple[str, dict[str, dict]] | None:
    """(fingerprint, {tensor: record}) from a journal; None when there is none or it is unreadable."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        fingerprint = json.loads(lines[0])["fingerprint"]
    except (OSError, UnicodeDecodeError, IndexError, KeyError, TypeError, json.JSONDecodeError):
        return None
    records = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
            records[record["tensor"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by a kill: everything after it is unknown
    return fingerprint, records


def read_chat_template(directory: Path) -> str | None:
    """The chat template a checkpoint's tokenizer carries (chat_template.jinja, else tokenizer_config.json's, the
    default one when it names several), or None."""
    roots = roots_of(directory)
    if os.path.lexists(directory / CHAT_TEMPLATE_FILE):
        data = read_limited(directory / CHAT_TEMPLATE_FILE, roots, CHAT_TEMPLATE_FILE, MAX_TEMPLATE_BYTES)
        return data.decode("utf-8", errors="replace")
    if not os.path.lexists(directory / "tokenizer_config.json"):
        return None
    template = load_json(directory / "tokenizer_config.json", roots, "tokenizer_config.json")
    template = template.get("chat_template") if isinstance(template, dict) else None
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


class ShardFileWriter:
    """Writes tensors' rows into the shard files a CheckpointWriter laid out in an output's partial directory, from
    another process (a Ray task on any node that shares the file system): the same plan gives the same headers
    and offsets. Records each tensor's checksum for the driver's journal; publishing stays the driver's."""

    def __init__(self, tmp_dir: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.specs = {spec.name: spec for spec in specs}
        self.crcs: dict[str, int] = {}
        self._location: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        full = {"format": "pt", **(metadata or {})}
        for shard, file_name in zip(plan_shards(specs, max_shard_bytes), shard_file_names(len(plan_shards(specs, max_shard_bytes)))):
            header, offsets = encode_header([(s.name, s.dtype, s.shape) for s in shard], full)
            path = self.tmp_dir / file_name
            if not path.is_file() or path.is_symlink():
                raise UserError(f"{path}: the output's shard file is not there; is {self.tmp_dir} on a file system "
                                "every node shares?")
            fd = os.open(path, os.O_RDWR)
            self._fds.append(fd)
            if os.pread(fd, len(header), 0) != header:
                raise UserError(f"{path}: holds another merge's header; the plan differs from the driver's")
            for spec, offset in zip(shard, offsets):
                self._location[spec.name] = (fd, len(header) + offset)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        spec = self.specs[name]
        whole = len(spec.shape) < 2
        row_bytes = spec.nbytes // spec.shape[0] if not whole and spec.shape[0] else spec.nbytes
        fd, offset = self._location[name]
        data = tensor_bytes(rows)
        try:
            _write_all(fd, data, offset + (0 if whole else start * row_bytes))
        except OSError as exc:
            raise UserError(f"{self.tmp_dir}: cannot write: {exc.strerror or exc}{RESUME_HINT}") from exc
        self.crcs[name] = zlib.crc32(data, self.crcs.get(name, 0))  # rows arrive in order

    def close(self) -> None:
        """Flush to disk (the driver seals and publishes only what is durable) and close."""
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()


def support_files(source_dir: Path) -> list[str]:
    """The known tokenizer / generation / preprocessing files a checkpoint has, each checked to be a regular file
    inside it (a link to a secret elsewhere, a FIFO or a device is refused, not copied)."""
    names = [name for name in SUPPORT_FILES if os.path.lexists(source_dir / name)]
    for name in names:
        checked_file(source_dir / name, roots_of(source_dir), name)
    return names


def _is_write_failure(exc: BaseException | None) -> bool:
    return isinstance(exc, UserError) and isinstance(exc.__cause__, OSError)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class ShardHasher:
    """A shard's sha256, taken in file order and read back through the page cache, as its tensors are finished,
    and its fsync: the end of a merge waits for the last tensor's bytes only. Its data is synced every
    SYNC_EVERY bytes on the way, so that the final fsync has little left to write.

    `complete_until` runs in the writing thread; `add` and `seal` run in order in one background thread."""

    SYNC_EVERY = 64 << 20

    def __init__(self, fd: int, layout: list[tuple[int, int, str]]) -> None:
        self.fd = fd
        self.layout = layout  # (offset, nbytes, name) of each tensor, in file order
        self.next = 0  # the first tensor not yet handed to `add`
        self.digest = hashlib.sha256()
        self.hashed = 0  # bytes hashed so far (the header first)
        self.unsynced = 0
        self.failure: OSError | None = None

    def complete_until(self, unwritten: set[str]) -> int | None:
        """The end of the run of finished tensors after the ones handed to `add`, or None if there is none."""
        start = self.next
        while self.next < len(self.layout) and self.layout[self.next][2] not in unwritten:
            self.next += 1
        if self.next == start:
            return None
        offset, nbytes, _ = self.layout[self.next - 1]
        return offset + nbytes

    def add(self, end: int) -> None:
        """Hash the file up to `end`."""
        try:
            while self.hashed < end:
                block = os.pread(self.fd, min(1 << 22, end - self.hashed), self.hashed)
                if not block:
                    raise OSError(f"shard ends at {self.hashed} bytes, before {end}")
                self.digest.update(block)
                self.hashed += len(block)
                self.unsynced += len(block)
            if self.unsynced >= self.SYNC_EVERY:
                os.fdatasync(self.fd)
                self.unsynced = 0
        except OSError as exc:
            self.failure = self.failure or exc

    def seal(self) -> str:
        """fsync the finished shard and return its sha256 (the whole file: what `add` has not read yet too)."""
        if self.failure is not None:
            raise self.failure
        os.fsync(self.fd)
        while block := os.pread(self.fd, 1 << 22, self.hashed):
            self.digest.update(block)
            self.hashed += len(block)
        return self.digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
