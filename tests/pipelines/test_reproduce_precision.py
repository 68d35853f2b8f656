"""`modiff reproduce` says so before it starts when the runs folder holds runs only at another precision than
the job's: the precision is part of a run's identity, so the tables would sample theirs anew instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import modiff.pipelines.reproduce as reproduce_module
from modiff.pipelines.reproduce import NotebookResult, other_precision_note, reproduce


def _run(folder: Path, precision: str | None) -> None:
    folder.mkdir(parents=True)
    sample = {"sampler": "ddim", "steps": 100, "spacing": "quad", "eta": 0.0}
    if precision is not None:
        sample["precision"] = precision
    (folder / "manifest.json").write_text(json.dumps({"identity": {"model": {}, "sample": sample}, "seeds": [0]}))


def test_runs_at_another_precision_only_are_named(tmp_path: Path) -> None:
    _run(tmp_path / "spacing-quad" / "fp-ddim100-tf32", "tf32")
    _run(tmp_path / "spacing-quad" / "w8a4-ddim100-tf32", "tf32")
    calibration = tmp_path / "quantized" / "qdiff-w4a4"  # a calibration's manifest is not a run
    calibration.mkdir(parents=True)
    (calibration / "manifest.json").write_text(json.dumps({"kind": "quantized-model"}))
    (tmp_path / "spacing-quad" / "broken").mkdir()
    (tmp_path / "spacing-quad" / "broken" / "manifest.json").write_text("{")  # being written
    note = other_precision_note(tmp_path, "fp32")
    assert note is not None and "2 at tf32 (e.g. spacing-quad/fp-ddim100-tf32)" in note and "none at fp32" in note
    assert "--set precision=" in note
    assert other_precision_note(tmp_path, "tf32") is None
    _run(tmp_path / "spacing-quad" / "fp-ddim100", None)  # an older run without the field: fp32
    assert other_precision_note(tmp_path, "fp32") is None
    assert other_precision_note(tmp_path / "missing", "fp32") is None


@pytest.mark.parametrize(("notebooks", "precision", "noted"), [
    (["table1_bitwidth"], "auto", True),  # the CPU's auto is fp32
    (["table1_bitwidth"], "tf32", False),
    (["model_card"], "auto", False),  # reads no table runs
])
def test_reproduce_prints_the_note_before_the_first_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             notebooks: list[str], precision: str, noted: bool) -> None:
    _run(tmp_path / "runs" / "paper" / "spacing-quad" / "fp-ddim100-tf32", "tf32")
    monkeypatch.setattr(reproduce_module, "_run_one", lambda name, parameters, out: NotebookResult(name, True, 0.0))
    monkeypatch.setattr(reproduce_module, "_record", lambda *args: None)
    lines: list[str] = []
    reproduce("paper", reports_dir=tmp_path / "reports", runs_dir=tmp_path / "runs", notebooks=notebooks,
              overrides={"device": "cpu", "precision": precision}, progress=lines.append)
    assert lines[0].startswith("note: ") == noted
    assert sum(line.startswith("note: ") for line in lines) == int(noted)
