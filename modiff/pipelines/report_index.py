"""The document people read: reports/<name>/index.html and index.md, written from a report folder alone.

In the order of the paper (`report_sections.SECTIONS`): a summary of the paper's claims, each marked
reproduced / partly / not reproduced and linked to its section (`report_claims`); what differs from the
paper's setting, stated once (`report_compare.setting_table`); then one section per paper artefact with
its figures inline, its finding as its notebook wrote it, the paper's values beside ours with one line per
trend, its tables rendered, the sample size and intervals, and the executed notebook with its time and
whether its runs were made or reused (the manifest). Images stay beside the page (figures/), so the folder
renders offline as it is. `write_index` reads everything from the folder, so it also rebuilds the index
of an existing report without running a notebook.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd

from modiff.pipelines.report_claims import Claim, SavedTables, claims
from modiff.pipelines.report_compare import comparison, is_latent, setting_table, table1_view
from modiff.pipelines.report_render import Document, duration
from modiff.pipelines.report_sections import FINDING_SUFFIX, SECTIONS, Section, figure_files

__all__ = ["write_index", "run_usage_text", "section_anchors", "notebook_settings"]

SIZE_COLUMNS = ("n", "n_samples", "trajectories", "trajectories_heldout")
MAX_RENDERED_ROWS = 120  # longer tables are linked, not rendered


def _manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{out_dir} has no manifest.json: not a report folder written by `modiff reproduce`")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun `modiff reproduce` into {out_dir}") from err


def _devices_text(devices: Mapping[str, int], reused: int) -> str:
    """Where reused runs were sampled: "on D; " when all on one device, "on D1: 58, D2: 20; " otherwise."""
    if not devices:
        return ""
    if len(devices) == 1 and next(iter(devices.values())) == reused:
        return f"on {next(iter(devices))}; "
    return "on " + ", ".join(f"{device}: {count}" for device, count in devices.items()) + "; "


def run_usage_text(runs: Mapping[str, Any]) -> str:
    """How the notebook's sample runs were had: made now, or reused (then its time is not the work's)."""
    if not runs:
        return "run reuse not recorded (made before it was tracked)"
    made, reused = int(runs.get("made", 0)), int(runs.get("reused", 0))
    if made == reused == 0:
        return "no sample-run folders (everything computed in the notebook)"
    if made == 0:
        reused_runs = "its sample run reused**, made earlier (" if reused == 1 else \
            f"all {reused} sample runs reused**, made earlier ("
        return (f"**{reused_runs}{_devices_text(runs.get('reused_devices') or {}, reused)}"
                f"{'its' if reused == 1 else 'their'} sampling took {duration(runs.get('reused_sampling_seconds', 0))} "
                f"then): this time is not the cost of the work")
    return f"{made} sample {'run' if made == 1 else 'runs'} made here, {reused} reused"


def _rerun(notebook: str, preset: str, model: str) -> str:
    return f"`modiff reproduce --preset {preset} --model {model} --notebooks {notebook}`"


def _notebook_line(entry: Optional[Mapping[str, Any]], notebook: str, preset: str, model: str) -> str:
    if entry is None:
        return f"Notebook `{notebook}`: not run yet ({_rerun(notebook, preset, model)})."
    link = f"[{notebook}](notebooks/{notebook}.html)"
    if not entry.get("ok"):
        last = (entry.get("error") or "").strip().splitlines()[-1:] or [""]
        return f"Notebook {link}: **FAILED** after {duration(entry.get('seconds', 0))}: {last[0]}"
    sizes = ", ".join(f"{k} {v}" for k, v in entry.get("parameters", {}).items()
                      if ("samples" in k or k == "steps") and not isinstance(v, (list, tuple)))
    machine = f" on {entry['machine']}" if entry.get("machine") else ""
    return (f"Notebook {link}: {duration(entry.get('seconds', 0))}{machine}; {run_usage_text(entry.get('runs', {}))}"
            + (f"; sizes: {sizes}" if sizes else "") + ".")


def _size_line(tables: SavedTables, names: tuple[str, ...]) -> Optional[str]:
    """Sample sizes read from the tables' n-like columns, and whether they carry 95% intervals."""
    sizes, ci = [], False
    for name in names:
        table = tables.get(name)
        if table is None or table.empty:  # an empty table (a comparison with nothing to compare) has no size
            continue
        ci = ci or any("ci95" in str(c) for c in table.columns)
        for column in SIZE_COLUMNS:
            if column in table.columns:
                values = sorted({int(v) for v in table[column].dropna()})
                sizes.append(f"{column} {', '.join(map(str, values))} (`{name}`)")
    if not sizes and not ci:
        return None
    return ("Sample size: " + ("; ".join(sizes) if sizes else "see the notebook's sizes")
            + (". Intervals: 95% bootstrap over samples (the ci95 columns)." if ci else ". No intervals in these tables."))


