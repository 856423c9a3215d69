"""The JSON merge report (versioned schema) and the model card written beside the merged weights."""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from mergekit_lite import __version__
from mergekit_lite.checkpoint.files import REPORT_SCHEMA_PREFIX, replace_file
from mergekit_lite.engine import MergeResult

SCHEMA = f"{REPORT_SCHEMA_PREFIX}1"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report(path: Path, report: dict[str, Any]) -> None:
    """A report at --report, replaced whole (a report this tool wrote before may be there; nothing else is)."""
    replace_file(path, (json.dumps(report, indent=2) + "\n").encode())


def peak_memory(device: torch.device) -> dict[str, int]:
    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return peak


def library_versions() -> dict[str, str]:
    """Versions from package metadata: importing transformers or timm just to ask would cost seconds."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"mergekit_lite": __version__, "python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("safetensors", "transformers", "timm"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def build_report(result: MergeResult, out_dir: Path, written_dir: Path,
                 known_digest: Callable[[str], str | None] = lambda name: None) -> dict[str, Any]:
    """Everything a user needs to trust and reproduce a merge; `written_dir` is where the files lie now.
    `known_digest` gives a file's sha256 when the writer already computed it."""
    plan = result.plan
    sources = plan.sources
    inputs = [
        {"role": "base" if ckpt is sources.base else "model", "path": str(ckpt.path), "format": ckpt.format,
         "shards": [p.name for p in ckpt.shards], "bytes": ckpt.total_bytes, "tensors": len(ckpt.tensors)}
        for ckpt in ([sources.base] if sources.base is not None else []) + sources.experts
    ]
    files = [{"name": name, "bytes": (written_dir / name).stat().st_size,
              "sha256": known_digest(name) or file_sha256(written_dir / name)} for name in result.files]
    timings = result.timings
    warnings = list(plan.warnings)
    if result.resumed:
        warnings.append(f"resumed: {result.resumed} tensor(s) were kept from an interrupted run (checksums verified)")
    if result.reverted:
        warnings.append(f"{len(result.reverted)} batch-norm variance tensor(s) came out zero or negative (the merged "
                        f"model would compute NaN) and were kept from {sources.reference.path} instead, e.g. "
                        f"{result.reverted[0]!r}")
    if result.nonfinite:
        warnings.append(f"{len(result.nonfinite)} merged tensor(s) hold NaN or Inf, e.g. {result.nonfinite[0]!r}")
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method.name,
        "recipe": plan.recipe.model_dump(mode="json", exclude_none=True),
        "seed": result.seed,
        "device": str(result.device),
        "host": {"machine": platform.machine(), "system": platform.system(), "cpus": _cpu_count()},
        "inputs": inputs,
        "output": {"path": str(out_dir), "files": files, "bytes": sum(f["bytes"] for f in files),
                   "tensors": len(plan.tensors)},
        "timings_seconds": {"read": timings.read, "compute": timings.compute, "write": timings.write,
                            "waiting_for_reads": timings.wait, "first_pass": timings.prepare,
                            "total": result.wall_seconds},
        "peak_memory": peak_memory(result.device),
        "versions": library_versions(),
        "warnings": warnings,
        "tensors": result.tensor_stats,
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def model_card(result: MergeResult, recipe_text: str) -> str:
    plan = result.plan
    sources = plan.sources
    lines = ["---", "library_name: transformers" if sources.reference.kind == "transformers" else "library_name: timm",
             "tags:", "- merge", "- mergekit_lite", "---", "", f"# Merged model ({plan.method.name})", "",
             f"Made with mergekit_lite {__version__} using **{plan.method.name}**: {plan.method.summary}.", ""]
    if sources.base is not None:
        lines += [f"Base model: `{sources.base.path}`", ""]
    lines += ["Models merged:", ""] + [f"- `{ckpt.path}`" for ckpt in sources.experts]
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
