"""The index of a report folder: the paper's order, findings embedded (or named as missing), times that say
when runs were reused, links that resolve; run-usage records; reproduce's progress lines."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import pytest
from PIL import Image

from modiff.pipelines import run_usage
from modiff.pipelines.report_index import notebook_settings, run_usage_text, section_anchors, write_index
from modiff.pipelines.report_sections import SECTIONS

from test_report_claims import _table4, table1_rows, write

NOTEBOOK_ENTRY = {"ok": True, "seconds": 12.1, "error": "", "outputs": [], "machine": "cpu (x86_64)",
                  "parameters": {"analysis_samples": 12, "steps": 20, "device": "auto"}}


def make_report(root: Path, preset: str = "paper", findings: bool = True,
                runs: Optional[dict[str, Any]] = None) -> Path:
    """A report folder as `modiff reproduce` leaves it, at toy sizes: manifest, a few tables, one PNG per
    section that has figures, executed-notebook pages, and (optionally) the notebooks' findings."""
    out = root / preset
    write(out, "table1_bitwidth", table1_rows("worse: +0.1 [+0.05, +0.15]", "no difference: 0 [-1, 1]"))
    write(out, "table4_last_step_error", _table4([0.7, 0.2, 0.03, 0.01], [1.6, 1.5, 1.0, 0.6]))
    write(out, "fig1b_range_ratios", [{"layer": "net.mid", "overall": 1.5, "min_per_step": 1.2, "median_per_step": 12.0}])
    for name in ("table1_bitwidth", "table4_last_step_error", "fig1b_range_ratios"):
        (out / "tables" / f"{name}.md").write_text("| a |\n| --- |\n| 1 |\n")
    (out / "figures").mkdir()
    (out / "notebooks").mkdir()
    for section in SECTIONS:
        name = section.figures[0].replace("*", "layer") if section.figures else None
        if name:
            Image.new("RGB", (40, 20), (200, 30, 30)).save(out / "figures" / name)
        (out / "notebooks" / f"{section.notebook}.html").write_text("<html></html>")
        if findings and section.findings:
            (out / "tables" / f"{section.findings[0]}_finding.md").write_text(f"Found in **{section.notebook}**.\n")
    entries = [{"name": s.notebook, **NOTEBOOK_ENTRY, "runs": runs if runs is not None else {}} for s in SECTIONS
               if s.notebook != "published_audit"]
    (out / "manifest.json").write_text(json.dumps({
        "preset": {"name": preset}, "notebooks": entries,
        "parameters": {"model": "fmnist-ddim", "num_samples": 64, "analysis_samples": 12, "steps": 20},
        "environment": {"modiff": "0.1.0", "git_sha": "abc", "time_utc": "2026-12-01"}}))
    return out


def test_sections_follow_the_paper(tmp_path: Path) -> None:
    md_path, html_path = write_index(make_report(tmp_path))
    markdown, page = md_path.read_text(), html_path.read_text()
    headings = re.findall(r"^## (.+)$", markdown, re.M)
    assert headings[:2] == ["Summary: the paper's claims on this model", "What differs from the paper's setting"]
    assert headings[2:-1] == [s.title for s in SECTIONS] and headings[-1] == "Notebooks"
    assert [a for a in re.findall(r'<h2 id="([^"]+)"', page)] == section_anchors()
    assert "[3-4 bit activations near full-precision activations (W8A32) with MoDiff](#table1) | partly |" in markdown
    assert "<span class='v partly'>partly</span>" in page
    assert "id=banner" not in page


def test_findings_are_embedded_or_named_missing(tmp_path: Path) -> None:
    markdown = write_index(make_report(tmp_path))[0].read_text()
    assert "> Found in **fig1a_caching**." in markdown
    bare = write_index(make_report(tmp_path / "bare", findings=False))[0].read_text()
    assert ("> Finding not recorded: rerun `modiff reproduce --preset paper --model fmnist-ddim --notebooks "
            "fig1a_caching`") in bare
    assert "Notebook `published_audit`: not run yet (`modiff reproduce --preset paper --model fmnist-ddim " \
           "--notebooks published_audit`)." in bare


def test_quick_preset_carries_its_banner(tmp_path: Path) -> None:
    page = write_index(make_report(tmp_path, preset="quick"))[1].read_text()
    assert "<div class=banner id=banner><strong>Quick preset: sizes too small for conclusions.</strong> 64 samples" in page


