"""File-level API: what the CLI commands do, callable from Python with the same options."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import onnx

from .check import CheckReport, check_hardened
from .errors import OnnxSapError
from .rewrite import HardenOptions, HardenResult, Plan, harden_model, plan_model, strip_model
from .sap_nodes import with_deterministic_sap
from .modelio import LeanModel, check_input_model, check_output_path, read_lean_model, read_model, save_model
from .summary import ModelSummary, summarize

ModelLike = onnx.ModelProto | str | os.PathLike


def _load(model: ModelLike) -> tuple[LeanModel, Path | None]:
    """The model (lean when read from a file: its large tensors held beside it) and its path or None."""
    if isinstance(model, onnx.ModelProto):
        check_input_model(model)
        return LeanModel(model, {}, False), None
    return read_lean_model(model), Path(model)


def _load_whole(model: ModelLike) -> tuple[onnx.ModelProto, Path | None, bool]:
    """(model with all its tensors, its path or None, whether its file kept tensors as external data):
    for sweep and tune, whose sessions are opened from the ModelProto alone."""
    if isinstance(model, onnx.ModelProto):
        check_input_model(model)
        return model, None, False
    loaded, external = read_model(model)
    return loaded, Path(model), external


def default_output(input_path: Path, suffix: str) -> Path:
    """model.onnx -> model.<suffix>.onnx, beside the input."""
    stem = input_path.name[:-5] if input_path.name.endswith(".onnx") else input_path.name
    return input_path.with_name(f"{stem}.{suffix}.onnx")


@dataclass
class HardenReport(HardenResult):
    """harden's result: the model, the plan, where it was written and what the check found."""

    output: Path | None = None
    check: CheckReport | None = None
    before: ModelSummary | None = None  # the input model
    after: ModelSummary | None = None  # the hardened model (None for a dry run)


def harden(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    options: HardenOptions | None = None,
    *,
    check: bool = True,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda message: None,
    **option_values,
) -> HardenReport:
    """Harden a model (ModelProto or path) with SAP after its activations.

    Options come as a HardenOptions or as keywords (ratio=, mode=, ...). With a path and no output,
    the result goes beside the input as model.sap.onnx; with a ModelProto it is written only when
    output is given. dry_run plans and writes nothing. The check (unless check=False) runs the
    original and the hardened model in ONNX Runtime before anything is written. progress is told
    what each stage did as it finishes.
    """
    options = options or HardenOptions(**option_values)
    options.validate()
    read, in_path = _load(model)
    original, weights = read.model, read.weights
    out_path = Path(output) if output is not None else (default_output(in_path, "sap") if in_path else None)
    if out_path is not None and not dry_run:
        check_output_path(out_path, in_path, overwrite)
    before = summarize(original)
    if dry_run:
        return HardenReport(original, plan_model(original, options), before=before)
    result = harden_model(original, options)
    report = HardenReport(result.model, result.plan, before=before, after=summarize(result.model))
    portable_multinomial = options.portable and options.mode == "multinomial"

    def run_check(staged: Path | None) -> None:
        if check:
            orig = with_deterministic_sap(original) if result.plan.existing else original  # re-hardening:
            # compare against the old SAP made deterministic
            # A lean model is checked in memory with the weights; a ModelProto's written file, which
            # onnx.save_model may have moved to external data.
            hardened = result.model if weights or staged is None else str(staged)
            report.check = check_hardened(orig, hardened, options, portable_multinomial, weights)
        # The first line once the input has passed every check (the check judges input too): bad
        # input stays a one-line error.
        progress(f"read {in_path or 'the model'} ({before.nodes} nodes), inserted SAP at {len(result.plan.selected)} "
                 f"of {len(result.plan.sites)} activation sites" + ("; checked in ONNX Runtime" if check else ""))

    if out_path is None:
        run_check(None)
        return report
    report.output = save_model(result.model, out_path, external_data=read.external, before_commit=run_check,
                               weights=weights)
    progress(f"wrote {report.output}")
    return report


