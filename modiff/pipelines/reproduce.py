"""`modiff reproduce`: run every notebook with papermill for a preset and index what it wrote.

reports/<name>/   <name> = <preset> for the default model fmnist-ddim, else <preset>-<model> (a path
                  given as the model counts by its folder or file stem: reports/quick-fmnist-ldm/)
    index.md, index.html     the document to read (`modiff.pipelines.report_index`): the paper's claims judged,
                             one section per paper artefact, the notebooks with their times and run reuse
    notebooks/NAME.ipynb     executed notebooks; NAME.html without input cells
    figures/*.png|pdf        written by analysis.style.save
    tables/*.csv|md
A failed notebook is reported with its error and does not stop the others; run directories under
data/runs/<name>/ are reused, so a re-run only computes what is missing. Each notebook's entry keeps the
parameters it ran with, so a report assembled by several invocations (say, the bit-width table on one GPU
and the figures on another, at the same time) says what each part used; the index and manifest are merged
under a file lock.
"""
from __future__ import annotations

import ast
import fcntl
import json
import logging
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, get_args

from modiff.pipelines import run_usage
from modiff.pipelines.execution import PrecisionChoice
from modiff.pipelines.report_index import write_index
from modiff.utils.paths import notebook_dir
from modiff.utils.runs import environment, write_json

__all__ = ["ReproducePreset", "REPRODUCE_PRESETS", "NOTEBOOKS", "DEFAULT_MODEL", "reproduce", "notebook_dir",
           "parse_override", "report_name", "rebuild_index"]

log = logging.getLogger(__name__)

PresetName = Literal["quick", "paper"]


@dataclass(frozen=True)
class ReproducePreset:
    """Sizes handed to every notebook as papermill parameters."""

    name: PresetName
    num_samples: int  # samples scored per preset (bit-width and sampler tables)
    analysis_samples: int  # trajectories recorded or compared feature by feature (figures, bounds, grids, audit)
    warmup_samples: int  # seeds of the warm-up table (Tables 5, 15-18): enough for its paired intervals to separate
    steps: int
    device: str = "auto"
    devices: str = ""  # "cuda:0,cuda:1": the bit-width and sampler runs are made in parallel, one process per device
    batch_size: int = 64
    precision: str = "auto"  # the bit-width and sampler tables' runs (others take the device's): auto (bf16 on CUDA, fp32 on CPU), fp32, tf32, bf16
    calibrate: bool = False  # Q-Diffusion rows (AdaRound + step sizes): GPU work, so paper preset only
    # The bit-width and sampler tables' rows without a run: "sample" them, or "skip" them (rendering summaries on a CPU).
    missing_runs: str = "sample"
    # The Q-Diffusion recipe of those rows: published settings by default (`analysis.experiments.calibration_settings`).
    theory_calib_samples: int = 2  # trajectories that estimate c in the layer sweep of Theorems 4.3/4.4
    theory_heldout_samples: int = 2  # other seeds, on which the bounds are checked
    calib_samples_per_step: int = 256
    adaround_iters: int = 20_000
    activation_iters: int = 5_000

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.type in (int, "int")}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"reproduce sizes must be >= 1, got {bad} (set them with --set key=N)")
        if self.missing_runs not in ("sample", "skip"):
            raise ValueError(f"missing_runs must be sample or skip, got {self.missing_runs!r}")
        if self.precision not in get_args(PrecisionChoice):
            raise ValueError(f"precision must be one of {', '.join(get_args(PrecisionChoice))}, got {self.precision!r}")


REPRODUCE_PRESETS: dict[str, ReproducePreset] = {
    "quick": ReproducePreset("quick", num_samples=12, analysis_samples=12, warmup_samples=12, steps=20),
    "paper": ReproducePreset("paper", num_samples=10_000, analysis_samples=128, warmup_samples=1024, steps=100,
                             batch_size=512, calibrate=True, theory_calib_samples=64, theory_heldout_samples=64),
}