def _finding(out_dir: Path, name: str) -> Optional[str]:
    path = out_dir / "tables" / f"{name}{FINDING_SUFFIX}"
    return path.read_text().strip() if path.is_file() else None


def _section_table(doc: Document, tables: SavedTables, name: str, folded: bool) -> None:
    view = table1_view(tables) if name == "table1_bitwidth" else None
    table = view if view is not None else tables.get(name)
    link = f"tables/{name}.md"
    if table is None:
        doc.paragraph(f"Table `{name}`: not written (its notebook has not run, or failed).")
    elif table.empty:
        doc.paragraph(f"Table [`{name}`]({link}): no rows (nothing to compare; the finding above says why).")
    elif len(table) > MAX_RENDERED_ROWS:
        doc.paragraph(f"Table [`{name}`]({link}): {len(table)} rows, too long to show here (CSV beside it).")
    else:
        note = " (compact view; every column in the linked table)" if view is not None else ""
        doc.table(table, caption=f"[`{name}`]({link}){note}", folded=folded)


def _title(section: Section, latent: bool) -> str:
    if section.anchor == "table1" and latent:
        return "Tables 2 and 3: bit widths on a latent model, direct quantization against MoDiff"
    return section.title


@dataclass(frozen=True)
class _Report:
    """What every section reads: the folder, its tables, its preset and model, the judged claims and the
    manifest's entry per notebook."""

    out_dir: Path
    tables: SavedTables
    preset: str
    model: str
    latent: bool
    claims: list[Claim]
    notebooks: dict[str, dict[str, Any]]


def _section(doc: Document, report: _Report, section: Section) -> None:
    out_dir, tables = report.out_dir, report.tables
    entry = report.notebooks.get(section.notebook)
    doc.heading(2, _title(section, report.latent), section.anchor)
    doc.paragraph(section.about)
    doc.paragraph(_notebook_line(entry, section.notebook, report.preset, report.model), small=True)
    for figure in figure_files(out_dir, section):
        doc.figure(figure, Path(figure).stem)
    for name in section.findings:
        text = _finding(out_dir, name)
        doc.finding(text if text is not None else
                    f"Finding not recorded: rerun {_rerun(section.notebook, report.preset, report.model)} "
                    "(its notebook now saves what it finds).", missing=text is None)
    verdicts = [c for c in report.claims if c.section == section.anchor]
    compared = comparison(section.anchor, tables)
    if verdicts or compared:
        doc.heading(3, "Ours beside the paper's")
        if compared is not None and compared.table is not None:
            doc.table(compared.table)
        lines = compared.lines if compared else []
        doc.bullets([f"{c.claim}: {doc.verdict(c.verdict)}." + ("" if lines else f" {c.evidence}") for c in verdicts]
                    + lines)
    size = _size_line(tables, section.tables + section.folded + section.linked)
    if size:
        doc.paragraph(size, small=True)
    for name in section.tables:
        _section_table(doc, tables, name, folded=False)
    for name in section.folded:
        _section_table(doc, tables, name, folded=True)
    for name in section.linked:
        if (out_dir / "tables" / f"{name}.md").is_file():
            doc.paragraph(f"Table [`{name}`](tables/{name}.md) (long: linked, CSV beside it).")


def _summary(doc: Document, found: list[Claim]) -> None:
    doc.heading(2, "Summary: the paper's claims on this model", "summary")
    doc.paragraph("Each verdict is computed from the saved tables by the rule in `modiff.pipelines.report_claims` "
                  "(reproduced, partly, not reproduced, inconclusive when the intervals are too wide to tell; not "
                  "measured when its table is missing).")
    rows = pd.DataFrame([{"claim": f"[{c.claim}](#{c.section})", "verdict": c.verdict, "evidence": c.evidence}
                         for c in found])
    doc.table(rows, verdict_column="verdict")