class StripResult(NamedTuple):
    """strip's result (also unpacks as a tuple)."""

    model: onnx.ModelProto
    regions_removed: int  # SAP regions taken out: custom nodes, portable subgraphs, ensemble ends
    output: Path | None  # where it was written, or None


def strip(model: ModelLike, output: str | os.PathLike | None = None, *, overwrite: bool = False) -> StripResult:
    """Remove every SAP node, restoring the original computation bit for bit."""
    read, in_path = _load(model)
    out_path = Path(output) if output is not None else (default_output(in_path, "stripped") if in_path else None)
    if out_path is not None:
        check_output_path(out_path, in_path, overwrite)
    stripped, removed = strip_model(read.model)
    if out_path is not None:
        save_model(stripped, out_path, external_data=read.external, weights=read.weights)
    return StripResult(stripped, removed, out_path)


@dataclass
class InspectReport(Plan):
    """inspect's result: the plan harden would follow, and the model's summary."""

    summary: ModelSummary | None = None

    def to_dict(self) -> dict:
        return {"model": self.summary.to_dict() if self.summary else None, **super().to_dict()}


def inspect(model: ModelLike, options: HardenOptions | None = None) -> InspectReport:
    """The model's inputs, outputs, opsets, nodes and weights; the activation sites harden would
    rewrite; and any SAP nodes already present."""
    original = _load(model)[0].model
    plan = plan_model(original, options or HardenOptions())
    return InspectReport(plan.sites, plan.existing, plan.options, summarize(original))


def sweep(model: ModelLike, x, y, options=None, evaluate_options=None, *, progress=None, scheduler=None,
          **option_values):
    """Harden model (ModelProto or path) with every configuration of a SweepOptions (or keywords
    ratios=, modes=, ensembles=) and evaluate each on (x, y); returns a SweepResult, the original's
    row first, then the configurations from the best worst-case accuracy down. scheduler as for
    onnx_sap.evaluate.evaluate (None: in this process). Bad options are refused before any work."""
    from .distributed import parse_scheduler
    from .search import SweepOptions, sweep as sweep_models

    options = options or SweepOptions(**option_values)
    options.validate()
    if scheduler is not None:
        parse_scheduler(scheduler)
    original, _, _ = _load_whole(model)
    return sweep_models(original, x, y, options, evaluate_options, progress, scheduler=scheduler)


def tune(model: ModelLike, x, y, output: str | os.PathLike | None = None, options=None, *, overwrite: bool = False,
         progress=None, scheduler=None, **option_values):
    """Choose a ratio per SAP site of model so that clean majority accuracy on (x, y), held out from
    any attack, stays within budget points of the original's; returns a TuneResult.

    Options come as a TuneOptions or as keywords (budget=, mode=, ...). With a path and no output the
    result goes beside the input as model.tuned.onnx; with a ModelProto it is written only when
    output is given, after the same ONNX Runtime check as harden's. scheduler as for
    onnx_sap.evaluate.evaluate (None: in this process)."""
    from .distributed import parse_scheduler
    from .search import TuneOptions, tune as tune_model

    options = options or TuneOptions(**option_values)
    options.validate()
    if scheduler is not None:
        parse_scheduler(scheduler)
    original, in_path, external = _load_whole(model)
    out_path = Path(output) if output is not None else (default_output(in_path, "tuned") if in_path else None)
    if out_path is not None:
        check_output_path(out_path, in_path, overwrite)
    result = tune_model(original, x, y, options, progress, scheduler=scheduler)
    if out_path is not None:
        check = lambda staged: check_hardened(original, str(staged), HardenOptions(mode=options.mode))  # noqa: E731
        result.output = save_model(result.model, out_path, external_data=external, before_commit=check)
    return result


__all__ = ["HardenReport", "InspectReport", "ModelSummary", "StripResult", "default_output", "harden", "inspect", "strip", "sweep", "tune", "OnnxSapError"]
