"""`onnx-sap`: each command is a thin layer over the Python API (onnx_sap.api and friends).

Errors the user can fix print one line on stderr and exit 2; nothing is written then.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import OnnxSapError, OptionError
from .rewrite import HardenOptions, Plan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Harden ONNX classifiers with Stochastic Activation Pruning (SAP), no retraining.")
# Tables stay readable when output is piped (Rich would assume 80 columns).
out = Console(width=None if sys.stdout.isatty() else 150)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def fail(message: str, code: int = 2) -> None:
    """Print one line and exit: the CLI's only way of reporting a user error."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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


def _sites_table(plan: Plan, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("#", "graph", "kind", "form", "node(s)", "shape", "m", "r", "SAP"):
        table.add_column(col, justify="right" if col in ("#", "m", "r") else "left")
    for i, s in enumerate(plan.sites):
        nodes = s.nodes[-1] if len(s.nodes) == 1 else f"{s.nodes[0]} .. {s.nodes[-1]} ({len(s.nodes)})"
        table.add_row(str(i), escape(s.graph), s.kind, s.form, escape(nodes),
                      escape("x".join(map(str, s.shape))) if s.shape else "?",
                      str(s.m) if s.m else "?", str(s.r) if s.r else "run time",
                      "yes" if s.selected else f"[dim]no: {escape(s.reason)}[/]")
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


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)