@pytest.mark.parametrize("runs, text", [
    ({}, "run reuse not recorded"),
    ({"made": 0, "reused": 0, "reused_sampling_seconds": 0}, "no sample-run folders"),
    ({"made": 0, "reused": 3, "reused_sampling_seconds": 900}, "**all 3 sample runs reused**, made earlier (their "
                                                               "sampling took 15.0 min then)"),
    ({"made": 0, "reused": 1, "reused_sampling_seconds": 41.3}, "**its sample run reused**, made earlier (its "
                                                                "sampling took 41.3 s then)"),
    ({"made": 0, "reused": 3, "reused_sampling_seconds": 900, "reused_devices": {"NVIDIA H100": 3}},
     "**all 3 sample runs reused**, made earlier (on NVIDIA H100; their sampling took 15.0 min then)"),
    ({"made": 0, "reused": 3, "reused_sampling_seconds": 900, "reused_devices": {"NVIDIA H200": 2, "NVIDIA H100": 1}},
     "**all 3 sample runs reused**, made earlier (on NVIDIA H200: 2, NVIDIA H100: 1; their sampling took 15.0 min"),
    ({"made": 0, "reused": 1, "reused_sampling_seconds": 30, "reused_devices": {"NVIDIA H200": 1, "cpu (x86_64)": 1}},
     "**its sample run reused**, made earlier (on NVIDIA H200: 1, cpu (x86_64): 1; its sampling took 30.0 s then)"),
    ({"made": 2, "reused": 1, "reused_sampling_seconds": 5}, "2 sample runs made here, 1 reused"),
    ({"made": 1, "reused": 0, "reused_sampling_seconds": 0}, "1 sample run made here, 0 reused"),
])
def test_times_say_whether_runs_were_made_or_reused(tmp_path: Path, runs: dict[str, Any], text: str) -> None:
    assert run_usage_text(runs).startswith(text)
    markdown = write_index(make_report(tmp_path, runs=runs))[0].read_text()
    assert f"Notebook [table1_bitwidth](notebooks/table1_bitwidth.html): 12.1 s on cpu (x86_64); {text}" in markdown


def test_every_link_and_image_resolves(tmp_path: Path) -> None:
    out = make_report(tmp_path)
    markdown, page = (p.read_text() for p in write_index(out))
    files = [link for link in re.findall(r"\]\(([^)]+)\)", markdown) if not link.startswith("#")]
    assert files and all((out / link).is_file() for link in files)
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == sum(1 for s in SECTIONS if s.figures) and all((out / src).is_file() for src in images)
    assert not re.search(r'(src|href)="https?:', page)  # nothing to fetch: renders offline


def test_a_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    from modiff.pipelines.reproduce import rebuild_index

    with pytest.raises(ValueError, match="has no manifest.json"):
        write_index(tmp_path)
    with pytest.raises(ValueError, match="no report folder"):
        rebuild_index("quick", reports_dir=tmp_path / "missing")
    make_report(tmp_path, preset="quick")
    assert rebuild_index("quick", reports_dir=tmp_path) == tmp_path / "quick" / "index.html"


def test_run_usage_counts_each_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(run_usage.RUN_USAGE_ENV, raising=False)
    old = tmp_path / "old-run"
    old.mkdir()
    sessions = [{"seconds": 30.0, "environment": {"device": "NVIDIA H200"}},
                {"seconds": 12.5, "environment": {"device": "NVIDIA H100"}}]  # resumed on another GPU
    (old / "manifest.json").write_text(json.dumps({"sessions": sessions}))
    older = tmp_path / "older-run"  # made before manifests named the device
    older.mkdir()
    (older / "manifest.json").write_text(json.dumps({"sessions": [{"seconds": 5.0}, {"seconds": 2.5}]}))
    run_usage.note(old, made=False)  # outside a recording: nothing, nowhere
    with run_usage.recording(tmp_path / "usage.jsonl") as path:
        run_usage.note(old, made=False)
        run_usage.note(older, made=False)
        run_usage.note(tmp_path / "a", made=False)
        run_usage.note(tmp_path / "a", made=True)  # a worker made it, the notebook read it back
        run_usage.note(tmp_path / "b", made=True)
    assert run_usage.RUN_USAGE_ENV not in __import__("os").environ
    assert run_usage.RunUsage.read(path) == run_usage.RunUsage(
        made=2, reused=2, reused_sampling_seconds=50.0, reused_devices={"NVIDIA H100": 1, "NVIDIA H200": 1})


