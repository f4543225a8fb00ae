"""`onnx-sap`: each command is a thin layer over the Python API (onnx_sap.api and friends).

Errors the user can fix print one line on stderr and exit 2; nothing is written then.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import OnnxSapError
from .harden import HardenOptions, Plan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Harden ONNX classifiers with Stochastic Activation Pruning (SAP), no retraining.")
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one line and exit: the CLI's only way of reporting a user error."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _split(values: Optional[List[str]]) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _sites_table(plan: Plan, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("#", "graph", "kind", "form", "node(s)", "shape", "m", "r", "SAP"):
        table.add_column(col, justify="right" if col in ("#", "m", "r") else "left")
    for i, s in enumerate(plan.sites):
        nodes = s.nodes[-1] if len(s.nodes) == 1 else f"{s.nodes[0]} .. {s.nodes[-1]} ({len(s.nodes)})"
        table.add_row(str(i), s.graph, s.kind, s.form, nodes, "x".join(map(str, s.shape)) if s.shape else "?",
                      str(s.m) if s.m else "?", str(s.r) if s.r else "run time",
                      "yes" if s.selected else f"[dim]no: {s.reason}[/]")
    return table


def _kind_summary(plan: Plan) -> Table:
    table = Table(title="Summary", title_justify="left")
    for col in ("kind", "sites", "activations / example"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    kinds: dict[str, list[int]] = {}
    for s in plan.selected:
        kinds.setdefault(s.kind, []).append(s.m or 0)
    for kind, ms in sorted(kinds.items()):
        table.add_row(kind, str(len(ms)), f"{sum(ms):,}" + ("" if all(ms) else " + dynamic"))
    table.add_row("[bold]total[/]", str(len(plan.selected)), f"{sum(s.m or 0 for s in plan.selected):,}")
    return table


def _options(ratio: float, samples: int, mode: str, axis: int, seed: int, include, exclude, portable: bool,
             ensemble: int, ensemble_reduce: str, force: bool) -> HardenOptions:
    opts = HardenOptions(ratio=ratio, samples=samples, mode=mode, axis=axis, seed=seed, include=_split(include),
                         exclude=_split(exclude), portable=portable, ensemble=ensemble,
                         ensemble_reduce=ensemble_reduce, force=force)
    opts.validate()
    return opts


@app.command()
def harden(
    model: Path = typer.Argument(..., help="The ONNX model to harden (never modified)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: MODEL.sap.onnx)."),
    ratio: float = typer.Option(1.0, help="Samples per example as a fraction of its activations (r = ratio*m)."),
    samples: int = typer.Option(0, help="Fixed samples per example (overrides --ratio when > 0)."),
    mode: str = typer.Option("multinomial", help="multinomial (the paper's SAP) or bernoulli."),
    axis: int = typer.Option(1, help="Dims before AXIS index examples; the rest form one example."),
    seed: int = typer.Option(0, help="0: fresh OS entropy per run (deployment). Non-zero: reproducible, predictable."),
    include: Optional[List[str]] = typer.Option(None, help="Only these kinds or node-name globs (repeat or comma)."),
    exclude: Optional[List[str]] = typer.Option(None, help="Skip these kinds or node-name globs."),
    portable: bool = typer.Option(False, help="Emit SAP as standard ONNX ops (any runtime, no op library)."),
    ensemble: int = typer.Option(1, help="Average K stochastic passes inside one run."),
    ensemble_reduce: str = typer.Option("probs", help="probs: log(mean softmax); logits: mean of logits."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable plan and summary on stdout."),
    force: bool = typer.Option(False, help="Replace SAP nodes already in the model (never stacked)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run both models in ONNX Runtime before writing."),
    overwrite: bool = typer.Option(False, help="Allow the output to replace the input file."),
) -> None:
    """Insert SAP after every activation of MODEL."""
    from .api import harden as harden_api

    opts = _options(ratio, samples, mode, axis, seed, include, exclude, portable, ensemble, ensemble_reduce, force)
    report = harden_api(model, output, opts, check=check, overwrite=overwrite, dry_run=dry_run)
    if as_json:
        doc = {"plan": report.plan.to_dict(), "output": str(report.output) if report.output else None,
               "dry_run": dry_run, "check": report.check.__dict__ if report.check else None}
        if report.output:
            doc["output_bytes"] = report.output.stat().st_size
        print(json.dumps(doc, indent=2))
        if seed:
            err.print("[yellow]warning:[/] --seed makes SAP's randomness predictable to an attacker; use it for "
                      "tests and evaluation only", highlight=False)
        return
    out.print(_sites_table(report.plan, f"Activation sites in {model}"))
    out.print(_kind_summary(report.plan))
    if seed:
        err.print("[yellow]warning:[/] --seed makes SAP's randomness predictable to an attacker; use it for tests "
                  "and evaluation only", highlight=False)
    if dry_run:
        out.print("dry run: nothing written. Drop --dry-run to write the hardened model.")
        return
    form = "portable standard ops" if portable else "custom op onnx_sap::StochasticActivationPruning"
    size = report.output.stat().st_size
    out.print(f"wrote [bold]{report.output}[/] ({size / 1e6:.2f} MB): {len(report.plan.selected)} SAP sites, "
              f"mode {mode}, {form}" + (f", ensemble of {ensemble}" if ensemble > 1 else ""))
    if report.check is not None:
        c = report.check
        out.print("check: ran original and hardened in ONNX Runtime; outputs match in name, dtype and shape"
                  + (f"; with SAP made deterministic, max |diff| = {c.max_abs_diff:.2e}" if c.equivalence_checked
                     else f"; {c.note}"))
    out.print(f"next: onnx-sap verify {report.output}   (op vs reference)   |   "
              f"onnx-sap evaluate {model} {report.output} --data ...")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="An ONNX model, plain or hardened."),
    axis: int = typer.Option(1, help="As for harden: used for m and r."),
    ratio: float = typer.Option(1.0, help="As for harden: used for r."),
    samples: int = typer.Option(0, help="As for harden: used for r."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the activation sites harden would rewrite, and any SAP nodes already present."""
    from .api import inspect as inspect_api

    plan = inspect_api(model, HardenOptions(axis=axis, ratio=ratio, samples=samples))
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    out.print(_sites_table(plan, f"Activation sites in {model}"))
    if plan.existing:
        table = Table(title="SAP nodes already present", title_justify="left")
        for col in ("graph", "node", "form", "attributes"):
            table.add_column(col)
        for e in plan.existing:
            table.add_row(e["graph"], e["node"], e["form"],
                          ", ".join(f"{k}={v}" for k, v in e["attributes"].items()))
        out.print(table)
    else:
        out.print("no SAP nodes present. Harden with: onnx-sap harden " + str(model))


