"""`onnx-sap`: each command is a thin layer over the Python API (onnx_sap.api and friends).

Errors the user can fix print one line on stderr (with --json: {"error": ...} on stdout) and exit 2;
nothing is written then. Output fits 80 columns: tables wrap long names instead of cutting them, and
each table's caption explains its columns. Progress goes to stderr: a spinner in a terminal, a plain
line per finished stage in logs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import OnnxSapError, OptionError
from .rewrite import HardenOptions, Plan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)  # plain help: compact at 80 columns, readable in logs
# Width: the terminal's, else $COLUMNS, else 80 (logs); tables are built to fit 80.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

# API parameters whose flag is not the name with dashes (OptionError.as_flag: the one mapping).
FLAGS = {"batches": "--batch", "ratios": "--ratio", "modes": "--mode", "ensembles": "--ensemble"}


class CliError(OnnxSapError):
    """A user error found by the CLI itself, with its exit code."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 2) -> None:
    """Stop with one line naming the problem: the CLI's only way of reporting a user error."""
    raise CliError(message, code)


def examples(*lines: str) -> str:
    """A command's help epilog: example command lines, kept as written."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


@contextmanager
def stages(command: str, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """A progress callback for the API: in a terminal a transient spinner showing the last finished
    stage; otherwise (logs, CI) one plain line per finished stage on stderr."""
    start = time.perf_counter()
    if quiet:
        yield lambda message: None
    elif err.is_terminal:
        with err.status(f"{command} ...") as status:
            yield lambda message: status.update(f"{command}: {escape(message)} ...")
    else:
        yield lambda message: err.print(Text(f"{command}: {message} [{time.perf_counter() - start:.1f} s]"),
                                        soft_wrap=True)


def print_json(doc) -> None:
    """Print doc as strict JSON: NaN and infinities (not JSON) become null."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    print(json.dumps(finite(doc), indent=2, allow_nan=False))


def _split(values: Optional[List[str]]) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


class LegendTable(Table):
    """A table with a legend saying what each column means, printed under it at full width (a Rich
    caption would wrap to the table's width)."""

    def __init__(self, title: str, legend: str):
        super().__init__(title=title, title_justify="left")
        self.legend = legend


def show(table: LegendTable) -> None:
    """Print a table and its legend."""
    out.print(table)
    out.print(Text(table.legend, style="dim"))


def _nodes_cell(nodes: list[str]) -> str:
    return escape(nodes[-1] if len(nodes) == 1 else f"{nodes[0]} .. {nodes[-1]} ({len(nodes)} nodes)")


def _sites_table(plan: Plan, title: str) -> LegendTable:
    in_bodies = any(s.graph != "main" for s in plan.sites)
    table = LegendTable(title, "node(s): the activation's node (a pattern: first .. last); kind, form: what "
                          "matched (op, pattern, fused); m: activations per example (dims from --axis on); "
                          "r: samples per example (run time: set from m when a dim is dynamic); "
                          "SAP: whether harden inserts SAP there" + ("; graph: main or the If/Loop/Scan body"
                                                                     if in_bodies else ""))
    table.add_column("#", justify="right", no_wrap=True)
    if in_bodies:
        table.add_column("graph", overflow="fold", ratio=1)
    # The end of a node name tells sites apart ("/features/features.3/Relu"): fold, never cut.
    table.add_column("node(s)", overflow="fold", ratio=2, min_width=12)
    table.add_column("kind", overflow="fold")
    table.add_column("form", no_wrap=True)
    table.add_column("shape", overflow="fold")
    table.add_column("m", justify="right", no_wrap=True)
    table.add_column("r", justify="right")
    table.add_column("SAP")
    for i, s in enumerate(plan.sites):
        row = [str(i)] + ([escape(s.graph)] if in_bodies else [])
        row += [_nodes_cell(s.nodes), s.kind, s.form, escape("x".join(map(str, s.shape))) if s.shape else "?",
                str(s.m) if s.m else "?", str(s.r) if s.r else "run time",
                "yes" if s.selected else Text(f"no: {s.reason}", style="dim")]
        table.add_row(*row)
    return table


