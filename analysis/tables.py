"""Writing tables: CSV and Markdown under out_dir/tables/ (the only writer of table files)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["to_markdown", "save", "save_finding"]


def _text(value: object) -> str:
    """Cell text that keeps the table one row per line: ``|`` escaped, line breaks as spaces."""
    return str(value).replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")


def _cell(value: object, text_column: bool, digits: int) -> str:
    """Floats to ``digits`` significant digits; a missing value in a text column (None, NaN) or a nullable
    integer column (pd.NA: nothing to confuse it with) is an empty cell, in a float one ``nan``."""
    missing = value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))
    if (missing and text_column) or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{value:.{digits}g}"
    return _text(value)


def to_markdown(df: pd.DataFrame, as_given: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table (4 significant digits for floats, ``|`` in text escaped). The columns
    ``as_given`` hold transcribed numbers (the paper's): their floats keep up to 6 significant digits, so 143.39
    reads as the paper prints it, not as 143.4."""
    unknown = sorted(set(as_given) - set(df.columns))
    if unknown:
        raise ValueError(f"as_given names columns the table does not have: {unknown}")
    header = "| " + " | ".join(_text(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    text_columns = [not pd.api.types.is_numeric_dtype(dtype) for dtype in df.dtypes]
    digits = [6 if c in as_given else 4 for c in df.columns]
    rows = ["| " + " | ".join(_cell(v, text, d) for v, text, d in zip(row, text_columns, digits)) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def save(df: pd.DataFrame, name: str, out_dir: str | Path, as_given: Sequence[str] = ()) -> list[Path]:
    """Write df as out_dir/tables/<name>.csv and .md (``as_given``: see `to_markdown`); returns the paths. A
    table without columns is refused: its files would say nothing (give an empty table its columns)."""
    if len(df.columns) == 0:
        raise ValueError(f"table {name!r} has no columns; an empty table still names its columns")
    markdown = to_markdown(df, as_given)  # before any file: a refused table leaves none half-written
    folder = Path(out_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{name}.csv", folder / f"{name}.md"
    df.to_csv(csv, index=False)
    md.write_text(markdown)
    return [csv, md]


def save_finding(markdown: str, name: str, out_dir: str | Path) -> Path:
    """Write a notebook's finding (Markdown written from the numbers) as out_dir/tables/<name>_finding.md,
    where the report's index embeds it in the notebook's section; returns the path."""
    from modiff.pipelines.report_sections import FINDING_SUFFIX

    if not markdown.strip():
        raise ValueError(f"finding {name!r} is empty: a notebook saves the text it displays")
    folder = Path(out_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{FINDING_SUFFIX}"
    path.write_text(markdown.strip() + "\n")
    return path