def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` of a ReproducePreset field, the value converted to the field's type."""
    key, sep, raw = item.partition("=")
    types = {f.name: f.type for f in fields(ReproducePreset) if f.name != "name"}
    if not sep or key not in types:
        raise ValueError(f"expected key=value with key one of {', '.join(types)}; got {item!r}")
    if types[key] in (bool, "bool"):
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"{key} takes true or false, got {raw!r}")
        return key, raw.lower() == "true"
    if types[key] in (int, "int"):
        try:
            return key, int(raw)
        except ValueError:
            raise ValueError(f"{key} takes an integer, got {raw!r}") from None
    return key, raw


NOTEBOOKS: tuple[str, ...] = (
    "model_card", "fig1b_activations", "fig1a_caching", "theory_bounds", "fig3_compensation", "table1_bitwidth",
    "samplers", "bops_memory", "sample_grids", "published_audit",
)


DEFAULT_MODEL = "fmnist-ddim"


def report_name(preset: str, model: str = DEFAULT_MODEL) -> str:
    """The folder name under reports/ and data/runs/: the preset for the default model (so links to
    reports/<preset>/ stay valid), else <preset>-<model>, a path counting by its folder or file stem."""
    if model == DEFAULT_MODEL:
        return preset
    from modiff.models.registry import MODEL_PRESETS

    return f"{preset}-{model if model in MODEL_PRESETS else Path(model).stem}"


@dataclass
class NotebookResult:
    name: str
    ok: bool
    seconds: float
    error: str = ""
    outputs: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)  # those it declares, as passed (paths left out)
    machine: str = ""  # the device its `device` parameter resolved to: GPU name, or the CPU
    runs: dict[str, Any] = field(default_factory=dict)  # run folders made and reused (`run_usage.RunUsage`)


def _machine(device: object) -> str:
    from modiff.utils.device import resolve_device

    try:
        return str(environment(resolve_device(str(device)))["device"])
    except (ValueError, RuntimeError):  # a device this machine lacks: the notebook reports the error itself
        return ""


_PATH_PARAMETERS = ("model", "out_dir", "runs_dir")


def _export_html(executed: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(exclude_input=True).from_notebook_node(nbformat.read(executed, as_version=4))
    executed.with_suffix(".html").write_text(body)


@contextmanager
def _kernel_config() -> Iterator[Any]:
    """Kernels talk to papermill over IPC sockets in a private temporary folder, so ipykernel has no
    reason to warn, at every start, that its TCP traffic is unencrypted."""
    from traitlets.config import Config

    with tempfile.TemporaryDirectory(prefix="modiff-kernel-") as folder:
        yield Config({"KernelManager": {"transport": "ipc", "ip": str(Path(folder) / "kernel")}})


def recorded_sizes(declared: dict[str, dict[str, Any]], passed: dict[str, Any]) -> dict[str, Any]:
    """The parameters a notebook ran with, for the index: those passed, and the defaults of its own sample
    counts that no preset sets (``audit_samples``), which it ran with all the same. ``declared``:
    `papermill.inspect_notebook` (defaults as source text)."""
    own = {}
    for name, spec in declared.items():
        if name not in passed and name.endswith("_samples") and not name.endswith("resamples"):
            try:
                own[name] = ast.literal_eval(str(spec.get("default")))
            except (ValueError, SyntaxError):
                continue
    return {k: v for k, v in {**passed, **own}.items() if k not in _PATH_PARAMETERS}


def _run_one(name: str, parameters: dict[str, Any], out_dir: Path) -> NotebookResult:
    import papermill

    source = notebook_dir() / f"{name}.ipynb"
    executed = out_dir / "notebooks" / f"{name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    declared = papermill.inspect_notebook(str(source))  # pass each notebook only the parameters it declares
    passed = {k: v for k, v in parameters.items() if k in declared}
    sizes = recorded_sizes(declared, passed)
    machine = _machine(passed.get("device", "cpu"))
    usage_file = executed.parent / f".{name}.runs.jsonl"
    error = ""
    try:
        with run_usage.recording(usage_file), _kernel_config() as config:
            papermill.execute_notebook(str(source), str(executed), progress_bar=False, parameters=passed,
                                       cwd=str(notebook_dir().parent), kernel_name="python3", config=config)
        _export_html(executed)
    except Exception as err:  # a failing notebook must not stop the others; the error goes in the index
        log.error("notebook %s failed: %s", name, err)
        error = str(err).strip()[-2000:] or type(err).__name__
    runs = run_usage.RunUsage.read(usage_file).to_dict() if usage_file.exists() else {}
    usage_file.unlink(missing_ok=True)
    return NotebookResult(name, not error, round(time.time() - start, 1), error=error, parameters=sizes,
                          machine=machine, runs=runs)


def injected_parameters(executed: Path) -> dict[str, Any]:
    """The parameters papermill injected into an executed notebook (paths left out); {} if it has none."""
    import ast

    import nbformat

    book = nbformat.read(executed, as_version=4)
    cell = next((c for c in book.cells if "injected-parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return {}
    assignments = [node for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)]
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in assignments}
    return {k: v for k, v in values.items() if k not in _PATH_PARAMETERS}


def _with_earlier_results(out_dir: Path, results: list[NotebookResult]) -> list[NotebookResult]:
    """Results of this run, plus those of notebooks an earlier run executed and this one did not (their
    parameters read back from the executed notebook where an older manifest did not keep them)."""
    manifest = out_dir / "manifest.json"
    ran = {r.name for r in results}
    earlier = json.loads(manifest.read_text()).get("notebooks", []) if manifest.exists() else []
    kept = [NotebookResult(**r) for r in earlier if r["name"] not in ran and r["name"] in NOTEBOOKS]
    for result in kept:
        executed = out_dir / "notebooks" / f"{result.name}.ipynb"
        if not result.parameters and executed.exists():
            result.parameters = injected_parameters(executed)
    return sorted(results + kept, key=lambda r: NOTEBOOKS.index(r.name))


def _record(out_dir: Path, spec: ReproducePreset, model: str, parameters: dict[str, Any],
            results: list[NotebookResult]) -> None:
    """Merge this run's results into the manifest and index, holding a lock: runs into one report folder
    may overlap (one per GPU), and each must keep what the others wrote."""
    with open(out_dir / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _with_earlier_results(out_dir, results)
        write_json({"preset": asdict(spec), "parameters": parameters, "environment": environment(),
                    "notebooks": [asdict(r) for r in merged]}, out_dir / "manifest.json")
        write_index(out_dir)


def _progress_line(done: int, total: int, result: NotebookResult, started: float) -> str:
    runs = f", runs {result.runs['made']} made / {result.runs['reused']} reused" if result.runs else ""
    return (f"[{done}/{total}] {result.name}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.1f} s{runs}; "
            f"{time.time() - started:.0f} s so far")


PRECISION_NOTEBOOKS = ("table1_bitwidth", "samplers", "published_audit")  # read runs at the `precision` parameter


def other_precision_note(runs_folder: str | Path, precision: str) -> Optional[str]:
    """A warning when ``runs_folder`` holds sample runs or summaries (``<spacing>/<run>/`` or ``<run>/``) only at
    other precisions than ``precision`` (resolved: fp32, tf32 or bf16): the precision is part of a run's
    identity, so the tables would sample their runs anew (on a CPU, hours at paper sizes) instead of reading
    those. None otherwise."""
    folder = Path(runs_folder)
    found: dict[str, list[str]] = {}
    for path in sorted([*folder.glob("*/manifest.json"), *folder.glob("*/*/manifest.json")]):
        try:
            identity = json.loads(path.read_text()).get("identity")
        except (json.JSONDecodeError, AttributeError):  # a manifest being written, or not a run's
            continue
        if isinstance(identity, dict) and "sample" in identity:  # not a calibration's or a report's manifest
            held = identity["sample"].get("precision", "fp32")  # runs older than the field were fp32
            found.setdefault(held, []).append(path.parent.relative_to(folder).as_posix())
    if not found or precision in found:
        return None
    held = "; ".join(f"{len(names)} at {p} (e.g. {names[0]})" for p, names in sorted(found.items()))
    return (f"note: {runs_folder} holds runs sampled at other precisions ({held}) and none at {precision}, this "
            f"job's; the tables will sample theirs anew. To render from those, pass --set precision=P (for the "
            f"committed summaries, --set precision=tf32 --set calibrate=false).")


def reproduce(preset: str = "quick", model: str = DEFAULT_MODEL, reports_dir: str | Path = "reports",
              runs_dir: str | Path = "data/runs", notebooks: Sequence[str] | None = None,
              overrides: dict[str, Any] | None = None,
              progress: Optional[Callable[[str], None]] = None) -> list[NotebookResult]:
    """Execute the notebooks into reports_dir/<name>/ (see `report_name`) and write the index; returns
    per-notebook results.

    `overrides` replaces `ReproducePreset` fields (num_samples, steps, calibrate, adaround_iters, ...) by name.
    `progress` receives a line as each notebook starts and as it ends (its time, its runs made and reused,
    the time so far); without it the lines go to this module's logger at INFO."""
    if preset not in REPRODUCE_PRESETS:
        raise ValueError(f"unknown reproduce preset {preset!r}; allowed: {', '.join(get_args(PresetName))}")
    chosen = list(notebooks or NOTEBOOKS)
    unknown = [n for n in chosen if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; allowed: {', '.join(NOTEBOOKS)}")
    spec = REPRODUCE_PRESETS[preset]
    known = {f for f in asdict(spec) if f != "name"}
    bad = set(overrides or {}) - known
    if bad:
        raise ValueError(f"unknown parameters {sorted(bad)}; allowed: {', '.join(sorted(known))}")
    spec = replace(spec, **(overrides or {}))
    name = report_name(preset, model)
    out_dir = Path(reports_dir).resolve() / name
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"model": model, "out_dir": str(out_dir), "runs_dir": str(Path(runs_dir).resolve() / name),
                  **{k: v for k, v in asdict(spec).items() if k != "name"}}
    say = progress or log.info
    if any(n in PRECISION_NOTEBOOKS for n in chosen):
        from modiff.pipelines.execution import resolve_precision
        from modiff.utils.device import resolve_device

        try:
            precision = resolve_precision(spec.precision, resolve_device(spec.device))
        except (ValueError, RuntimeError):  # a device this machine lacks: the notebooks report it themselves
            precision = None
        note = precision and other_precision_note(parameters["runs_dir"], precision)
        if note:
            say(note)
    results: list[NotebookResult] = []
    started = time.time()
    for i, notebook in enumerate(chosen, 1):
        say(f"[{i}/{len(chosen)}] {notebook}: started at {time.strftime('%H:%M:%S')}")
        results.append(_run_one(notebook, parameters, out_dir))
        say(_progress_line(i, len(chosen), results[-1], started))
        _record(out_dir, spec, model, parameters, results)  # each notebook as it ends: a stopped run keeps them
    return results


def rebuild_index(preset: str = "quick", model: str = DEFAULT_MODEL, reports_dir: str | Path = "reports") -> Path:
    """Rewrite reports_dir/<name>/index.md and index.html from what the folder holds, running no
    notebook (after a change to the index, or to recover one); returns the HTML path."""
    out_dir = Path(reports_dir) / report_name(preset, model)
    if not out_dir.is_dir():
        raise ValueError(f"no report folder {out_dir}: run `modiff reproduce --preset {preset} --model {model}` first")
    return write_index(out_dir)[1]