def _kind_summary(plan: Plan) -> LegendTable:
    table = LegendTable("Summary", "sites: activations of that kind to harden; activations / example: the "
                              "elements SAP prunes per example (+ dynamic: some sizes known only at run time)")
    table.add_column("kind")
    for col in ("sites", "activations / example"):
        table.add_column(col, justify="right")
    kinds: dict[str, list[int]] = {}
    for s in plan.selected:
        kinds.setdefault(s.kind, []).append(s.m or 0)
    for kind, ms in sorted(kinds.items()):
        table.add_row(kind, str(len(ms)), f"{sum(ms):,}" + ("" if all(ms) else " + dynamic"))
    table.add_row(Text("total", style="bold"), str(len(plan.selected)),
                  f"{sum(s.m or 0 for s in plan.selected):,}")
    return table


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _model_table(summary, title: str) -> Table:
    """Inputs, outputs, opsets, nodes and weights of a model (a ModelSummary)."""
    table = Table.grid(padding=(0, 2))
    table.title, table.title_justify = title, "left"
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("inputs", escape("\n".join(map(str, summary.inputs))) or "-")
    table.add_row("outputs", escape("\n".join(map(str, summary.outputs))) or "-")
    table.add_row("opsets", escape(", ".join(f"{d} {v}" for d, v in summary.opsets.items())))
    top = escape(", ".join(f"{op} {n}" for op, n in list(summary.op_types.items())[:8]))
    more = len(summary.op_types) - 8
    bodies = summary.graphs - 1
    table.add_row("nodes", f"{summary.nodes:,}" + (f" in {summary.graphs} graphs (main + {bodies} bodies)"
                                                    if bodies else "") + f": {top}" + (f", {more} more op types"
                                                                                       if more > 0 else ""))
    table.add_row("weights", f"{summary.weights:,} tensors, {summary.parameters:,} parameters, "
                             f"{_bytes(summary.weight_bytes)}")
    table.add_row("SAP", f"{summary.sap_sites} SAP site(s) present" if summary.sap_sites else "none")
    return table


def _options(ratio: float, samples: int, mode: str, axis: int, seed: int, include, exclude, portable: bool,
             ensemble: int, ensemble_reduce: str, force: bool) -> HardenOptions:
    return HardenOptions(ratio=ratio, samples=samples, mode=mode, axis=axis, seed=seed, include=_split(include),
                         exclude=_split(exclude), portable=portable, ensemble=ensemble,
                         ensemble_reduce=ensemble_reduce, force=force)


