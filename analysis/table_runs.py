"""The sample runs of the table notebooks (Table 1, the sampler table), made without running the notebooks.

Paper-scale sampling does not fit one GPU sitting, and papermill need not travel to the GPU machine. This
module lists the runs a notebook makes at a reproduce preset, from the notebook's own parameter cell and the
same functions it calls (`table1.row_presets`, `experiments.paper_samplers`), and makes them with the
notebook's `experiments.sample_run`, so each run has the identity the notebook asks for and the notebook later
reuses it, or its summary. Each run made is summarized at once beside the others (`modiff summarize`'s layout),
a run already there or already summarized is skipped, and a deadline stops the work before a run that would
not finish: the next sitting, given the summaries, goes on where this one stopped.

    python -m analysis.table_runs --model fmnist-ldm --notebooks table1_bitwidth,samplers \\
        --runs data/runs --summaries data/summaries --set precision=tf32 --set calibrate=false \\
        --deadline 540 --log benchmarks/results/runs.jsonl
"""
from __future__ import annotations

import ast
import fnmatch
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import click
from torch import nn

import modiff as md
from analysis import experiments, table1
from modiff.pipelines.generate import SampleConfig
from modiff.pipelines.reproduce import REPRODUCE_PRESETS, notebook_dir, parse_override, report_name
from modiff.pipelines.run_folder import execution_identity
from modiff.pipelines.summary import SummarySettings, full_precision_reference, is_summary_folder, summarize_run
from modiff.quant.ptq.reuse import Calibration
from modiff.utils.device import resolve_device

TABLE_NOTEBOOKS = ("table1_bitwidth", "samplers")


@dataclass(frozen=True)
class PlannedRun:
    """One run a table notebook makes: its preset and sampling, under ``folder`` (the runs' spacing folder)."""

    notebook: str
    preset: str
    config: SampleConfig
    folder: Path


def _check_notebook(notebook: str) -> None:
    if notebook not in TABLE_NOTEBOOKS:
        raise ValueError(f"no runs to plan for notebook {notebook!r}; the table notebooks are "
                         f"{', '.join(TABLE_NOTEBOOKS)}")


