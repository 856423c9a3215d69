"""`merge` commands in processes of their own that skip most of the interpreter's start-up.

A fork server (multiprocessing's "forkserver" start method) imports torch and the other heavy libraries once;
each command is a child forked from it. The child is a separate process with its own pid, environment, file
locks, signals and exit status, as `python -m mergekit_lite` would be. A test that kills one at a random moment
therefore lands in the merge itself, not in `import torch` (2-3 s of a fresh interpreter here).

The merge tool and huggingface_hub are imported in each child after its environment is set, as in a fresh
interpreter: huggingface_hub reads HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT when it is imported. Only what
the preloaded libraries read at import (torch's OMP_NUM_THREADS, say) is the server's.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# libraries that read nothing from the environment that these tests set
_PRELOAD = ["torch", "safetensors.torch", "numpy", "yaml", "typer", "rich.console", "pydantic"]
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(_PRELOAD)


def _run_merge_command(args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """The child: the command's environment and output files, then `merge`'s own entry point, imported only now
    so that it reads this environment."""
    stale = [name for name in ("mergekit_lite", "huggingface_hub", "transformers") if name in sys.modules]
    assert not stale, f"imported before the command's environment was set: {stale}"
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = ["merge", *args]
    from mergekit_lite.cli import main

    main()


def _new_file(directory: Path, suffix: str) -> Path:
    handle, path = tempfile.mkstemp(suffix=suffix, dir=directory)
    os.close(handle)
    return Path(path)


class ForkedMerge:
    """One `merge ARGS...` running in a forked process; its output is kept in `logs`; `env` is its environment
    (default: this process's)."""

    def __init__(self, *args: object, logs: Path, cwd: Path | None = None, env: dict[str, str] | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.args = [str(a) for a in args]
        self._stdout, self._stderr = _new_file(logs, ".out"), _new_file(logs, ".err")
        self._process = _FORKS.Process(target=_run_merge_command, daemon=True, args=(
            self.args, str(cwd or Path.cwd()), dict(os.environ if env is None else env), str(self._stdout),
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
            raise TimeoutError(f"merge {' '.join(self.args)} still running after {timeout} s")
        return self._process.exitcode

    def kill(self) -> None:
        """SIGKILL, then wait for the end (nothing happens to a command that has already ended)."""
        self._process.kill()
        self._process.join()

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()


def forked_merge(*args: object, logs: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `merge ARGS...` in a forked process to the end, as `subprocess.run(..., capture_output=True)` would."""
    command = ForkedMerge(*args, logs=logs, cwd=cwd, env=env)
    code = command.wait(timeout)
    return subprocess.CompletedProcess(["merge", *command.args], code, command.stdout, command.stderr)