def _file_size(path: Path) -> int:
    """A model file's size with its external data files (the .data beside it)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err.print(Text("warning: ", style="yellow") + Text(w), soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_version_callback,
                                      help="Print the version, the op library and whether it has CUDA kernels."),
) -> None:
    """Harden ONNX classifiers with Stochastic Activation Pruning (SAP), no retraining.

    Start with `onnx-sap inspect model.onnx`, then `onnx-sap harden model.onnx`. Every command's
    --help ends with examples.
    """


@app.command(epilog=examples("onnx-sap harden model.onnx                       # writes model.sap.onnx",
                             "onnx-sap harden model.onnx --dry-run             # the plan only",
                             "onnx-sap harden model.onnx -o out.onnx --mode bernoulli --ratio 0.5",
                             "onnx-sap harden model.onnx --exclude '*classifier*' --portable",
                             "onnx-sap harden model.onnx --ensemble 8 --json"))
def harden(
    model: Path = typer.Argument(..., metavar="MODEL", help="The ONNX model to harden (never modified)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="OUT",
                                          help="Where to write (default: MODEL.sap.onnx)."),
    ratio: float = typer.Option(1.0, help="Samples per example as a fraction of its activations (r = ratio*m)."),
    samples: int = typer.Option(0, help="Fixed samples per example (overrides --ratio when > 0)."),
    mode: str = typer.Option("multinomial", metavar="multinomial|bernoulli",
                             help="multinomial (the paper's SAP) or bernoulli."),
    axis: int = typer.Option(1, help="Dims before AXIS index examples; the rest form one example."),
    seed: int = typer.Option(0, help="0 (deployment): the custom op draws fresh OS entropy per run; --portable "
                                     "uses the runtime's stream, seeded once per process. Non-zero: reproducible, "
                                     "predictable."),
    include: Optional[List[str]] = typer.Option(None, metavar="KIND|GLOB",
                                                help="Only these kinds or node-name globs (repeat or comma)."),
    exclude: Optional[List[str]] = typer.Option(None, metavar="KIND|GLOB",
                                                help="Skip these kinds or node-name globs (repeat or comma)."),
    portable: bool = typer.Option(False, "--portable",
                                  help="Emit SAP as standard ONNX ops (any runtime, no op library). Runtimes "
                                       "seed its random ops once per process: each new session repeats the "
                                       "same stream (README)."),
    ensemble: int = typer.Option(1, metavar="K", help="Average K stochastic passes inside one run."),
    ensemble_reduce: str = typer.Option("probs", metavar="probs|logits",
                                        help="probs: log(mean softmax); logits: mean of logits."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable plan and summary on stdout."),
    force: bool = typer.Option(False, "--force", help="Replace SAP nodes already in the model (never stacked)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Run both models in ONNX Runtime before writing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow the output to replace the input file."),
) -> None:
    """Insert SAP after every activation of MODEL."""
    from .api import harden as harden_api

    opts = _options(ratio, samples, mode, axis, seed, include, exclude, portable, ensemble, ensemble_reduce, force)
    with stages("harden", quiet=as_json) as progress:
        report = harden_api(model, output, opts, check=check, overwrite=overwrite, dry_run=dry_run,
                            progress=progress)
    _warn(opts.warnings())
    if as_json:
        doc = {"plan": report.plan.to_dict(), "output": str(report.output) if report.output else None,
               "dry_run": dry_run, "check": report.check.__dict__ if report.check else None,
               "before": report.before.to_dict() if report.before else None,
               "after": report.after.to_dict() if report.after else None}
        if report.output:
            doc["output_bytes"] = report.output.stat().st_size
        doc["warnings"] = opts.warnings()
        print_json(doc)
        return
    show(_sites_table(report.plan, f"Activation sites in {escape(str(model))}"))
    show(_kind_summary(report.plan))
    if dry_run:
        out.print("dry run: nothing written. Drop --dry-run to write the hardened model.")
        return
    form = "portable standard ops" if portable else "custom op onnx_sap::StochasticActivationPruning"
    out.print(Text(f"wrote {report.output}: {len(report.plan.selected)} SAP sites, mode {mode}, {form}"
                   + (f", ensemble of {ensemble}" if ensemble > 1 else "")), soft_wrap=True)
    if report.check is not None:
        c = report.check
        out.print("check: ran original and hardened in ONNX Runtime; outputs match in name, dtype and shape"
                  + (f"; with SAP made deterministic, max |diff| = {c.max_abs_diff:.2e}" if c.equivalence_checked
                     else f"; {c.note}"))
    b, a = report.before, report.after
    out.print(f"before -> after: nodes {b.nodes:,} -> {a.nodes:,}, SAP sites {b.sap_sites} -> {a.sap_sites}, "
              f"size {_bytes(_file_size(model))} -> {_bytes(_file_size(report.output))}")
    # A model that already had SAP is no ORIGINAL: evaluate then compares against strip(HARDENED).
    baseline = "" if report.plan.existing else f"{model} "
    out.print(Text(f"next: onnx-sap verify {report.output}   (op vs reference)\n"
                   f"      onnx-sap evaluate {baseline}{report.output}   (accuracy and robustness)"), soft_wrap=True)


@app.command(epilog=examples("onnx-sap inspect model.onnx", "onnx-sap inspect model.sap.onnx --json",
                             "onnx-sap inspect model.onnx --axis 2 --ratio 0.5    # m, r as harden's"))
def inspect(
    model: Path = typer.Argument(..., metavar="MODEL", help="An ONNX model, plain or hardened."),
    axis: int = typer.Option(1, help="As for harden: used for m and r."),
    ratio: float = typer.Option(1.0, help="As for harden: used for r."),
    samples: int = typer.Option(0, help="As for harden: used for r."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show what MODEL is and where harden would insert SAP.

    Inputs, outputs, opsets, node and weight counts; the activation sites harden would rewrite; and
    any SAP nodes already present."""
    from .api import inspect as inspect_api

    report = inspect_api(model, HardenOptions(axis=axis, ratio=ratio, samples=samples))
    if as_json:
        print_json(report.to_dict())
        return
    out.print(_model_table(report.summary, f"Model {escape(str(model))}"))
    show(_sites_table(report, f"Activation sites in {escape(str(model))}"))
    if report.existing:
        table = LegendTable("SAP nodes already present", "form: custom (the op), portable (standard ops) or "
                                                     "ensemble (the reduction of --ensemble); attributes: the "
                                                     "custom op's")
        table.add_column("graph", overflow="fold")
        table.add_column("node", overflow="fold", ratio=1)
        table.add_column("form", no_wrap=True)
        table.add_column("attributes", ratio=1)
        for e in report.existing:
            table.add_row(escape(e["graph"]), escape(e["node"]), e["form"],
                          escape(", ".join(f"{k}={v}" for k, v in e["attributes"].items())))
        show(table)
    elif any(s.selected for s in report.sites):
        out.print(Text(f"no SAP nodes present. Harden with: onnx-sap harden {model}"), soft_wrap=True)
    else:  # harden would refuse this model: suggesting it would send the user into that error
        out.print("no SAP nodes present, and no activation site harden would rewrite"
                  + (" (the SAP column says why)" if report.sites else ""))


@app.command(epilog=examples("onnx-sap strip model.sap.onnx          # writes model.sap.stripped.onnx",
                             "onnx-sap strip model.sap.onnx -o plain.onnx"))
def strip(
    model: Path = typer.Argument(..., metavar="MODEL", help="A hardened model."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", metavar="OUT",
                                          help="Where to write (default: MODEL.stripped.onnx)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow the output to replace the input file."),
) -> None:
    """Remove SAP nodes, restoring the original bit for bit.

    Custom-op nodes, portable regions and --ensemble tiling all go."""
    from .api import strip as strip_api

    result = strip_api(model, output, overwrite=overwrite)
    out.print(Text(f"removed {result.regions_removed} SAP region(s); wrote {result.output}"), soft_wrap=True)