def test_reproduce_reports_progress_per_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modiff.pipelines import reproduce as rp

    def fake_run(name: str, parameters: dict[str, Any], out_dir: Path) -> rp.NotebookResult:
        return rp.NotebookResult(name, name != "samplers", 2.5, error="" if name != "samplers" else "boom",
                                 runs={"made": 1, "reused": 4, "reused_sampling_seconds": 9.0})

    monkeypatch.setattr(rp, "_run_one", fake_run)
    lines: list[str] = []
    rp.reproduce("quick", reports_dir=tmp_path, notebooks=["model_card", "samplers"], progress=lines.append)
    assert re.fullmatch(r"\[1/2\] model_card: started at \d\d:\d\d:\d\d", lines[0])
    assert re.fullmatch(r"\[1/2\] model_card: ok in 2\.5 s, runs 1 made / 4 reused; \d+ s so far", lines[1])
    assert re.fullmatch(r"\[2/2\] samplers: FAILED in 2\.5 s, runs 1 made / 4 reused; \d+ s so far", lines[3])
    manifest = json.loads((tmp_path / "quick" / "manifest.json").read_text())
    assert manifest["notebooks"][0]["runs"] == {"made": 1, "reused": 4, "reused_sampling_seconds": 9.0}
    assert "1 sample run made here, 4 reused" in (tmp_path / "quick" / "index.md").read_text()


def test_reproduce_records_each_notebook_as_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped in its second notebook (a time limit, Ctrl-C) keeps the first one's entry in the
    manifest and the index: its tables and figures are already written."""
    from modiff.pipelines import reproduce as rp

    def stopped_in_samplers(name: str, parameters: dict[str, Any], out_dir: Path) -> rp.NotebookResult:
        if name == "samplers":
            raise KeyboardInterrupt
        return rp.NotebookResult(name, True, 3.5, machine="cpu (x86_64)")

    monkeypatch.setattr(rp, "_run_one", stopped_in_samplers)
    with pytest.raises(KeyboardInterrupt):
        rp.reproduce("quick", reports_dir=tmp_path, notebooks=["model_card", "samplers"], progress=lambda line: None)
    manifest = json.loads((tmp_path / "quick" / "manifest.json").read_text())
    assert [n["name"] for n in manifest["notebooks"]] == ["model_card"]
    assert "3.5 s on cpu (x86_64)" in (tmp_path / "quick" / "index.md").read_text()


def test_kernels_use_ipc_in_a_private_folder() -> None:
    from modiff.pipelines.reproduce import _kernel_config

    with _kernel_config() as config:
        assert config.KernelManager.transport == "ipc"
        folder = Path(config.KernelManager.ip).parent
        assert folder.is_dir()
    assert not folder.exists()


def test_an_empty_table_gives_no_sample_size(tmp_path: Path) -> None:
    """A comparison with nothing to compare (the quick preset's scale-sharing table) writes a table with
    columns and no rows: its section says so in words (no header-only table), and has no "Sample size: n" line."""
    import pandas as pd

    out = make_report(tmp_path)
    pd.DataFrame(columns=["preset", "n", "fid_ci95"]).to_csv(out / "tables" / "published_scale_sharing.csv", index=False)
    write(out, "published_audit", [{"check": "per-step reset vs weight-only", "value": 0.0}])
    markdown = write_index(out)[0].read_text()
    audit = markdown[markdown.index('<a id="audit"></a>'):markdown.index('<a id="model"></a>')]
    assert "(`published_scale_sharing`)" not in audit and "Sample size: n" not in audit
    assert "[`published_scale_sharing`](tables/published_scale_sharing.md): no rows" in audit
    assert "| preset | n | fid_ci95 |" not in audit


def test_settings_leave_out_calibration_that_did_not_run() -> None:
    calibration = {"calib_samples_per_step": 256, "adaround_iters": 20000, "activation_iters": 5000}
    assert (notebook_settings({"steps": 100, "calibrate": False, **calibration, "bits": [4, 8]})
            == "steps 100, calibrate False, calibration: the model's shipped one (its iterations in table1_calibration)")
    assert (notebook_settings({"steps": 100, "calibrate": True, **calibration})
            == "steps 100, calibrate True, calib_samples_per_step 256, adaround_iters 20000, activation_iters 5000")
    assert notebook_settings({"steps": 100, "calibrate": False, "device": ""}) == "steps 100, calibrate False"
