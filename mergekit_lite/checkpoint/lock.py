"""One writer per output path: an OS lock (flock) on a hidden sibling file, taken before any work and held until
the output is published or abandoned.

Without it, a second `--force` run deletes the first one's partial directory and the first then publishes the
second's half-written files. The lock file is removed on release; a run that opened the file just before that
finds its inode gone from the path and takes the lock again on the new file, so two runs can never both hold it.
The lock is re-entrant within a process, so the library's layers may each take it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mergekit_lite.errors import UserError

_held: dict[str, list[int]] = {}  # lock path -> [fd, depth]


def lock_path(out_dir: Path) -> Path:
    return out_dir.absolute().parent / f".{out_dir.name}.lock"


def _acquire(path: Path, out_dir: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise UserError(f"{out_dir}: cannot create the lock {path.name} beside it: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise UserError(f"{out_dir}: another merge{f' (pid {holder})' if holder else ''} is writing this output; "
                            "wait for it to finish or choose another path") from None
        try:
            current = os.stat(path, follow_symlinks=False)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file after we opened it: lock the new one


class output_lock:  # noqa: N801  (used like a function: `with output_lock(path):`)
    """Hold the lock of `out_dir` for a block; a second holder in another process gets a UserError at once.
    Re-entrant within the process: only the outermost exit releases it."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = lock_path(self.out_dir)
        self._entered = False

    def __enter__(self) -> "output_lock":
        key = str(self.path)
        if key in _held:
            _held[key][1] += 1
        else:
            _held[key] = [_acquire(self.path, self.out_dir), 1]
        self._entered = True
        return self

    def __exit__(self, *exc_info) -> None:
        key = str(self.path)
        if not self._entered or key not in _held:
            return
        self._entered = False
        _held[key][1] -= 1
        if _held[key][1] > 0:
            return
        fd = _held.pop(key)[0]
        try:
            os.unlink(self.path)  # while still locked: whoever opened it meanwhile sees the inode gone and retries
        except OSError:
            pass
        os.close(fd)