def notebook_parameters(notebook: str, preset: str = "paper", overrides: Optional[Mapping[str, Any]] = None
                        ) -> dict[str, Any]:
    """The parameters ``modiff reproduce --preset PRESET --set ...`` runs ``notebook`` with: its parameter cell's
    values, replaced by the preset's sizes (and ``overrides``) for the names the cell declares."""
    _check_notebook(notebook)
    cells = json.loads((notebook_dir() / f"{notebook}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    declared = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
                if isinstance(node, ast.Assign)}
    spec = replace(REPRODUCE_PRESETS[preset], **dict(overrides or {}))
    return {**declared, **{k: v for k, v in asdict(spec).items() if k in declared}}


def planned_runs(model: nn.Module, notebook: str, parameters: Mapping[str, Any], runs_dir: str | Path
                 ) -> list[PlannedRun]:
    """The runs ``notebook`` makes with ``parameters`` under ``runs_dir`` (the report's runs folder), the
    full-precision run of each sampling first (the others' distances are measured against it)."""
    _check_notebook(notebook)
    p = parameters
    if notebook == "table1_bitwidth":
        config = table1.table_config(model, p["steps"], p["spacing"], p["precision"])
        rows, _ = table1.row_presets(model, p["presets"], p["published_presets"], p["qdiff_presets"], p["adaround"],
                                     p["calibrate"])
        sampling = [(config, list(dict.fromkeys([*table1.ANCHORS, *rows])))]
    else:
        sampling = [(experiments.sample_config(model, steps, sampler, p["precision"]), ["fp", *p["presets"]])
                    for sampler, steps in experiments.paper_samplers(p["steps"])]
    return [PlannedRun(notebook, preset, config, experiments.spacing_runs_dir(model, runs_dir, config))
            for config, presets in sampling for preset in dict.fromkeys(["fp", *presets])]


@dataclass(frozen=True)
class Sitting:
    """How `make_runs` samples: the seeds, batch and device of the notebook, where summaries go (None: none
    made), a deadline in seconds from the start (None: none), the JSONL log (one line per run), and whether runs
    may be sampled beside summaries of runs from another device (``mixed_devices``: a deliberate comparison of
    GPUs; else refused, as a table pairs the runs of one GPU kind)."""

    seeds: Sequence[int]
    batch_size: int = 64
    device: str = "auto"
    summaries: Optional[Path] = None
    summary_settings: SummarySettings = SummarySettings()
    deadline: Optional[float] = None
    log: Optional[Path] = None
    calibration: Optional[Calibration] = None
    mixed_devices: bool = False


def _run_dir(model: nn.Module, run: PlannedRun, device: str) -> Path:
    return experiments.run_location(model, run.preset, run.config.resolved(resolve_device(device)), run.folder)


def _finished(model: nn.Module, run: PlannedRun, folder: Path, sitting: Sitting) -> bool:
    return experiments.run_is_finished(model, run.preset, sitting.seeds, run.config, folder, sitting.device)


def _check_one_device(folder: Path, sitting: Sitting) -> None:
    """Refuse to sample beside summaries (in ``folder``) of runs made on another device than this one: the row
    would be paired with them across GPUs, which the bootstrap does not measure (reports/README.md, "Across
    GPUs"), unless ``sitting.mixed_devices`` asks for exactly that."""
    if sitting.mixed_devices or not folder.is_dir():
        return
    here = execution_identity(0, resolve_device(sitting.device), False)["device"]
    others = sorted({device for summary in folder.iterdir() if is_summary_folder(summary)
                     for device in [json.loads((summary / "manifest.json").read_text())["identity"]
                                    .get("execution", {}).get("device")] if device not in (None, here)})
    if others:
        raise ValueError(f"{folder} holds summaries of runs sampled on {', '.join(others)}, and this machine is "
                         f"{here}: a table pairs the runs of one GPU kind, so a row sampled here would be compared "
                         f"with them across GPUs. Sample into another --summaries folder, or on a machine of that "
                         f"kind, or pass --mixed-devices to compare GPUs on purpose")


def _log(sitting: Sitting, record: dict[str, Any]) -> None:
    if sitting.log is not None:
        sitting.log.parent.mkdir(parents=True, exist_ok=True)
        with sitting.log.open("a") as out:
            out.write(json.dumps(record) + "\n")


def _make_one(model: nn.Module, run: PlannedRun, target: Optional[Path], sitting: Sitting) -> dict[str, Any]:
    """Sample (or reuse) one run, then summarize it into ``target``'s folder; the seconds of each."""
    began = time.monotonic()
    made = experiments.sample_run(model, run.preset, sitting.seeds, run.config, run.folder, sitting.batch_size,
                                  sitting.device, calibration=table1.table_calibration(sitting.calibration, run.config))
    record = {"seconds": round(time.monotonic() - began, 1)}
    if target is not None:
        began = time.monotonic()
        summarize_run(made, target, full_precision_reference(made, target.parent), sitting.summary_settings,
                      sitting.seeds)
        record["summary_seconds"] = round(time.monotonic() - began, 1)
    return record


def select_runs(model: nn.Module, runs: Iterable[PlannedRun], runs_dir: str | Path, patterns: Sequence[str],
                device: str = "auto") -> list[PlannedRun]:
    """The ``runs`` whose folder (``qdiff-w4a4-ddim100-tf32``), or its path under ``runs_dir``, matches one of the
    shell ``patterns``: a table's runs split over machines, when the files one part needs (a calibration) do not
    travel with the others'. They come in the patterns' order, so that a deadline leaves the later patterns' runs:
    a run matched by an earlier pattern first, in the plan's order within one pattern, and a full-precision run
    before the first selected run of its sampling (whose distances are measured against it). Each pattern must
    match a run, so a misspelt one is an error, not a sitting that makes nothing."""
    runs, runs_dir = list(runs), Path(runs_dir)
    paths = [_run_dir(model, run, device).relative_to(runs_dir) for run in runs]

    def matches(path: Path, pattern: str) -> bool:
        return fnmatch.fnmatch(str(path), pattern) or fnmatch.fnmatch(path.name, pattern)

    unmatched = [p for p in patterns if not any(matches(path, p) for path in paths)]
    if unmatched:
        raise ValueError(f"no planned run matches {', '.join(unmatched)}; the runs are {', '.join(map(str, paths))}")
    rank = {i: next(k for k, p in enumerate(patterns) if matches(path, p))
            for i, path in enumerate(paths) if any(matches(path, p) for p in patterns)}
    for i in rank:
        if runs[i].preset == "fp":
            rank[i] = min(r for j, r in rank.items() if runs[j].config == runs[i].config)
    return [runs[i] for i in sorted(rank, key=lambda i: (rank[i], runs[i].preset != "fp", i))]


def make_runs(model: nn.Module, runs: Iterable[PlannedRun], runs_dir: str | Path, sitting: Sitting,
              say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Make the ``runs`` not yet finished under ``runs_dir`` nor summarized under ``sitting.summaries``, in
    order (a run two notebooks share once), each summarized as it finishes against the full-precision run beside
    it, or its summary. A run is not started when the time so far and the longest run yet (sampling and summary)
    would pass the deadline; it is reported as ``left``. Returns one record per run: its folder under
    ``runs_dir``, its status (made, there: finished before, summarized: its summary there before, left) and the
    seconds of its sampling and summary."""
    runs_dir, started, longest, records, seen = Path(runs_dir), time.monotonic(), 0.0, [], set()
    for run in runs:
        run_dir = _run_dir(model, run, sitting.device)
        if run_dir in seen:
            continue
        seen.add(run_dir)
        record = {"notebook": run.notebook, "run": str(run_dir.relative_to(runs_dir))}
        target = None if sitting.summaries is None else sitting.summaries / run_dir.relative_to(runs_dir)
        there = _finished(model, run, run.folder, sitting)
        if target is not None and _finished(model, run, target.parent, sitting):
            status = "summarized"
        elif not there and sitting.deadline is not None and time.monotonic() - started + longest > sitting.deadline:
            status = "left"
        else:
            status = "there" if there else "made"
            if target is not None and not there:
                _check_one_device(target.parent, sitting)
            record.update(_make_one(model, run, target, sitting), at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            longest = max(longest, record["seconds"] + record.get("summary_seconds", 0.0)) if not there else longest
            _log(sitting, {**record, "status": status})
        records.append({**record, "status": status})
        say(json.dumps(records[-1]))
    return records


@click.command()
@click.option("--model", default="fmnist-ddim", show_default=True)
@click.option("--preset", type=click.Choice(sorted(REPRODUCE_PRESETS)), default="paper", show_default=True)
@click.option("--notebooks", default=",".join(TABLE_NOTEBOOKS), show_default=True, help="comma-separated")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("data/runs"), show_default=True,
              help="runs go to RUNS/<report name>/, as `modiff reproduce --runs` puts them")
@click.option("--summaries", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="summarize each run into SUMMARIES/<report name>/ as it finishes; runs summarized there are skipped")
@click.option("--summary-device", default="cpu", show_default=True, help="device of the summaries' classifier features")
@click.option("--set", "overrides", multiple=True, help="a reproduce preset field, as `modiff reproduce --set`")
@click.option("--only", default="", help="comma-separated shell patterns of run folders: make only the runs they match")
@click.option("--deadline", type=float, default=None, help="seconds: start no run that would end after it")
@click.option("--log", type=click.Path(dir_okay=False, path_type=Path), default=None, help="append one JSON line per run")
@click.option("--mixed-devices", is_flag=True,
              help="sample beside summaries of runs made on another device (comparing GPUs); refused without it")
def main(model: str, preset: str, notebooks: str, runs: Path, summaries: Optional[Path], summary_device: str,
         overrides: tuple[str, ...], only: str, deadline: Optional[float], log: Optional[Path],
         mixed_devices: bool) -> None:
    """Make the runs of the table notebooks at a reproduce preset (see the module's docstring)."""
    settings = dict(parse_override(item) for item in overrides)
    net = md.load_model(model)
    name = report_name(preset, model)
    planned: list[PlannedRun] = []
    for notebook in filter(None, (n.strip() for n in notebooks.split(","))):
        parameters = notebook_parameters(notebook, preset, settings)
        planned += planned_runs(net, notebook, parameters, runs / name)
    table = notebook_parameters("table1_bitwidth", preset, settings)
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    if patterns:
        planned = select_runs(net, planned, runs / name, patterns, table["device"])
    calibration = experiments.calibration_settings(net, table["steps"], table["calib_samples_per_step"],
                                                   table["adaround_iters"], table["activation_iters"])
    sitting = Sitting(range(table["num_samples"]), table["batch_size"], table["device"],
                      None if summaries is None else summaries / name, SummarySettings(device=summary_device),
                      deadline, log, calibration if table["calibrate"] else None, mixed_devices)
    records = make_runs(net, planned, runs / name, sitting)
    left = [r["run"] for r in records if r["status"] == "left"]
    click.echo(f"{len(records) - len(left)} of {len(records)} runs there or summarized"
               + (f"; left for the next sitting: {', '.join(left)}" if left else ""))


if __name__ == "__main__":
    main()