@app.command()
def harden(
    model: Path = typer.Argument(..., help="The ONNX model to harden (never modified)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: MODEL.sap.onnx)."),
    ratio: float = typer.Option(1.0, help="Samples per example as a fraction of its activations (r = ratio*m)."),
    samples: int = typer.Option(0, help="Fixed samples per example (overrides --ratio when > 0)."),
    mode: str = typer.Option("multinomial", help="multinomial (the paper's SAP) or bernoulli."),
    axis: int = typer.Option(1, help="Dims before AXIS index examples; the rest form one example."),
    seed: int = typer.Option(0, help="0 (deployment): the custom op draws fresh OS entropy per run; --portable "
                                     "uses the runtime's stream, seeded once per process. Non-zero: reproducible, "
                                     "predictable."),
    include: Optional[List[str]] = typer.Option(None, help="Only these kinds or node-name globs (repeat or comma)."),
    exclude: Optional[List[str]] = typer.Option(None, help="Skip these kinds or node-name globs."),
    portable: bool = typer.Option(False, help="Emit SAP as standard ONNX ops (any runtime, no op library). Runtimes "
                                              "seed its random ops once per process: each new session repeats the "
                                              "same stream (README)."),
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
        doc["warnings"] = opts.warnings()
        print_json(doc)
        _warn(opts.warnings())
        return
    out.print(_sites_table(report.plan, f"Activation sites in {escape(str(model))}"))
    out.print(_kind_summary(report.plan))
    _warn(opts.warnings())
    if dry_run:
        out.print("dry run: nothing written. Drop --dry-run to write the hardened model.")
        return
    form = "portable standard ops" if portable else "custom op onnx_sap::StochasticActivationPruning"
    size = report.output.stat().st_size
    out.print(f"wrote [bold]{escape(str(report.output))}[/] ({size / 1e6:.2f} MB): {len(report.plan.selected)} SAP sites, "
              f"mode {mode}, {form}" + (f", ensemble of {ensemble}" if ensemble > 1 else ""))
    if report.check is not None:
        c = report.check
        out.print("check: ran original and hardened in ONNX Runtime; outputs match in name, dtype and shape"
                  + (f"; with SAP made deterministic, max |diff| = {c.max_abs_diff:.2e}" if c.equivalence_checked
                     else f"; {c.note}"))
    out.print(f"next: onnx-sap verify {escape(str(report.output))}   (op vs reference)   |   "
              f"onnx-sap evaluate {escape(str(model))} {escape(str(report.output))} --data ...")


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
        print_json(plan.to_dict())
        return
    out.print(_sites_table(plan, f"Activation sites in {escape(str(model))}"))
    if plan.existing:
        table = Table(title="SAP nodes already present", title_justify="left")
        for col in ("graph", "node", "form", "attributes"):
            table.add_column(col)
        for e in plan.existing:
            table.add_row(escape(e["graph"]), escape(e["node"]), e["form"],
                          escape(", ".join(f"{k}={v}" for k, v in e["attributes"].items())))
        out.print(table)
    else:
        out.print("no SAP nodes present. Harden with: onnx-sap harden " + escape(str(model)))


@app.command()
def strip(
    model: Path = typer.Argument(..., help="A hardened model."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: MODEL.stripped.onnx)."),
    overwrite: bool = typer.Option(False, help="Allow the output to replace the input file."),
) -> None:
    """Remove SAP nodes (custom, portable, ensemble), restoring the original computation bit for bit."""
    from .api import strip as strip_api

    _, removed, path = strip_api(model, output, overwrite=overwrite)
    out.print(f"removed {removed} SAP region(s); wrote [bold]{escape(str(path))}[/]")


@app.command()
def verify(
    model: Path = typer.Argument(..., help="A hardened model."),
    provider: str = typer.Option("cpu", help="cpu or cuda (refused when the session would fall back to CPU)."),
    runs: int = typer.Option(8, help="Runs (call indices 0..RUNS-1) compared with the reference."),
    seed: int = typer.Option(20260101, help="Seed from which the verified copy's SAP nodes get theirs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Check every SAP node, as it runs in ONNX Runtime, against the NumPy reference (exit 1 on any disagreement)."""
    from .modelio import load_model
    from .verify import verify as verify_api

    if runs < 1:
        fail(f"--runs must be >= 1, got {runs}")
    load_model(model)  # clear errors for bad files before anything else
    if not os.access(model.parent if str(model.parent) else Path("."), os.W_OK):
        fail(f"verify writes a tapped copy beside {model}; its folder is not writable (copy the model elsewhere)")
    reports = verify_api(model, provider=provider, runs=runs, seed=seed)
    bad = [r for r in reports if not r.ok]
    if as_json:
        print_json([dict(r.__dict__, ok=r.ok) for r in reports])
    else:
        table = Table(title=f"SAP nodes of {escape(str(model))} vs the reference ({provider})", title_justify="left")
        for col in ("node", "form", "mode", "shape", "runs", "mask diffs", "max ulps", "kept / expected", "z", "ok"):
            table.add_column(col, justify="left" if col in ("node", "form", "mode", "shape", "ok") else "right")
        for r in reports:
            table.add_row(escape(r.node), r.form, r.mode, "x".join(map(str, r.shape)), str(r.runs),
                          str(r.mask_disagreements) if r.form == "custom" else "-",
                          f"{r.max_ulps:.1f}" if r.form == "custom" else "-",
                          f"{r.kept} / {r.expected_kept:.0f}", f"{r.z_kept:+.1f} / {r.z_mean:+.1f}",
                          "[green]yes[/]" if r.ok else "[red]NO[/]")
        out.print(table)
        for r in bad:
            for p in r.problems:
                err.print(f"[red]{escape(r.node)}:[/] {escape(p)}", highlight=False)
        out.print(f"{len(reports) - len(bad)} of {len(reports)} SAP nodes agree with the reference"
                  + ("" if not bad else "; see the problems above"))
    if bad:
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


@app.command()
def evaluate(
    models: List[Path] = typer.Argument(..., help="ORIGINAL HARDENED, or HARDENED alone (then strip(HARDENED) "
                                                  "stands for the original)."),
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
    """Clean accuracy, calibration and robust accuracy of ORIGINAL vs HARDENED under forward-only attacks."""
    from .distributed import parse_scheduler
    from .evaluate import EvaluateOptions, evaluate as evaluate_api, plot
    from .metrics import load_data
    from .modelio import load_model

    if len(models) not in (1, 2):
        fail("give ORIGINAL HARDENED, or HARDENED alone")
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
    table = Table(title=f"{len(x)} examples from {escape(data)}; robust = survives every attack (majority of {passes} runs)",
                  title_justify="left")
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
    out.print(table)
    out.print(f"queries: original {res['original']['queries']:,}, hardened {res['hardened']['queries']:,}"
              + (f"; plot written to {escape(str(plot_path))}" if plot_path else ""))


# API parameters whose CLI flag is not --parameter-name.
_FLAGS = {"ratios": "--ratio", "modes": "--mode", "ensembles": "--ensemble"}


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} takes comma-separated integers, got {text!r}")
        raise


@app.command()
def sweep(
    model: Path = typer.Argument(..., help="The original model (not hardened)."),
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
    table = Table(title=f"sweep of {escape(str(model))}: {len(x)} examples from {escape(data)}, attacks {escape(attacks)}; best worst case "
                        f"first (majority of {passes} runs)", title_justify="left")
    for col in ["configuration", "clean 1 pass", f"clean {passes} passes", "ECE",
                *(f"worst eps {e}" for e in eps_keys), "latency x"]:
        table.add_column(col, justify="left" if col == "configuration" else "right")
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    for row in result.rows:
        table.add_row(row.label, pct(row.clean_single), pct(row.clean_multi), f"{row.ece:.3f}",
                      *(pct(row.worst[e]) for e in eps_keys), f"{row.latency_ratio:.2f}")
    out.print(table)
    orig = result.rows[0]
    better = [r.label for r in result.rows[1:] if all(r.worst[e] > orig.worst[e] for e in eps_keys)]
    out.print(("configurations whose worst case beats the original's at every eps: " + ", ".join(better)) if better
              else "no configuration beats the original's worst case at every eps")
    if plot_path is not None:
        out.print(f"plot written to {escape(str(plot_path))}")


@app.command()
def tune(
    model: Path = typer.Argument(..., help="The original model (not hardened)."),
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
    provider: str = typer.Option("cpu", help="cpu or cuda."),
    overwrite: bool = typer.Option(False, help="Allow the output to replace the input file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable results on stdout."),
) -> None:
    """Choose a SAP ratio per site of MODEL within a clean-accuracy budget and write the hardened model."""
    from .api import tune as tune_api
    from .metrics import load_data
    from .search import TuneOptions

    opts = TuneOptions(budget=budget, mode=mode, min_ratio=min_ratio, max_ratio=max_ratio, evaluations=evaluations,
                       passes=passes, seed=seed, provider=provider)
    opts.validate()
    x, y = load_data(data, limit)
    with _Progress("tune") as progress:
        result = tune_api(model, x, y, output, opts, overwrite=overwrite, progress=progress)
    if as_json:
        print_json(result.to_dict())
        return
    table = Table(title=f"ratio per SAP site (most activations first); target: clean majority accuracy >= "
                        f"{100 * result.target:.1f}%", title_justify="left")
    for col in ("SAP node", "activations / example", "ratio", "samples r"):
        table.add_column(col, justify="left" if col == "SAP node" else "right")
    for name, ratio_ in result.ratios.items():
        m = result.activations[name]
        table.add_row(escape(name), f"{m:,}" if m else "dynamic", f"{ratio_:g}",
                      f"{max(1, round(ratio_ * m)):,}" if m else "run time")
    out.print(table)
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


@app.command()
def bench(
    model: Path = typer.Argument(..., help="The original model."),
    hardened: Optional[Path] = typer.Option(None, help="Its hardened version (default: harden MODEL in memory)."),
    provider: str = typer.Option("cpu", help="cpu or cuda."),
    batch: List[int] = typer.Option([1], help="Batch sizes (repeat the option for several)."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: all cores)."),
    rounds: int = typer.Option(30, help="Timed rounds per batch size, after warm-up."),
    mode: str = typer.Option("multinomial", help="SAP mode when hardening in memory."),
    output: Optional[str] = typer.Option(None, help="The output each run computes (default: the class scores, "
                                                    "as evaluate picks them)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Latency p50/p90 and throughput, original vs hardened, from interleaved rounds in one run."""
    from .bench import bench as bench_api
    from .modelio import load_model

    if rounds < 1 or any(b < 1 for b in batch):
        fail("--rounds and --batch must be >= 1")
    opts = HardenOptions(mode=mode)
    opts.validate()
    results = bench_api(load_model(model), load_model(hardened) if hardened else None, provider=provider,
                        batches=tuple(batch), threads=threads, rounds=rounds, options=opts, output=output)
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    table = Table(title=f"{escape(str(model))}: original vs hardened ({provider}, {rounds} interleaved rounds)", title_justify="left")
    for col in ("batch", "original p50 ms", "p90", "hardened p50 ms", "p90", "throughput orig/s", "hardened/s",
                "hardened / original"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r.batch), f"{r.original.p50_ms:.3f}", f"{r.original.p90_ms:.3f}", f"{r.hardened.p50_ms:.3f}",
                      f"{r.hardened.p90_ms:.3f}", f"{r.original.throughput:,.0f}", f"{r.hardened.throughput:,.0f}",
                      f"[bold]{r.ratio_p50:.3f}[/] (p90 {r.ratio_p90:.3f})")
    out.print(table)


@app.command()
def version() -> None:
    """Print the version, the op library and whether it has CUDA kernels."""
    from .runtime import get_library_path, has_cuda_kernels

    out.print(f"onnx-sap {__version__}; op library {escape(get_library_path())}; CUDA kernels: {has_cuda_kernels()}")


def main() -> None:
    """Entry point: user errors become one line and exit code 2, never a traceback."""
    try:
        rc = app(standalone_mode=False)  # click returns Exit codes here rather than raising them
        sys.exit(rc if isinstance(rc, int) else 0)
    except OnnxSapError as e:  # an API parameter's error names the CLI flag here
        message = e.as_flag(_FLAGS) if isinstance(e, OptionError) else str(e)
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)
    except Exception as e:  # usage errors (click's, vendored by Typer) and anything unforeseen: one line
        if hasattr(e, "format_message"):
            err.print(f"[bold red]error:[/] {escape(e.format_message())} (see --help)", highlight=False, soft_wrap=True)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))} (please report this)", highlight=False,
                  soft_wrap=True)
        sys.exit(1)
