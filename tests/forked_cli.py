"""`merge` commands in processes of their own that skip the interpreter's start-up.

A fork server (multiprocessing's "forkserver" start method) imports torch and the merge tool once; each command
is a child forked from it. The child is a separate process with its own pid, file locks, signals and exit
status, as `python -m mergekit_lite` would be; only the imports are shared. A test that kills one at a random
moment therefore lands in the merge itself, not in `import torch` (2-3 s of a fresh interpreter here).

Settings read when a module is imported (the Hugging Face environment variables) are the server's: tests of
those start real interpreters instead.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

from mergekit_lite.cli import main

_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["mergekit_lite.cli", "mergekit_lite.dispatch", "tests.forked_cli"])


def _run_merge_command(args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """The child: the command's environment and output files, then `merge`'s own entry point."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["merge", *args]
    main()


def _new_file(directory: Path, suffix: str) -> str:
    handle, path = tempfile.mkstemp(suffix=suffix, dir=directory)
    os.close(handle)
    return path


class ForkedMerge:
    """One `merge ARGS...` running in a forked process; its output is kept in `logs`; `env` is its environment
    (default: this process's)."""

    def __init__(self, *args: object, logs: Path, cwd: Path | None = None, env: dict[str, str] | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self._stdout, self._stderr = (Path(_new_file(logs, suffix)) for suffix in (".out", ".err"))
        self._process = _FORKS.Process(target=_run_merge_command, daemon=True, args=(
            [str(a) for a in args], str(cwd or Path.cwd()), dict(os.environ if env is None else env), str(self._stdout),
            str(self._stderr)))
        self._process.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def ended(self) -> bool:
        return not self._process.is_alive()

    def wait(self, timeout: float = 300) -> int:
        """The exit status: the command's code, or minus the signal that ended it (as subprocess gives)."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill()
            raise TimeoutError(f"merge {self._process} still running after {timeout} s")
        return self._process.exitcode

    def kill(self) -> None:
        """SIGKILL, then wait for the end (nothing happens to a command that has already ended)."""
        self._process.kill()
        self._process.join()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()


def forked_merge(*args: object, logs: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> tuple[int, str]:
    """Run `merge ARGS...` in a forked process to the end: (exit status, stderr)."""
    command = ForkedMerge(*args, logs=logs, cwd=cwd, env=env)
    return command.wait(timeout), command.stderr