@app.command()
def strip(
    model: Path = typer.Argument(..., help="A hardened model."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: MODEL.stripped.onnx)."),
    overwrite: bool = typer.Option(False, help="Allow the output to replace the input file."),
) -> None:
    """Remove SAP nodes (custom, portable, ensemble), restoring the original computation bit for bit."""
    from .api import strip as strip_api

    _, removed, path = strip_api(model, output, overwrite=overwrite)
    out.print(f"removed {removed} SAP region(s); wrote [bold]{path}[/]")


@app.command()
def version() -> None:
    """Print the version, the op library and whether it has CUDA kernels."""
    from .runtime import get_library_path, has_cuda_kernels

    out.print(f"onnx-sap {__version__}; op library {get_library_path()}; CUDA kernels: {has_cuda_kernels()}")


def main() -> None:
    """Entry point: user errors become one line and exit code 2, never a traceback."""
    try:
        rc = app(standalone_mode=False)  # click returns Exit codes here rather than raising them
        sys.exit(rc if isinstance(rc, int) else 0)
    except OnnxSapError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)
    except Exception as e:  # usage errors (click's, vendored by Typer) and anything unforeseen: one line
        if hasattr(e, "format_message"):
            err.print(f"[bold red]error:[/] {e.format_message()} (see --help)", highlight=False, soft_wrap=True)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} (please report this)", highlight=False,
                  soft_wrap=True)
        sys.exit(1)