@app.command(epilog=examples("onnx-sap verify model.sap.onnx", "onnx-sap verify model.sap.onnx --runs 32 --json",
                             "onnx-sap verify model.sap.onnx --provider cuda"))
def verify(
    model: Path = typer.Argument(..., metavar="MODEL", help="A hardened model."),
    provider: str = typer.Option("cpu", metavar="cpu|cuda",
                                 help="cpu or cuda (refused when the session would fall back to CPU)."),
    runs: int = typer.Option(8, help="Runs (call indices 0..RUNS-1) compared with the reference."),
    seed: int = typer.Option(20260101, help="Seed from which the verified copy's SAP nodes get theirs."),
    end_to_end: int = typer.Option(2, metavar="RUNS", help="Runs also compared output for output with onnx's "
                                                           "reference runtime (If/Loop bodies included; 0: none)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Check each SAP node against the NumPy reference.

    Every SAP node runs in ONNX Runtime with fixed seeds; its inputs and outputs are compared with the
    reference's, and the whole model's outputs with onnx's reference runtime running the NumPy
    reference for SAP (same seeds, same call indices). Exit 1 on any disagreement."""
    from .modelio import load_model
    from .verify import VerifyOptions, verify as verify_api

    options = VerifyOptions(provider=provider, runs=runs, seed=seed, end_to_end=end_to_end)
    options.validate()  # before the model is read: a bad option is reported first
    load_model(model)  # clear errors for bad files before anything else
    if not os.access(model.parent if str(model.parent) else Path("."), os.W_OK):
        fail(f"verify writes a tapped copy beside {model}; its folder is not writable (copy the model elsewhere)")
    with stages("verify", quiet=as_json) as progress:
        reports = verify_api(model, options, progress=progress)
    bad = [r for r in reports if not r.ok]
    e2e = reports.end_to_end
    if as_json:
        print_json({"nodes": [dict(r.__dict__, ok=r.ok) for r in reports],
                    "end_to_end": dict(e2e.__dict__, ok=e2e.ok) if e2e else None, "ok": reports.ok})
    elif reports:
        portable_runs = max([r.runs for r in reports if r.form == "portable"], default=0)
        table = LegendTable(f"SAP nodes of {escape(str(model))} vs the reference ({provider}, {runs} runs each"
                            + (f"; portable: {portable_runs} runs)" if portable_runs else ")"),
                       "node: name, then mode and shape (portable: standard ops, checked by statistics alone); "
                       "mask diffs: keep decisions unlike the reference's outside SPEC.md's margin band; ulps: the "
                       "largest difference of kept values (SPEC.md allows 4); kept/expected: elements kept over "
                       "all runs vs the sum of keep probabilities q; z: standard scores of the kept count and of "
                       "sum(Y - X) (|z| > 6 fails)")
        table.add_column("node", overflow="fold")
        for col in ("mask\ndiffs", "ulps", "kept/\nexpected", "z kept/\nz mean"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("ok", no_wrap=True)
        for r in reports:
            custom = r.form == "custom"
            what = f"{r.mode} {'x'.join(map(str, r.shape))}" + ("" if custom else " (portable)")
            table.add_row(escape(f"{r.node}\n{what}"), str(r.mask_disagreements) if custom else "-",
                          f"{r.max_ulps:.1f}" if custom else "-", f"{r.kept}/{r.expected_kept:.0f}",
                          f"{r.z_kept:+.1f}/{r.z_mean:+.1f}", Text("yes", style="green") if r.ok else Text("NO", style="red"))
        show(table)
        for r in bad:
            for p in r.problems:
                err.print(Text(f"{r.node}: {p}"), soft_wrap=True)
        out.print(f"{len(reports) - len(bad)} of {len(reports)} SAP nodes agree with the reference"
                  + ("" if not bad else "; see the problems above"))
    if e2e is not None and not as_json:
        if e2e.skipped:
            out.print(Text(f"end to end: not compared: {e2e.skipped}"))
        else:
            out.print(f"end to end ({e2e.sap_nodes} SAP nodes, bodies included): {e2e.runs - e2e.differing_runs} "
                      f"of {e2e.runs} runs give ONNX Runtime's outputs in onnx's reference runtime "
                      f"(max |diff| {e2e.max_abs_diff:.2e})")
    if not reports.ok:
        raise typer.Exit(1)


def _check_plot_path(plot_path: Optional[Path]) -> None:
    """Refuse a --plot that could not be written before any work, not after it."""
    if plot_path is None:
        return
    if not plot_path.parent.is_dir():
        fail(f"--plot folder {plot_path.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("--plot needs matplotlib: pip install matplotlib (or onnx-sap[plot])")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated numbers, got {text!r}")
        raise


class _Progress:
    """evaluate's and sweep's progress on stderr: bars on a terminal (a bar for the whole run and
    one for the stage under way); elsewhere (logs, CI) one plain line per finished shard or
    configuration, and no Rich live display at all (it would leave a blank line behind)."""

    def __init__(self, title: str):
        self.title = title
        self.bars = None
        self.stage_task = None
        if err.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err,
                                 transient=True)
        self.started = time.monotonic()

    def __enter__(self) -> "_Progress":
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.stop()

    def begin(self, total: int, unit: str) -> None:
        self.total, self.unit, self.finished = total, unit, 0
        if self.bars is not None:
            self.main_task = self.bars.add_task(f"{self.title} ({unit})", total=total)

    def stage(self, label: str, total: int):
        if self.bars is None:
            return lambda: None
        if self.stage_task is not None:
            self.bars.remove_task(self.stage_task)
        task = self.stage_task = self.bars.add_task(label, total=total)
        return lambda: self.bars.advance(task)

    def done(self, label: str, units: int) -> None:
        self.finished += units
        if self.bars is not None:
            self.bars.advance(self.main_task, units)
        else:
            elapsed = int(time.monotonic() - self.started)
            print(f"{self.title}: {self.finished}/{self.total} {self.unit} ({elapsed // 60}:{elapsed % 60:02d}): "
                  f"{label}", file=sys.stderr, flush=True)


@app.command(epilog=examples("onnx-sap evaluate model.onnx model.sap.onnx --limit 100",
                             "onnx-sap evaluate model.sap.onnx --data test.npz --eps 0.1,0.2 --json",
                             "onnx-sap evaluate model.onnx model.sap.onnx --attacks transfer --plot a.png"))
def evaluate(
    first: Path = typer.Argument(..., metavar="ORIGINAL", help="The original model (or HARDENED alone: then "
                                                                "strip(HARDENED) stands for the original)."),
    second: Optional[Path] = typer.Argument(None, metavar="HARDENED", help="The hardened model."),
    data: str = typer.Option("digits", help="An .npz with arrays x and y, or 'digits' (the bundled example)."),
    eps: str = typer.Option("0.05,0.1,0.2,0.3", help="L-inf epsilons, comma-separated."),
    attacks: str = typer.Option("transfer,spsa,square", help="Attacks to run (the worst case is over these)."),
    passes: int = typer.Option(16, help="Stochastic runs per example when scoring (majority vote)."),
    transfer_steps: int = typer.Option(40, help="PGD steps of the transfer attack."),
    spsa_steps: int = typer.Option(40, help="SPSA steps."),
    spsa_pairs: int = typer.Option(32, help="SPSA perturbation pairs per step."),
    spsa_passes: int = typer.Option(2, help="Stochastic passes averaged per SPSA loss (EOT)."),
    spsa_delta: float = typer.Option(1.0, help="SPSA perturbation size as a fraction of eps."),
    square_iters: int = typer.Option(300, help="Square Attack iterations."),
    square_passes: int = typer.Option(4, help="Stochastic passes averaged per Square Attack candidate."),
    limit: Optional[int] = typer.Option(None, help="Use only the first LIMIT examples."),
    seed: int = typer.Option(0, help="Non-zero: the whole evaluation (attacks and SAP streams) is reproducible."),
    shard_size: int = typer.Option(32, help="Examples per shard (the unit of work; results depend on it)."),
    scheduler: Optional[str] = typer.Option(None, help="Run the shards on Dask: local, local:N (workers) or "
                                                       "tcp://HOST:PORT. Same results as in process."),
    provider: str = typer.Option("cpu", help="cpu or cuda."),
    output: Optional[str] = typer.Option(None, help="The output holding class scores (default: the float output "
                                                    "with a class axis, else a ZipMap's probabilities)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable results on stdout."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write accuracy vs epsilon to this PNG."),
) -> None:
    """Accuracy and robustness, ORIGINAL vs HARDENED.

    Clean accuracy, calibration and robust accuracy under forward-only attacks."""
    from .distributed import parse_scheduler
    from .evaluate import EvaluateOptions, evaluate as evaluate_api, plot
    from .metrics import load_data
    from .modelio import load_model

    models = [first] if second is None else [first, second]
    _check_plot_path(plot_path)
    cfg = EvaluateOptions(eps=_floats(eps, "--eps"), attacks=[a.strip() for a in attacks.split(",") if a.strip()],
                          passes=passes, transfer_steps=transfer_steps, spsa_steps=spsa_steps,
                          spsa_pairs=spsa_pairs, spsa_passes=spsa_passes, spsa_delta=spsa_delta,
                          square_iters=square_iters, square_passes=square_passes, limit=limit, seed=seed,
                          shard_size=shard_size, provider=provider, output=output)
    cfg.validate()
    if scheduler is not None:
        parse_scheduler(scheduler)
    original = load_model(models[0]) if len(models) == 2 else None
    hardened = load_model(models[-1])
    x, y = load_data(data, limit)
    with _Progress("evaluate") as progress:
        result = evaluate_api(original, hardened, x, y, cfg, progress, scheduler=scheduler)
    if plot_path is not None:
        plot(result, plot_path)
    if as_json:
        print_json(result)
        return
    table = LegendTable(f"{len(x)} examples from {escape(data)}; robust = survives every attack (majority of "
                        f"{passes} runs)",
                        "clean accuracy: on unperturbed examples, one run or the majority of runs; ECE: expected "
                        "calibration error (0 = confidence matches accuracy); eps E: ATTACK: accuracy under that "
                        "L-inf attack of size E; worst case: examples that survive every attack (the headline)")
    table.add_column("")
    for name in ("original", "hardened"):
        table.add_column(name, justify="right")
    res = result["models"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    table.add_row("clean accuracy, 1 pass", *(pct(res[n]["clean_single"]) for n in ("original", "hardened")))
    table.add_row(f"clean accuracy, {passes} passes", *(pct(res[n]["clean_multi"]) for n in ("original", "hardened")))
    table.add_row("ECE, clean", *(f"{res[n]['ece']:.3f}" for n in ("original", "hardened")))
    for e in cfg.eps:
        key = f"{e:g}"
        for attack in cfg.attacks + ["worst"]:
            label = f"eps {key}: {attack}" if attack != "worst" else f"[bold]eps {key}: worst case[/]"
            table.add_row(label, *(pct(res[n]["accuracy"][attack][key]) for n in ("original", "hardened")))
        if "transfer" in cfg.attacks:
            table.add_row(f"eps {key}: ECE under transfer", *(f"{res[n]['ece_under_attack'][key]:.3f}"
                                                             for n in ("original", "hardened")))
    show(table)
    out.print(f"queries: original {res['original']['queries']:,}, hardened {res['hardened']['queries']:,}"
              + (f"; plot written to {escape(str(plot_path))}" if plot_path else ""))


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated integers, got {text!r}")
        raise


@app.command(epilog=examples("onnx-sap sweep model.onnx --limit 100",
                             "onnx-sap sweep model.onnx --ratio 0.1,0.5,1 --mode bernoulli --json",
                             "onnx-sap sweep model.onnx --scheduler local:2 --plot sweep.png"))
def sweep(
    model: Path = typer.Argument(..., metavar="MODEL", help="The original model (not hardened)."),
    data: str = typer.Option("digits", help="An .npz with arrays x and y, or 'digits' (the bundled example)."),
    ratio: str = typer.Option("0.05,0.1,0.2,0.5,1", help="SAP ratios to try, comma-separated."),
    mode: str = typer.Option("multinomial,bernoulli", help="SAP modes to try, comma-separated."),
    ensemble: str = typer.Option("1", help="Ensemble sizes to try, comma-separated."),
    eps: str = typer.Option("0.1", help="L-inf epsilons, comma-separated."),
    attacks: str = typer.Option("transfer,spsa", help="Attacks (the worst case is over these)."),
    passes: int = typer.Option(16, help="Stochastic runs per example when scoring (majority vote)."),
    transfer_steps: int = typer.Option(40, help="PGD steps of the transfer attack."),
    spsa_steps: int = typer.Option(40, help="SPSA steps."),
    limit: Optional[int] = typer.Option(None, help="Use only the first LIMIT examples."),
    seed: int = typer.Option(1, help="Attacks' and SAP's streams (0: SAP draws OS entropy, rows get noisier)."),
    shard_size: int = typer.Option(32, help="Examples per shard, as for evaluate."),
    scheduler: Optional[str] = typer.Option(None, help="Run one configuration per Dask task: local, local:N or "
                                                       "tcp://HOST:PORT."),
    provider: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable results on stdout."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write clean and worst-case accuracy vs ratio "
                                                                  "to this PNG."),
) -> None:
    """Harden MODEL with every combination of --ratio, --mode and --ensemble and evaluate each."""
    from .api import sweep as sweep_api
    from .distributed import parse_scheduler
    from .evaluate import EvaluateOptions
    from .metrics import load_data
    from .search import SweepOptions, plot_sweep

    _check_plot_path(plot_path)
    opts = SweepOptions(ratios=_floats(ratio, "--ratio"), modes=[m.strip() for m in mode.split(",") if m.strip()],
                        ensembles=_ints(ensemble, "--ensemble"))
    opts.validate()
    eval_opts = EvaluateOptions(eps=_floats(eps, "--eps"), attacks=[a.strip() for a in attacks.split(",") if a.strip()],
                                passes=passes, transfer_steps=transfer_steps, spsa_steps=spsa_steps, limit=limit,
                                seed=seed, shard_size=shard_size, provider=provider)
    eval_opts.validate()
    if scheduler is not None:
        parse_scheduler(scheduler)
    x, y = load_data(data, limit)
    with _Progress("sweep") as progress:
        result = sweep_api(model, x, y, opts, eval_opts, progress=progress, scheduler=scheduler)
    if plot_path is not None:
        plot_sweep(result, plot_path)
    if as_json:
        print_json(result.to_dict())
        return
    eps_keys = list(result.rows[0].worst)
    table = LegendTable(f"sweep of {escape(str(model))}: {len(x)} examples from {escape(data)}, attacks "
                        f"{escape(attacks)}; best worst case first (majority of {passes} runs)",
                        "configuration: SAP mode, ratio and ensemble size (the original first); clean: accuracy on "
                        "unperturbed examples, one run or the majority of runs; ECE: expected calibration error; "
                        "worst eps E: accuracy over examples that survive every attack of size E; latency x: "
                        "hardened / original median latency, timed side by side")
    for col in ["configuration", "clean 1 pass", f"clean {passes} passes", "ECE",
                *(f"worst eps {e}" for e in eps_keys), "latency x"]:
        table.add_column(col, justify="left" if col == "configuration" else "right")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for row in result.rows:
        table.add_row(row.label, pct(row.clean_single), pct(row.clean_multi), f"{row.ece:.3f}",
                      *(pct(row.worst[e]) for e in eps_keys), f"{row.latency_ratio:.2f}")
    show(table)
    orig = result.rows[0]
    better = [r.label for r in result.rows[1:] if all(r.worst[e] > orig.worst[e] for e in eps_keys)]
    out.print(("configurations whose worst case beats the original's at every eps: " + ", ".join(better)) if better
              else "no configuration beats the original's worst case at every eps")
    if plot_path is not None:
        out.print(f"plot written to {escape(str(plot_path))}")


@app.command(epilog=examples("onnx-sap tune model.onnx --data val.npz --budget 1.0",
                             "onnx-sap tune model.onnx -o model.tuned.onnx --evaluations 12 --json"))
def tune(
    model: Path = typer.Argument(..., metavar="MODEL", help="The original model (not hardened)."),
    data: str = typer.Option("digits", help="Held-out .npz (x, y) or 'digits'; used for clean accuracy only."),
    budget: float = typer.Option(1.0, help="Clean majority accuracy may drop this many points below the original."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: MODEL.tuned.onnx)."),
    mode: str = typer.Option("multinomial", help="SAP mode: multinomial or bernoulli."),
    min_ratio: float = typer.Option(0.01, help="The smallest ratio (most pruning) tried."),
    max_ratio: float = typer.Option(16.0, help="The largest ratio (least pruning), where every site starts."),
    evaluations: int = typer.Option(24, help="Clean-accuracy evaluations in all (the search's budget)."),
    passes: int = typer.Option(16, help="Stochastic runs per example (majority vote)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first LIMIT examples."),
    seed: int = typer.Option(1, help="SAP streams of the search (the written model draws OS entropy)."),
    shard_size: int = typer.Option(32, help="Examples per task of each evaluation."),
    scheduler: Optional[str] = typer.Option(None, help="Run each evaluation's shards on Dask: local, local:N or "
                                                       "tcp://HOST:PORT."),
    provider: str = typer.Option("cpu", help="cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow the output to replace the input file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable results on stdout."),
) -> None:
    """Choose a SAP ratio per site of MODEL within a clean-accuracy budget and write the hardened model."""
    from .api import tune as tune_api
    from .distributed import parse_scheduler
    from .metrics import load_data
    from .search import TuneOptions

    opts = TuneOptions(budget=budget, mode=mode, min_ratio=min_ratio, max_ratio=max_ratio, evaluations=evaluations,
                       passes=passes, seed=seed, shard_size=shard_size, provider=provider)
    opts.validate()
    if scheduler is not None:
        parse_scheduler(scheduler)
    x, y = load_data(data, limit)
    with _Progress("tune") as progress:
        result = tune_api(model, x, y, output, opts, overwrite=overwrite, progress=progress, scheduler=scheduler)
    if as_json:
        print_json(result.to_dict())
        return
    table = LegendTable(f"ratio per SAP site (most activations first); target: clean majority accuracy >= "
                        f"{100 * result.target:.1f}%",
                        "activations / example: the site's activation count m; ratio: the chosen SAP ratio "
                        "(smaller = more pruning); samples r: floor(ratio x m) draws per example")
    for col in ("SAP node", "activations / example", "ratio", "samples r"):
        table.add_column(col, justify="left" if col == "SAP node" else "right")
    for name, ratio_ in result.ratios.items():
        m, r = result.activations[name], result.samples[name]
        table.add_row(escape(name), f"{m:,}" if m else "dynamic", f"{ratio_:g}", f"{r:,}" if r else "run time")
    show(table)
    final = Table(title=f"final evaluation on {len(x)} examples from {escape(data)} (the search took {len(result.steps)} "
                        "evaluations)", title_justify="left")
    for col in ("", "original", "tuned"):
        final.add_column(col, justify="left" if not col else "right")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    final.add_row("clean accuracy, 1 pass", pct(result.original["clean_single"]), pct(result.tuned["clean_single"]))
    final.add_row(f"clean accuracy, {passes} passes", pct(result.original["clean_multi"]),
                  pct(result.tuned["clean_multi"]))
    final.add_row("ECE, clean", f"{result.original['ece']:.3f}", f"{result.tuned['ece']:.3f}")
    out.print(final)
    if not result.steps[0].accepted:
        err.print(f"[yellow]warning:[/] even ratio {max_ratio:g} at every site misses the budget; every site kept "
                  "it (raise --max-ratio or --budget)", highlight=False)
    out.print(f"wrote [bold]{escape(str(result.output))}[/] (ratios in metadata_props onnx_sap.site_ratios)\n"
              f"next: onnx-sap evaluate {escape(str(model))} {escape(str(result.output))} --data TEST   (robustness on data not used here)")


@app.command(epilog=examples("onnx-sap bench model.onnx                        # hardens in memory",
                             "onnx-sap bench model.onnx --hardened model.sap.onnx --batch 1 --batch 32",
                             "onnx-sap bench model.onnx --threads 2 --rounds 50 --json"))
def bench(
    model: Path = typer.Argument(..., metavar="MODEL", help="The original model."),
    hardened: Optional[Path] = typer.Option(None, metavar="HARDENED",
                                            help="Its hardened version (default: harden MODEL in memory)."),
    provider: str = typer.Option("cpu", metavar="cpu|cuda", help="cpu or cuda."),
    batch: List[int] = typer.Option([1], metavar="N", help="Batch sizes (repeat the option for several)."),
    threads: Optional[int] = typer.Option(None, metavar="N", help="ONNX Runtime intra-op threads (default: all cores)."),
    rounds: int = typer.Option(30, help="Timed rounds per batch size, after warm-up."),
    mode: str = typer.Option("multinomial", metavar="multinomial|bernoulli", help="SAP mode when hardening in memory."),
    output: Optional[str] = typer.Option(None, metavar="NAME", help="The output each run computes (default: the "
                                                                    "class scores, as evaluate picks them)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Latency and throughput, original vs hardened.

    p50/p90 latency and throughput from interleaved rounds in one run."""
    from .bench import BenchOptions, bench as bench_api
    from .modelio import load_model

    options = BenchOptions(provider=provider, batches=tuple(batch), threads=threads, rounds=rounds, output=output,
                           harden=HardenOptions(mode=mode))
    options.validate()
    with stages("bench", quiet=as_json) as progress:
        results = bench_api(load_model(model), load_model(hardened) if hardened else None, options,
                            progress=progress)
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    table = LegendTable(f"{escape(str(model))}: original vs hardened ({provider}, {rounds} interleaved rounds)",
                   "p50, p90: median and 90th percentile latency of one run, in ms; hardened / original: the "
                   "median (p90) of each round's ratio, both models timed in the same round; examples/s: "
                   "throughput at p50, original -> hardened")
    table.add_column("batch", justify="right")
    for col in ("original p50", "p90", "hardened p50", "p90", "hardened / original", "examples/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r.batch), f"{r.original.p50_ms:.3f}", f"{r.original.p90_ms:.3f}",
                      f"{r.hardened.p50_ms:.3f}", f"{r.hardened.p90_ms:.3f}",
                      Text(f"{r.ratio_p50:.2f}", style="bold") + f" ({r.ratio_p90:.2f})",
                      f"{r.original.throughput:,.0f} -> {r.hardened.throughput:,.0f}")
    show(table)


@app.command(epilog=examples("onnx-sap version", "onnx-sap --version"))
def version() -> None:
    """Print the version, the op library and whether it has CUDA kernels."""
    from .runtime import get_library_path, has_cuda_kernels

    out.print(Text(f"onnx-sap {__version__}; op library {get_library_path()}; CUDA kernels: {has_cuda_kernels()}"),
              soft_wrap=True)


def _report(message: str, code: int) -> None:
    """Print a user error (one line; with --json, {"error": ...} on stdout) and exit with code."""
    if "--json" in sys.argv[1:]:
        print(json.dumps({"error": message}))
    else:
        err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: user errors become one line and exit code 2, never a traceback."""
    # onnx warns about what it then fails on (an unknown external-data key before the missing file):
    # the one-line error says it.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"onnx(\.|$)")
    try:
        rc = app(standalone_mode=False)  # click returns Exit codes here rather than raising them
        sys.exit(rc if isinstance(rc, int) else 0)
    except CliError as e:
        _report(str(e), e.code)
    except OptionError as e:  # the API names its parameter; the user typed a flag
        _report(e.as_flag(FLAGS), 2)
    except OnnxSapError as e:
        _report(str(e), 2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)
    except Exception as e:  # usage errors (click's, vendored by Typer) and anything unforeseen: one line
        if hasattr(e, "format_message"):
            _report(f"{e.format_message()} (see --help)", 2)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        _report(f"internal error: {type(e).__name__}: {e} (please report this)", 1)
