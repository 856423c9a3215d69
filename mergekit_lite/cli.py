"""The `merge` command line: parse arguments, call the library, print with rich. No merge logic lives here."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from mergekit_lite import __version__
from mergekit_lite.errors import UserError

app = typer.Typer(
    help="Merge neural-network checkpoints (TIES, DARE, task arithmetic, ...) streamed from safetensors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output is not cut to 80 columns: tensor names are long and users grep them.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)
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
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written at the output path")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"]:
                traceback.print_exc()
            err.print(
                f"[bold red]internal error:[/] {exc.__class__.__name__}: {exc} (a bug; rerun with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


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
    from mergekit_lite.inspect import compare, summarize, tensor_table

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
    if as_json:
        print(json.dumps(summary, indent=2))
        return
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
        ("size", _human_bytes(summary["bytes"])),
    ]
    for key, value in facts:
        out.print(f"  {key:<13}{value}", highlight=False)
    table = Table("dtype", "tensors", "parameters", "size", title="by dtype")
    for dtype, row in summary["dtypes"].items():
        table.add_row(dtype, str(row["tensors"]), f"{row['parameters']:,}", _human_bytes(row["bytes"]))
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


def main() -> None:
    app(prog_name="merge")


if __name__ == "__main__":
    sys.exit(main())
