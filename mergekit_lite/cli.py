"""The `merge` command line: parse arguments, call the library, print with rich. No merge logic lives here."""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.errors import MarkupError
from rich.markup import escape
from rich.table import Table

from mergekit_lite.errors import UserError, one_line
from mergekit_lite.ray_session import join as join_ray_cluster
from mergekit_lite.units import human_bytes
from mergekit_lite.version import __version__

app = typer.Typer(
    help="Merge neural-network checkpoints (TIES, DARE, task arithmetic, ...) streamed from safetensors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def encodable(text: str) -> str:
    """A path's undecodable bytes (surrogate escapes) shown as escapes: printing them would raise."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable(text: str) -> str:
    """Text from outside (a message naming paths, keys, values) safe to print: markup escaped too."""
    return escape(encodable(text))


class SafeConsole(Console):
    """A console that never fails on a path holding a byte that is not UTF-8."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(encodable(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Piped output is not cut to 80 columns: tensor names are long and users grep them.
out = SafeConsole(width=None if sys.stdout.isatty() else 200)
err = SafeConsole(stderr=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"mergekit_lite {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def guarded(command: Callable) -> Callable:
    """User mistakes print one line and exit 2; bugs print one line (traceback with --debug) and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except UserError as exc:
            if _state["debug"]:
                traceback.print_exc()
            err.print(f"[bold red]error:[/] {printable(one_line(exc, limit=2000))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was published at the output path (merge run ... --resume continues)")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"]:
                traceback.print_exc()
            err.print(
                f"[bold red]internal error:[/] {exc.__class__.__name__}: {printable(one_line(exc))} (a bug; rerun with "
                "--debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@guarded
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint directory (HF or timm layout) or a .safetensors file."),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    against: Optional[Path] = typer.Option(
        None, "--against", help="Compare with another checkpoint: relative difference and cosine per tensor and layer."
    ),
    top: int = typer.Option(10, "--top", min=1, help="How many of the largest tensors (or most changed) to show."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read pickled .bin/.pt (weights_only=True)."),
    device: str = typer.Option("cpu", "--device", help="Device for --against arithmetic (cpu, cuda, cuda:N, auto)."),
) -> None:
    """Show what a checkpoint holds: format, shards, tensors, parameters, dtypes, architecture, layers."""
    from mergekit_lite.checkpoint import open_checkpoint
    from mergekit_lite.device import resolve_device
    from mergekit_lite.dispatch import summarise_directory
    from mergekit_lite.inspect import compare, summarize, tensor_table

    special = summarise_directory(path)
    if special is not None:  # a directory a pipeline lays out its own way: describe it, then its checkpoint
        path = special.checkpoint
    ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
    if against is not None:
        other = open_checkpoint(against, allow_pickle=allow_pickle)
        result = compare(ckpt, other, device=str(resolve_device(device)))
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            _print_comparison(result, top)
        return
    summary = summarize(ckpt, largest=top)
    if tensors:
        summary["tensors"] = tensor_table(ckpt)
    if special is not None:
        summary[special.key] = special.facts
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    if special is not None:
        out.print(special.line, highlight=False, markup=False)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    out.print(f"[bold]{summary['path']}[/]")
    facts = [
        ("format", summary["format"]),
        ("kind", summary["kind"]),
        ("architecture", summary["architecture"] or "unknown (no config.json)"),
        ("layers", summary["layers"]),
        ("shards", f"{len(summary['shards'])}: {', '.join(summary['shards'])}"),
        ("tensors", f"{summary['tensor_count']:,}"),
        ("parameters", f"{summary['parameter_count']:,}"),
        ("size", human_bytes(summary["bytes"])),
    ]
    for key, value in facts:
        out.print(f"  {key:<13}{value}", highlight=False)
    table = Table("dtype", "tensors", "parameters", "size", title="by dtype")
    for dtype, row in summary["dtypes"].items():
        table.add_row(dtype, str(row["tensors"]), f"{row['parameters']:,}", human_bytes(row["bytes"]))
    out.print(table)
    rows = summary.get("tensors") or summary["largest_tensors"]
    title = "all tensors" if summary.get("tensors") else "largest tensors"
    table = Table(title=title)
    table.add_column("name", no_wrap=True, min_width=max((len(r["name"]) for r in rows), default=4))
    for column in ("shape", "dtype", "parameters", "shard"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], "×".join(map(str, row["shape"])) or "scalar", row["dtype"], f"{row['parameters']:,}", row["shard"])
    out.print(table)


def _print_comparison(result: dict, top: int) -> None:
    out.print(f"[bold]{result['b']}[/] against [bold]{result['a']}[/]")
    out.print(f"  overall relative difference ‖B−A‖/‖A‖: {result['relative_diff']:.6g}", highlight=False)
    table = Table("layer", "‖B−A‖/‖A‖", title="per layer")
    for row in result["layers"]:
        table.add_row(row["layer"], f"{row['relative_diff']:.6g}")
    out.print(table)
    changed = sorted(result["tensors"], key=lambda r: r["relative_diff"], reverse=True)[:top]
    table = Table(title=f"{len(changed)} most changed tensors")
    table.add_column("tensor", no_wrap=True, min_width=max((len(r["name"]) for r in changed), default=6))
    table.add_column("‖B−A‖/‖A‖")
    table.add_column("cosine(A, B)")
    for row in changed:
        table.add_row(row["name"], f"{row['relative_diff']:.6g}", f"{row['cosine']:.6f}")
    out.print(table)
    for key, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        if result[key]:
            out.print(f"  {label}: {len(result[key])} tensor(s), e.g. {result[key][0]}", highlight=False)
    for row in result["shape_mismatch"]:
        out.print(f"  shape differs: {row['name']} {row['a']} vs {row['b']}", highlight=False)


# A phase judged to take at least this long gets a line with its estimated cost.
ESTIMATE_NOTE_SECONDS = 10.0


def phase_estimate(first_step: float, second_step: float, steps: int) -> float:
    """Seconds a phase of `steps` like steps takes in all, from its first two: the first counts once as it was
    (it carries the warm-up: allocation, kernel choice), the second stands for every later one."""
    return first_step + second_step * (steps - 1)


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RichProgress:
    """A progress bar with an ETA on stderr; nothing when stderr is not a terminal or --quiet. With bytes it
    counts tensors and bytes (a merge); with no bytes it counts steps (a model-aware phase: refinement, tuning),
    and once two steps are timed, a phase that will take long says how long, before the rest of its work."""

    def __init__(self, enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self._bar = None
        self._clock = clock

    def start(self, tensors: int, nbytes: int, label: str) -> None:
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._by_bytes = nbytes > 0
        counts = [DownloadColumn(), TextColumn("{task.fields[tensors]}")] if self._by_bytes else [MofNCompleteColumn()]
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), *counts, TimeElapsedColumn(),
                             TimeRemainingColumn(), console=err, transient=False)
        self._bar.start()
        self._total_tensors = tensors
        self._done = 0
        self._label = label
        self._step_ends = [self._clock()]
        self._estimated = False
        self._done_bytes, self._total_bytes = 0, nbytes
        self._task = self._bar.add_task(label, total=nbytes if self._by_bytes else tensors,
                                        tensors=f"0/{tensors} tensors")

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._done += 1
            self._bar.update(self._task, advance=nbytes if self._by_bytes else 1,
                             tensors=f"{self._done}/{self._total_tensors} tensors")
            self._done_bytes += nbytes
            if not self._estimated:
                self._estimate()

    def _estimate(self) -> None:
        """The phase's whole cost, said once: for steps from the first two; for bytes once 5 % of them are done."""
        if self._by_bytes:
            if self._done_bytes < 0.05 * self._total_bytes or self._done_bytes >= self._total_bytes:
                return
            total = (self._clock() - self._step_ends[0]) * self._total_bytes / self._done_bytes
            how = f"for {self._total_tensors} tensors (from the first {self._done_bytes / self._total_bytes:.0%})"
        else:
            if self._done < 2:
                self._step_ends.append(self._clock())
                return
            self._step_ends.append(self._clock())
            if self._total_tensors <= 2:
                self._estimated = True
                return
            first, second = (b - a for a, b in zip(self._step_ends, self._step_ends[1:]))
            total = phase_estimate(first, second, self._total_tensors)
            how = f"for {self._total_tensors} steps (timed on the first two)"
        self._estimated = True
        if total >= ESTIMATE_NOTE_SECONDS:
            self.note(f"{self._label}: about {duration_text(total)} {how}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, message: str) -> None:
        """One line before a long phase (what it has to do), printed with the bars."""
        if self.enabled:
            err.print(printable(message), markup=False, highlight=False)


@app.command()
@guarded
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe (mergekit format)."),
    out_dir: Optional[Path] = typer.Argument(None, help="Output directory; may instead be given as 'output:' in the recipe."),
    report: Optional[Path] = typer.Option(None, "--report", help="Where to write the JSON report (default: OUT_DIR/merge_report.json)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace OUT_DIR if it exists (only once the merge has succeeded)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary (warnings still go to stderr)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**63 - 1,
                                       help="Seed for random methods (DARE, DELLA); overrides the recipe."),
    shard_size: Optional[str] = typer.Option(None, "--shard-size", help="Largest output shard, e.g. 5GB or 500MB."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read pickled .bin/.pt inputs (weights_only=True)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted merge of the same recipe, keeping the tensors it wrote."),
    cuda: bool = typer.Option(False, "--cuda", help="mergekit's flag: the same as --device cuda."),
    out_shard_size: Optional[str] = typer.Option(
        None, "--out-shard-size", help="mergekit's flag: parameters per output shard, e.g. 5B or 500M (--shard-size counts bytes)."),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="Copy the tokenizer (and generation) files to the output."),
    write_model_card: bool = typer.Option(True, "--write-model-card/--no-write-model-card",
                                          help="Write README.md, the model card, into the output."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes",
                                      help="mergekit's flag: merge models whose configs name different architectures, where their tensors match."),
    lazy_unpickle: bool = typer.Option(False, "--lazy-unpickle",
                                       help="mergekit's flag, accepted: every input is read lazily here anyway."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Refused: no model code is ever run from a checkpoint."),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="Merge on a Ray cluster, one task per output shard: --ray alone (or --ray local) starts a local one, "
             "--ray auto joins the cluster RAY_ADDRESS names, --ray HOST:PORT that one. Inputs and output on a "
             "file system every node shares."),
) -> None:
    """Merge the checkpoints a recipe names and write OUT_DIR (weights, config, tokenizer, model card, report)."""
    if ray is not None:  # before torch is loaded here: the cluster's workers load it (and the tasks' module) meanwhile
        join_ray_cluster(ray, "mergekit_lite.cluster")
    from mergekit_lite.dispatch import describe_report, merge_recipe_file
    from mergekit_lite.pipeline import MergeOptions
    from mergekit_lite.units import parse_count

    if trust_remote_code:
        raise UserError("--trust-remote-code: refused; mergekit_lite never runs code from a checkpoint (models are "
                        "built from their config with the installed transformers or timm), so no merge needs it")
    if cuda and device not in ("auto", "cuda"):
        raise UserError(f"--cuda and --device {device} disagree; give one of them")
    shard_parameters = None
    if out_shard_size is not None:
        shard_parameters = parse_count(out_shard_size)
        if shard_parameters is None:
            raise UserError(f"--out-shard-size {out_shard_size!r}: a number of parameters like 5B, 500M or 10K")
    options = MergeOptions(device="cuda" if cuda else device, force=force, seed=seed, shard_size=shard_size,
                           allow_pickle=allow_pickle, report_path=report, resume=resume,
                           shard_parameters=shard_parameters, copy_tokenizer=copy_tokenizer,
                           write_model_card=write_model_card, allow_crimes=allow_crimes, ray=ray)
    progress = RichProgress(enabled=not quiet and err.is_terminal)
    result = merge_recipe_file(recipe, out_dir, options, progress=progress)
    for warning in result["warnings"]:  # also under --quiet: each names something the user should check
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if quiet:
        return
    timings = result["timings_seconds"]
    steps = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in timings.items()
                      if k in ("read", "refine", "compute", "write", "shared_merge", "compress", "router"))
    out.print(
        f"[bold green]merged[/] {result['output']['tensors']} tensors with {result['method']} into "
        f"{result['output']['path']} ({human_bytes(result['output']['bytes'])}) on {result['device']} in "
        f"{timings['total']:.1f} s ({steps}); peak RSS {human_bytes(result['peak_memory']['rss_bytes'])}",
        highlight=False,
    )
    for line in describe_report(result):
        out.print(line, highlight=False, markup=False)
    out.print(f"report: {report or Path(result['output']['path']) / 'merge_report.json'}", highlight=False)


@app.command()
@guarded
def validate(
    recipe: Path = typer.Argument(..., help="YAML recipe to check."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read pickled .bin/.pt inputs (weights_only=True)."),
) -> None:
    """Check a recipe and its inputs (paths, shapes, missing tensors) from file headers, without merging. For
    pleas, also build both models and check their permutation groups."""
    from mergekit_lite.dispatch import validate_recipe_file

    found = validate_recipe_file(recipe, allow_pickle=allow_pickle)
    for line in found.lines:
        out.print("[bold green]ok[/]: " + escape(line), highlight=False)
    for warning in found.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command()
@guarded
def methods(as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON.")) -> None:
    """List the merge methods and their parameters, with defaults."""
    from mergekit_lite.dispatch import PIPELINES as METHODS

    if as_json:
        listing = {
            name: {"summary": m.summary, "needs_base": m.needs_base, "optional_base": m.optional_base,
                   "parameters": [{"name": p.name, "type": p.kind.__name__, "default": p.default, "scope": p.scope,
                                   "required": p.required, "help": p.help} for p in m.params]}
            for name, m in METHODS.items()
        }
        print(json.dumps(listing, indent=2))
        return
    width = max(len(p.name) for method in METHODS.values() for p in method.params)
    for name, method in METHODS.items():
        base = ("" if method.needs_base else "  (base_model optional)" if method.optional_base or method.base_as_input
                else "  (no base_model needed)")
        out.print(f"[bold]{name}[/]  {method.summary}{base}", highlight=False)
        for p in method.params:
            where = "per model or global" if p.scope == "model" else "global"
            default = "required" if p.required else "default " + ("auto" if p.default is None else str(p.default))
            out.print(f"    {p.name:<{width}} {p.kind.__name__:<5} {default:<15} {where:<20} {p.help}", highlight=False)


@app.command("report")
@guarded
def show_report(
    path: Path = typer.Argument(..., help="A merge_report.json, or the merged directory holding one."),
    top: int = typer.Option(10, "--top", min=1, help="How many tensors to list."),
) -> None:
    """Summarise a merge report: inputs, output, timings, memory, and per-tensor statistics."""
    from mergekit_lite.checkpoint.files import REPORT_SCHEMA_PREFIX, load_json

    file = path / "merge_report.json" if path.is_dir() else path
    if not file.exists():
        raise UserError(f"{file}: no such report")
    report = load_json(file, None, "report")
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith(REPORT_SCHEMA_PREFIX):
        raise UserError(f"{file}: not a mergekit_lite report (no schema field)")
    try:
        _print_report(report, top)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, MarkupError) as exc:
        raise UserError(f"{file}: a damaged report: {exc.__class__.__name__} {one_line(exc)}; it lacks or garbles "
                        "the fields a report has") from None


def _print_report(report: dict, top: int) -> None:
    timings, memory = report["timings_seconds"], report["peak_memory"]
    out.print(f"[bold]{report['method']}[/] merge, {report['created']}, seed {report['seed']}, device {report['device']}", highlight=False)
    for item in report["inputs"]:
        sizes = f"  ({item['tensors']} tensors, {human_bytes(item['bytes'])})" if "tensors" in item else ""
        task = f" (task {item['task']})" if "task" in item else ""
        out.print(f"  {item['role']:<6}{item['path']}{task}{sizes}", highlight=False)
    output = report["output"]
    files = f" in {len(output['files'])} file(s)" if "files" in output else ""
    out.print(f"  output {output['path']}  ({output['tensors']} tensors, {human_bytes(output['bytes'])}{files})",
              highlight=False)
    from mergekit_lite.dispatch import describe_report

    for line in describe_report(report):
        out.print("  " + line, highlight=False, markup=False)
    out.print("  time   " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()), highlight=False)
    out.print(f"  memory peak RSS {human_bytes(memory['rss_bytes'])}"
              + (f", CUDA {human_bytes(memory['cuda_bytes'])}" if "cuda_bytes" in memory else ""), highlight=False)
    merged = [t for t in report.get("tensors", []) if "norm" in t]
    merged.sort(key=lambda t: t.get("delta_norm", 0.0) / (t["norm"] or 1.0), reverse=True)
    table = Table(title=f"{min(top, len(merged))} most changed tensors (of {len(merged)} merged)")
    table.add_column("tensor", no_wrap=True)
    for column in ("‖Δ‖/‖θ‖", "kept per model", "sign agreement"):
        table.add_column(column)
    if not merged:
        table = None
    for row in merged[:top]:
        kept = row.get("kept_fraction")
        agreement = row.get("sign_agreement")
        table.add_row(
            row["name"],
            f"{row.get('delta_norm', 0.0) / (row['norm'] or 1.0):.4g}",
            " ".join(f"{k:.2f}" for k in kept) if kept else "-",
            f"{agreement:.3f}" if agreement is not None else "-",
        )
    if table is not None:
        out.print(table)
    for warning in report["warnings"]:
        out.print(f"  [yellow]warning:[/] {warning}", highlight=False)


def _task_mix(text: str) -> dict[str, float]:
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, value = part.partition("=")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            raise UserError(f"--weights: {part!r} is not task=weight (e.g. code=0.7,prose=0.3)") from None
        if not sep or not task.strip():
            raise UserError(f"--weights: {part!r} is not task=weight (e.g. code=0.7,prose=0.3)")
    if not weights:
        raise UserError("--weights: name at least one task, e.g. code=1.0")
    return weights


@app.command("twin-collapse")
@guarded
def twin_collapse(
    directory: Path = typer.Argument(..., help="A Twin-Merging directory (written by a twin recipe)."),
    weights: str = typer.Option(..., "--weights", help="Fixed task mix, e.g. code=0.7,prose=0.3 (unnamed tasks: 0)."),
    out_dir: Path = typer.Option(..., "--out", help="Where to write the plain checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Fold a fixed task mix into a plain checkpoint (shared + sum of weighted exclusive experts) that loads like
    the source models, for users who know their mix and want no router."""
    from mergekit_lite.twin.collapse import collapse

    result = collapse(directory, _task_mix(weights), out_dir, force=force)
    mix = ", ".join(f"{task}={w:g}" for task, w in result["weights"].items())
    out.print(f"[bold green]collapsed[/] {result['tensors']} tensors ({mix}) into {result['path']}", highlight=False)
    for warning in result["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


def bare_ray_flag(args: list[str]) -> list[str]:
    """`--ray` with no address (last, or before another option) means a local cluster: `--ray local`."""
    out = list(args)
    for index, arg in enumerate(out):
        if arg == "--ray" and (index + 1 == len(out) or out[index + 1].startswith("-")):
            out[index + 1:index + 1] = ["local"]
            break
    return out


def exit_status(stop: SystemExit) -> int:
    """The status `sys.exit(x)` gives: 0 for None, the number, or 1 for a message (printed to stderr)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def leave(status: int) -> None:
    """End the process now that the command is done. By then its outputs are written, synced and closed; exit
    handlers still run and stdout and stderr are flushed here. What is skipped is the interpreter's teardown of
    torch and the other loaded libraries, which takes 0.6-0.7 s after a merge. Under a profiler, debugger or
    coverage tool, which write their results after the program ends, the process ends the usual way."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that stopped early (`| head`), or a closed stream
            pass
    os._exit(status)


def main() -> None:
    """The `merge` command."""
    try:
        app(args=bare_ray_flag(sys.argv[1:]), prog_name="merge")
    except SystemExit as stop:
        leave(exit_status(stop))
    leave(0)


if __name__ == "__main__":
    sys.exit(main())
