"""The JSON merge report and the model card, shared by every pipeline: one envelope (the same keys in every report,
versioned by `schema`), writing, hashes, versions, memory, and the card's skeleton. A pipeline adds its own section
(e.g. `pleas`, `twin`) and its own card lines; this module imports nothing that computes a merge."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from mergekit_lite.checkpoint.files import REPORT_SCHEMA_PREFIX, replace_file
from mergekit_lite.version import __version__

SCHEMA = f"{REPORT_SCHEMA_PREFIX}1"
KIND_SCHEMA_PREFIX = "mergekit_lite.report."
ENVELOPE_KEYS = ("schema", "kind_schema", "created", "method", "recipe", "seed", "device", "host", "inputs", "output",
                 "timings_seconds", "peak_memory", "versions", "warnings")
KIND_SCHEMA_VERSIONS = {"tensorwise": 1, "pleas": 1, "twin": 1}  # raised when that kind's sections change
REPORT_NAME = "merge_report.json"
RECIPE_NAME = "merge_recipe.yaml"
MERGEKIT_CONFIG_NAME = "mergekit_config.yml"  # the name the hub's tooling looks for


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report(path: Path, report: dict[str, Any]) -> None:
    """A report at --report, replaced whole (a report this tool wrote before may be there; nothing else is)."""
    replace_file(path, report_bytes(report))


def report_bytes(report: dict[str, Any]) -> bytes:
    return (json.dumps(report, indent=2) + "\n").encode()


def write_description(writer: Any, recipe_text: str, card: str | None) -> None:
    """The recipe (as `merge_recipe.yaml` and as mergekit's `mergekit_config.yml`) and, unless `card` is None
    (--no-write-model-card), the model card, into a checkpoint writer's output."""
    writer.add_file(RECIPE_NAME, recipe_text)
    writer.add_file(MERGEKIT_CONFIG_NAME, recipe_text)
    if card is not None:
        writer.add_file("README.md", card)


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


def host() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "cpus": cpus}


def output_files(directory: Path, names: Iterable[str],
                 known_digest: Callable[[str], str | None] = lambda name: None) -> list[dict[str, Any]]:
    """Name, size and sha256 of each file written (`names` relative to `directory`, where they lie now);
    `known_digest` gives a digest the writer already computed."""
    return [{"name": name, "bytes": (directory / name).stat().st_size,
             "sha256": known_digest(name) or file_sha256(directory / name)} for name in names]


def envelope(*, kind: str, method: str, recipe: dict[str, Any], seed: int, device: torch.device, inputs: list[dict[str, Any]],
             output_path: Path, files: list[dict[str, Any]], tensors: int, timings: dict[str, float],
             warnings: list[str], sections: dict[str, Any] | None = None,
             hub_sources: list[dict[str, str]] = ()) -> dict[str, Any]:
    """The report every pipeline writes: the same keys in the same order, then its own sections. `schema`
    versions the envelope, `kind_schema` the sections of this kind of report (tensorwise, pleas or twin)."""
    for item in inputs:  # a hub id: which repository and commit the input resolved to
        source = next((s for s in hub_sources if Path(s["path"]) == Path(item["path"])), None)
        if source is not None:
            item["hub"] = {"id": source["repo_id"], "revision": source["revision"], "commit": source["commit"]}
    report = {
        "schema": SCHEMA,
        "kind_schema": f"{KIND_SCHEMA_PREFIX}{kind}/{KIND_SCHEMA_VERSIONS[kind]}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "recipe": recipe,
        "seed": seed,
        "device": str(device),
        "host": host(),
        "inputs": inputs,
        "output": {"path": str(output_path), "files": files, "bytes": sum(f["bytes"] for f in files),
                   "tensors": tensors},
        "timings_seconds": timings,
        "peak_memory": peak_memory(device),
        "versions": library_versions(),
        "warnings": warnings,
    }
    report.update(sections or {})
    return report


def model_card(*, title: str, tags: list[str], library: str | None, intro: str, body: list[str],
               recipe_text: str, base_models: Iterable[str] = ()) -> str:
    """A Hugging Face model card: front matter (the inputs as `base_model`, the tags the hub lists merges by),
    what made it, the pipeline's lines, and the recipe."""
    front = ["---"] + ([f"library_name: {library}"] if library else [])
    models = list(dict.fromkeys(str(model) for model in base_models))
    if models:
        front += ["base_model:"] + [f"- {json.dumps(model)}" for model in models]
    front += ["tags:", "- merge", "- mergekit", "- mergekit_lite"] + [f"- {tag}" for tag in tags] + ["---", ""]
    lines = front + [f"# {title}", "", f"Made with mergekit_lite {__version__}: {intro}", ""] + body
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)
