"""`modiff report-diff`: a regenerated report's tables against the committed ones, on hand-made tables."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from modiff.cli.main import main
from modiff.pipelines import report_claims, report_diff
from modiff.pipelines.report_diff import compare_reports, compare_tables, compare_verdicts, interval_columns


def test_intervals_name_their_estimate_and_ambiguous_ones_are_left_out() -> None:
    columns = ["fid_classifier", "fid_ci95_low", "fid_ci95_high", "is_classifier", "is_std", "is_ci95_low",
               "is_ci95_high", "mean", "ci95_low", "ci95_high", "with", "with: ci95_low", "with: ci95_high",
               "orphan_ci95_low", "psnr_std", "psnr_ci95_low", "psnr_ci95_high"]
    assert interval_columns(columns) == [("fid_classifier", "fid_ci95_low", "fid_ci95_high"),
                                         ("is_classifier", "is_ci95_low", "is_ci95_high"),  # is_std is a spread
                                         ("mean", "ci95_low", "ci95_high"), ("with", "with: ci95_low", "with: ci95_high")]
    # a spread alone is no estimate: its interval is left out
    assert interval_columns(["psnr_std", "psnr_ci95_low", "psnr_ci95_high"]) == []
    paired = ["preset", "mean_difference", "ci95_low", "ci95_high"]
    assert interval_columns(paired) == [("mean_difference", "ci95_low", "ci95_high")]
    assert interval_columns([*paired, "mean"]) == []  # which mean the interval bounds is not known


COMMITTED = pd.DataFrame({"name": ["a", "b", "c"], "mean": [1.0, 2.0, 4.0], "ci95_low": [0.5, 1.5, 3.0],
                          "ci95_high": [1.5, 2.5, 5.0], "n": [12, 12, 12]})


def test_a_table_that_moved_counts_cells_and_estimates_outside_the_committed_interval() -> None:
    regenerated = COMMITTED.assign(name=["a", "B", "c"], mean=[1.0, 3.0, 4.0 * (1 + 1e-12)])
    got = compare_tables(COMMITTED, regenerated)
    assert got["numeric_cells"] == 12 and got["numeric_changed"] == 1  # 1e-12 relative counts as unchanged
    assert got["largest_relative_change"] == pytest.approx(0.5) and got["in_column"] == "mean"
    assert got["text_cells_changed"] == 1
    assert (got["estimates_with_interval"], got["inside_committed_interval"]) == (3, 2)
    assert got["largest_estimate_move"] == pytest.approx(1.0) and got["note"] == ""


def test_missing_and_infinite_values_are_left_out_without_warnings(recwarn: pytest.WarningsRecorder) -> None:
    committed = COMMITTED.assign(mean=[float("inf"), float("nan"), 4.0])
    got = compare_tables(committed, committed.assign(mean=[float("inf"), 2.0, 4.0]))
    assert (got["estimates_with_interval"], got["numeric_changed"]) == (1, 1) and not recwarn.list
    assert got["numeric_cells"] == 11  # the mean that appeared is a cell, so changed cells never exceed cells


def test_an_identical_table_did_not_move_and_other_shapes_are_compared_on_what_they_share() -> None:
    same = compare_tables(COMMITTED, COMMITTED.copy())
    assert (same["numeric_changed"], same["text_cells_changed"], same["largest_estimate_move"]) == (0, 0, 0.0)
    assert same["inside_committed_interval"] == 3
    dropped = compare_tables(COMMITTED, COMMITTED.drop(columns="n"))  # compared on the columns both have
    assert dropped["numeric_cells"] == 9 and dropped["inside_committed_interval"] == 3
    assert dropped["note"] == "columns dropped: n"
    added = compare_tables(COMMITTED, COMMITTED.assign(kid=1.0, mean=[1.0, 2.0, 8.0]))
    assert added["numeric_changed"] == 1 and added["note"] == "columns added: kid"
    assert "no column in common" in compare_tables(COMMITTED, pd.DataFrame({"other": [1]}))["note"]
    fewer = compare_tables(COMMITTED, COMMITTED.iloc[:2])  # the rows of both, matched by the first column
    key = COMMITTED.columns[0]
    assert fewer["rows"] == 2 and fewer["numeric_changed"] == 0
    assert fewer["note"] == f"the 2 rows of both compared (by {key}); only in the committed: {COMMITTED[key].iloc[2]}"
    extra = COMMITTED.iloc[:1].assign(**{key: "new-row"})
    moved = COMMITTED.copy()
    moved.loc[0, "mean"] = moved.loc[0, "mean"] * 2
    more = compare_tables(COMMITTED, pd.concat([moved.iloc[::-1], extra], ignore_index=True))  # reordered, one added
    assert more["rows"] == 3 and more["numeric_changed"] == 1 and more["in_column"] == "mean"
    assert more["note"].endswith("only in the regenerated: new-row")
    assert "not comparable" in compare_tables(COMMITTED, pd.concat([COMMITTED, COMMITTED]))["note"]  # no unique key
    table1 = COMMITTED.rename(columns={"name": "preset"}).assign(numerics="same")[["numerics", "preset", "mean"]]
    assert compare_tables(table1, table1.iloc[:2])["note"].startswith("the 2 rows of both compared (by preset)")



def test_rows_no_column_names_alone_are_matched_by_their_identity_columns() -> None:
    """A sampler table names a row by sampler, steps and preset together; one report leaving a sampler's pair out
    is compared on the other rows, and the note names the pair by all three."""
    committed = pd.DataFrame({"sampler": ["ddim", "ddim", "ddpm", "ddpm"], "steps": [20, 20, 100, 100],
                              "preset": ["w8a4", "w8a4-modiff"] * 2, "precision": "tf32 on cuda",
                              "mean": [0.4, 0.1, 0.6, 0.3]})
    regenerated = pd.concat([committed.iloc[2:].assign(mean=[0.6, 0.6]), committed.iloc[:2]], ignore_index=True)
    regenerated.loc[len(regenerated)] = ["ddim", 100, "w8a4", "tf32 on cuda", 0.37]
    got = compare_tables(committed, regenerated)
    assert got["rows"] == 4 and got["numeric_changed"] == 1 and got["in_column"] == "mean"
    assert got["note"] == ("the 4 rows of both compared (by sampler, steps, preset); "
                           "only in the regenerated: ddim 100 w8a4")
    assert compare_tables(regenerated, committed)["note"].endswith("only in the committed: ddim 100 w8a4")
    twice = pd.concat([regenerated, regenerated.iloc[:1]], ignore_index=True)
    assert "not comparable" in compare_tables(committed, twice)["note"]


def test_paired_verdicts_given_in_both_are_counted_and_the_changed_ones_named() -> None:
    """A verdict compares by its word, not its interval; a verdict one table does not give (a score one report
    lacks) is not compared; a text column that is not all verdicts (a note) is not read as one."""
    committed = pd.DataFrame({"preset": ["w4a8", "w4a8-modiff", "w8a4"], "fid": [28.4, 28.4, 5.1],
                              "vs_anchor": ["no difference: +0.008 [-0.021, +0.036]", "better: -0.1 [-0.2, -0.05]", ""],
                              "vs_kid": [None, None, None], "note": ["better: a note", "", "worse, see the log"]})
    regenerated = committed.assign(vs_anchor=["better: -0.112 [-0.138, -0.084]", "better: -0.117 [-0.138, -0.102]",
                                              "worse: +3.7 [+3.6, +3.9]"],
                                   vs_kid=["worse: +0.01 [+0.005, +0.02]", None, None],
                                   note=["better: a note", "", "a note, not a verdict"])
    got = compare_tables(committed, regenerated)
    assert (got["verdicts_compared"], got["verdicts_changed"]) == (2, 1)
    assert got["note"] == "verdicts changed: w4a8 vs_anchor: no difference -> better"
    fewer = compare_tables(committed, regenerated.iloc[[1, 0]])  # matched by preset: the flip keeps its row's name
    assert fewer["verdicts_changed"] == 1 and fewer["note"].endswith("verdicts changed: w4a8 vs_anchor: "
                                                                     "no difference -> better")
    assert compare_tables(committed, committed.copy())["verdicts_compared"] == 2
    empty = committed.iloc[:0]  # a table with its columns and no rows (a finding with nothing to list)
    assert (compare_tables(empty, empty.copy())["verdicts_compared"], compare_tables(empty, empty.copy())["rows"]) == (0, 0)
    assert compare_tables(empty, committed)["note"].startswith("the 0 rows of both compared (by preset); only in the "
                                                               "regenerated: w4a8, w4a8-modiff, w8a4")

def _report(folder: Path, tables: dict[str, pd.DataFrame]) -> Path:
    (folder / "tables").mkdir(parents=True)
    for name, table in tables.items():
        table.to_csv(folder / "tables" / f"{name}.csv", index=False)
    return folder


def test_reports_are_compared_table_by_table(tmp_path: Path) -> None:
    old = _report(tmp_path / "old", {"t1": COMMITTED, "gone": COMMITTED})
    new = _report(tmp_path / "new", {"t1": COMMITTED.assign(mean=[1.0, 2.0, 9.0]), "added": COMMITTED})
    got = compare_reports(old, new).set_index("table")
    assert got.loc["t1", "inside_committed_interval"] == 2
    assert got.loc["gone", "note"] == "only in the committed report" and got.loc["added", "note"] == "only in the regenerated report"
    with pytest.raises(FileNotFoundError, match="does not exist: give two report folders"):
        compare_reports(old, tmp_path / "nowhere")
    (old / "tables" / "empty.csv").write_text("\n")  # an empty table as saved before sitting 47
    (new / "tables" / "empty.csv").write_text("preset,design_effect\n")
    assert "empty" in compare_reports(old, new)["table"].tolist()


def test_verdicts_are_judged_on_either_report_and_changes_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _report(tmp_path / "old", {}), _report(tmp_path / "new", {})
    unmeasured = compare_verdicts(old, new)
    assert len(unmeasured) == len(report_claims.CLAIMS) and set(unmeasured["committed"]) == {"not measured"}
    assert not unmeasured["changed"].any()
    judged = {old: ["reproduced", "partly", "partly"], new: ["reproduced", "not reproduced", "not measured"]}
    monkeypatch.setattr(report_diff.report_claims, "claims", lambda folder: [
        report_claims.Claim(f"claim {i}", verdict, "", "", "") for i, verdict in enumerate(judged[folder])])
    got = compare_verdicts(old, new)
    assert got["changed"].tolist() == [False, True, False] and got.loc[1, "regenerated"] == "not reproduced"
    assert got["compared"].tolist() == [True, True, False]  # a notebook not rerun: not compared, not changed
    page = report_diff.render(pd.DataFrame(), got, old, new).markdown()
    assert "The summary's verdicts: 1 of 2 changed (1 not measured in the regenerated report" in page


def test_the_command_prints_the_page_and_writes_it_where_asked(tmp_path: Path) -> None:
    old, new = _report(tmp_path / "old", {"t1": COMMITTED}), _report(tmp_path / "new", {"t1": COMMITTED})
    out = tmp_path / "diff.md"
    result = CliRunner().invoke(main, ["report-diff", str(old), str(new), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| t1 | 3 |" in result.output and out.read_text() == result.output
    assert f"The summary's verdicts: 0 of {len(report_claims.CLAIMS)} changed." in result.output
    assert pd.read_csv(out.with_suffix(".csv"))["table"].tolist() == ["t1"]
    missing = CliRunner().invoke(main, ["report-diff", str(old), str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_an_out_file_in_a_missing_folder_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    old = _report(tmp_path / "old", {"t1": COMMITTED})
    result = CliRunner().invoke(main, ["report-diff", str(old), str(old), "--out", str(tmp_path / "no" / "diff.md")])
    assert result.exit_code != 0 and "does not exist: create it first" in result.output
    assert not (tmp_path / "no").exists()
