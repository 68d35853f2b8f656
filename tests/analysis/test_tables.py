"""The one writer of tables (`analysis.tables`): Markdown that renders as the table it holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import experiments, tables


def _cells(markdown: str) -> list[list[str]]:
    """Split the rows of a Markdown table into cells as a renderer does: on ``|`` not escaped."""
    rows = []
    for line in markdown.strip().splitlines():
        cells, current, chars = [], "", iter(line.strip()[1:-1])
        for char in chars:
            if char == "\\":
                current += char + next(chars)
            elif char == "|":
                cells.append(current.strip())
                current = ""
            else:
                current += char
        rows.append([*cells, current.strip()])
    return rows


def test_bars_in_text_are_escaped(tmp_path: Path) -> None:
    """A `|` in a header or a cell (`max |difference|` in the published audit) no longer adds columns."""
    df = pd.DataFrame({"check": ["per-step reset (max |difference|)", "two\nlines"], "value | unit": [0.0, 0.3645]})
    paths = tables.save(df, "audit", tmp_path)
    rows = _cells(paths[1].read_text())
    assert all(len(row) == 2 for row in rows)
    assert rows[0] == ["check", "value \\| unit"]
    assert rows[2] == ["per-step reset (max \\|difference\\|)", "0"] and rows[3] == ["two lines", "0.3645"]
    assert pd.read_csv(paths[0])["check"][0] == "per-step reset (max |difference|)"  # the CSV keeps the text


def test_a_table_without_columns_is_refused_and_an_empty_one_keeps_its_header(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no columns"):
        tables.save(pd.DataFrame(), "nothing", tmp_path)
    csv, md = tables.save(pd.DataFrame(columns=["preset", "design_effect"]), "empty", tmp_path)
    assert pd.read_csv(csv).columns.tolist() == ["preset", "design_effect"]
    assert md.read_text() == "| preset | design_effect |\n| --- | --- |\n"


def test_missing_text_is_an_empty_cell_and_missing_numbers_stay_nan() -> None:
    df = pd.DataFrame({"note": ["CIFAR-10", np.nan, None], "value": [4.24, np.nan, 1.0], "ok": [True, False, True]})
    rows = _cells(tables.to_markdown(df))
    assert rows[2:] == [["CIFAR-10", "4.24", "True"], ["", "nan", "False"], ["", "1", "True"]]


def test_paper_values_have_no_nan_notes() -> None:
    values = experiments.paper_values()
    assert values["note"].notna().all() and (values["note"] == "").any()
    assert values.loc[values["table"] == "Table 6", "weight_bits"].isna().all()  # the paper gives no bit widths there
    markdown = tables.to_markdown(values)
    assert "nan" not in markdown and "<NA>" not in markdown


def test_paper_values_read_as_the_paper_prints_them() -> None:
    markdown = tables.to_markdown(experiments.paper_values(["Table 1"]), as_given=["value"])
    cells = {row[1]: row[6] for row in _cells(markdown)[2:]}
    assert cells["W8A3 dynamic"] == "143.39" and cells["W8A4 Q-Diff"] == "332.75"
    assert cells["W8A32"] == "4.24" and cells["W8A32 GBops"] == "1636"
    assert "| 143.4 |" in tables.to_markdown(experiments.paper_values(["Table 1"]))  # without as_given: 4 digits


def test_as_given_refuses_a_column_the_table_lacks_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['paper_fid'\]"):
        tables.save(pd.DataFrame({"value": [1.0]}), "values", tmp_path, as_given=["paper_fid"])
    assert not (tmp_path / "tables" / "values.csv").exists() and not (tmp_path / "tables" / "values.md").exists()