def _notebooks_table(doc: Document, notebooks: Mapping[str, Mapping[str, Any]]) -> None:
    doc.heading(2, "Notebooks", "notebooks")
    rows = []
    for section in SECTIONS:
        entry = notebooks.get(section.notebook)
        if entry is None:
            rows.append({"notebook": section.notebook, "status": "not run yet", "time": "", "runs": "", "ran on": "",
                         "settings": ""})
            continue
        settings = notebook_settings(entry.get("parameters", {}))
        rows.append({"notebook": f"[{section.notebook}](notebooks/{section.notebook}.html)" if entry.get("ok") else section.notebook,
                     "status": "ok" if entry.get("ok") else "FAILED", "time": duration(entry.get("seconds", 0)),
                     "runs": run_usage_text(entry.get("runs", {})), "ran on": entry.get("machine", ""),
                     "settings": settings})
    doc.table(pd.DataFrame(rows))


CALIBRATION_SETTINGS = ("calib_samples_per_step", "adaround_iters", "activation_iters")


def notebook_settings(parameters: Mapping[str, Any]) -> str:
    """A notebook's scalar parameters for the index. With ``calibrate`` off the calibration settings went
    unused (the model's shipped calibration ran, its iterations in the table1_calibration table), so they are
    left out and that is said instead."""
    shipped = parameters.get("calibrate") is False
    settings = [f"{k} {v}" for k, v in parameters.items() if not isinstance(v, (list, tuple)) and v != ""
                and not (shipped and k in CALIBRATION_SETTINGS)]
    if shipped and any(k in parameters for k in CALIBRATION_SETTINGS):
        settings.append("calibration: the model's shipped one (its iterations in table1_calibration)")
    return ", ".join(settings)


def _banner(preset: str, parameters: Mapping[str, Any]) -> Optional[str]:
    if preset != "quick":
        return None
    return (f"**Quick preset: sizes too small for conclusions.** {parameters.get('num_samples', '?')} samples per "
            f"table row, {parameters.get('analysis_samples', '?')} trajectories per figure, "
            f"{parameters.get('steps', '?')} sampling steps: this report shows that every step of the pipeline runs; "
            "its verdicts say nothing about the paper's claims. Read the `paper` preset's report for those.")


def write_index(out_dir: str | Path) -> tuple[Path, Path]:
    """Write out_dir/index.md and index.html from the folder's manifest, tables, findings and figures;
    returns their paths. Works on any report folder `modiff reproduce` wrote (older ones included:
    what they lack is named in the page, with the command that makes it)."""
    out_dir = Path(out_dir)
    manifest = _manifest(out_dir)
    preset = manifest.get("preset", {}).get("name", "?")
    # The sizes each notebook ran with win over the last invocation's, which win over the preset's.
    ran_with = {k: v for entry in manifest.get("notebooks", []) for k, v in entry.get("parameters", {}).items()}
    parameters = {**manifest.get("preset", {}), **manifest.get("parameters", {}), **ran_with}
    model = str(parameters.get("model", "?"))
    tables = SavedTables(out_dir)
    report = _Report(out_dir, tables, preset, model, is_latent(tables, model), claims(out_dir),
                     {n["name"]: n for n in manifest.get("notebooks", [])})
    environment = manifest.get("environment", {})
    doc = Document(f"MoDiff on {model}: preset {preset}")
    doc.heading(1, f"MoDiff reproduced on `{model}`, preset `{preset}`")
    banner = _banner(preset, parameters)
    if banner:
        doc.banner(banner)
    doc.paragraph(f"Made by modiff {environment.get('modiff', '?')} at commit `{str(environment.get('git_sha', '?'))[:12]}`, "
                  f"{environment.get('time_utc', '?')}. Every number below is read from the tables beside this page; "
                  "every finding was written by its notebook from the numbers.", small=True)
    _summary(doc, report.claims)
    doc.heading(2, "What differs from the paper's setting", "setting")
    doc.table(setting_table(tables, model, parameters))
    doc.contents([(s.anchor, _title(s, report.latent)) for s in SECTIONS] + [("notebooks", "Notebooks")])
    for section in SECTIONS:
        _section(doc, report, section)
    _notebooks_table(doc, report.notebooks)
    md_path, html_path = out_dir / "index.md", out_dir / "index.html"
    md_path.write_text(doc.markdown())
    html_path.write_text(doc.html())
    return md_path, html_path


def section_anchors() -> list[str]:
    """Every anchor the index has: the summary, the setting, each section and the notebooks table."""
    return ["summary", "setting", *(s.anchor for s in SECTIONS), "notebooks"]

