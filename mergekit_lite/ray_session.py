"""Joining a Ray cluster, kept free of torch so that `merge run --ray` joins the cluster and starts its workers
before the driver itself loads torch: each worker imports torch while the driver does, instead of after."""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any, Callable, Iterator

from mergekit_lite.errors import UserError

PROBE_SECONDS = 5.0
TASK_RETRIES = 3  # a task whose worker dies is run again (tasks rewrite the same bytes)


def import_ray() -> Any:
    """Ray, an optional extra: without it, one line saying what to install."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'mergekit_lite[ray]' (or pip install ray)") from None
    return ray


def check_reachable(address: str | None) -> None:
    """Refuse at once an address nothing answers on (Ray itself retries for minutes): `auto` needs RAY_ADDRESS,
    and `host:port` (or `ray://host:port`) a listening port."""
    if address is None:
        return
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            raise UserError("--ray auto: RAY_ADDRESS is not set; give the head's HOST:PORT, or --ray alone for a "
                            "cluster on this machine")
        if address == "auto":
            return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address}: not an address; give HOST:PORT (the Ray head's GCS port), auto or nothing")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); is the Ray head "
                        "running, and is this its address?") from None


def address_of(flag: str) -> str | None:
    """The `--ray` flag's value as ray.init takes it: `local` (or nothing) starts a cluster here (None)."""
    return None if flag == "local" else flag


def load_worker(module: str) -> None:
    """Run on a worker ahead of the merge's tasks: load the module they come from while the driver plans."""
    importlib.import_module(module)


def connect(ray: Any, address: str | None, worker_module: str) -> None:
    """Join the cluster at `address` (`auto`: the one RAY_ADDRESS names), or start a local one; then start one
    worker per CPU of the cluster loading `worker_module`, where the tasks come from (not waited for)."""
    if ray.is_initialized():
        return
    check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local cluster"
        raise UserError(f"--ray {where}: cannot connect: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    warm = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(load_worker)
    for _ in range(int(ray.cluster_resources().get("CPU", 1))):
        warm.remote(worker_module)


def join(flag: str, worker_module: str) -> None:
    """Join (or start) the cluster a `--ray` flag names, and start its workers loading `worker_module`."""
    connect(import_ray(), address_of(flag), worker_module)


def task_result(ray: Any, ref: Any) -> Any:
    """A task's result; a UserError raised in the task is raised here as itself (one line, exit 2)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc
        if isinstance(cause, UserError):
            raise cause from None
        raise


def remote_task(ray: Any, function: Callable[..., Any]) -> Any:
    """`function` as a Ray task on one CPU, spread over the nodes, run again if its worker dies."""
    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD")(function)


def as_completed(ray: Any, tasks: dict[Any, Any]) -> Iterator[tuple[Any, Any]]:
    """(label, result) of each task of `tasks` ({task: label}) in the order they finish (errors as `task_result`
    raises them)."""
    pending = dict(tasks)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), task_result(ray, done[0])
