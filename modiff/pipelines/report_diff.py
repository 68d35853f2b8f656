"""A regenerated report against the committed one, table by table (`modiff report-diff`).

A report regenerated on another machine need not match to the digit: a float32 sum that rounds differently
on another CPU can put a value of a 3-4 bit network on the other side of a rounding tie, and the sample
trajectory moves away from there. Full-precision rows then agree to a few parts in 1e5 while quantized rows
move within their sampling error. This says how far each table moved, and whether the regenerated
estimates fall inside the committed 95% intervals.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from modiff.pipelines import report_claims
from modiff.pipelines.report_render import Document

__all__ = ["compare_reports", "compare_tables", "compare_verdicts", "interval_columns", "render"]

CHANGED = 1e-9  # relative: below this a number counts as unchanged (a CSV round trip)
# Columns that say which run or setting a row is, not what was measured: together they match rows across reports.
IDENTITY_COLUMNS = ("sampler", "steps", "preset", "baseline", "warmup_steps", "layer", "timestep")
# A paired verdict cell, as the tables write them ("better: -3.43 [-3.56, -3.29]"): its first word is the verdict.
VERDICT = re.compile(r"^(better|worse|no difference)(:|$)")


def interval_columns(columns: list[str]) -> list[tuple[str, str, str]]:
    """(estimate, ci95_low, ci95_high) column triples: ``X_ci95_low``/``X_ci95_high`` (or ``X: ci95_low``) bound
    ``X``, or the one other column starting with ``X_`` that is not a spread (``fid_ci95_low`` bounds
    ``fid_classifier``, ``is_ci95_low`` bounds ``is_classifier`` beside ``is_std``); bare ``ci95_low`` bounds
    ``mean``, or ``mean_difference`` in a paired table. An interval whose estimate is ambiguous is left out."""
    triples = []
    for low in (c for c in columns if c.endswith("ci95_low")):
        prefix = low[: -len("ci95_low")]
        high = prefix + "ci95_high"
        if high not in columns:
            continue
        if not prefix:
            means = [c for c in ("mean", "mean_difference") if c in columns]
            estimate: Optional[str] = means[0] if len(means) == 1 else None
        elif prefix.rstrip("_: ") in columns:
            estimate = prefix.rstrip("_: ")
        else:
            candidates = [c for c in columns if c.startswith(prefix) and "ci95" not in c and not c.endswith("_std")]
            estimate = candidates[0] if len(candidates) == 1 else None
        if estimate is not None:
            triples.append((estimate, low, high))
    return triples


def _numeric(frame: pd.DataFrame, column: str) -> Optional[np.ndarray]:
    return frame[column].to_numpy(float) if pd.api.types.is_numeric_dtype(frame[column]) else None


def compare_tables(committed: pd.DataFrame, regenerated: pd.DataFrame) -> dict[str, object]:
    """How far one table moved: numeric cells changed and the largest relative change (and its column),
    text cells changed (verdicts, findings), and for every estimate with a 95% interval how many regenerated
    estimates lie inside the committed interval and the largest absolute change of an estimate. Tables of the
    same columns but another number of rows are compared on the rows both have, matched by their ``preset`` column
    (else the first) where it names each row once, else by the identity columns it has (``sampler``, ``steps``,
    ``preset``, ...) where together they do, and the note names the rows only one of them has. Columns added or
    dropped are left out of the comparison and named in the note."""
    common = [c for c in committed.columns if c in set(regenerated.columns)]
    if not common:
        return {"note": f"not comparable: {committed.shape} against {regenerated.shape}, no column in common"}
    changes = {side: [c for c in frame.columns if c not in set(common)]
               for side, frame in (("added", regenerated), ("dropped", committed))}
    committed, regenerated = committed[common], regenerated[common]
    result = _compare_common_rows(committed, regenerated) if len(committed) != len(regenerated) else \
        _compare_aligned(committed, regenerated)
    flipped = result.pop("flipped", [])
    notes = [result.get("note", "")] + ([f"verdicts changed: {'; '.join(flipped)}"] if flipped else [])
    notes += [f"columns {side}: {', '.join(names)}" for side, names in changes.items() if names]
    return {**result, "note": "; ".join(n for n in notes if n)}


def _row_key(committed: pd.DataFrame, regenerated: pd.DataFrame) -> Optional[list[str]]:
    """The columns that name each row once in both tables: ``preset`` (else the first column) alone, else the
    identity columns the tables have; None when neither does."""
    single = ["preset" if "preset" in committed.columns else committed.columns[0]]
    identity = [c for c in committed.columns if c in IDENTITY_COLUMNS]
    for key in (single, identity):
        if key and not (committed.duplicated(key).any() or regenerated.duplicated(key).any()):
            return key
    return None


def _compare_common_rows(committed: pd.DataFrame, regenerated: pd.DataFrame) -> dict[str, object]:
    key = _row_key(committed, regenerated)
    if key is None:
        return {"note": f"not comparable: {committed.shape} against {regenerated.shape}, and no column names each "
                        f"row once"}
    index = [frame.set_index(key).index for frame in (committed, regenerated)]
    common = index[0][index[0].isin(index[1])]
    only = {side: [" ".join(str(v) for v in np.atleast_1d(k)) for k in rows[~rows.isin(common)]]
            for side, rows in zip(("committed", "regenerated"), index)}
    by_key = [frame.set_index(key).loc[common].reset_index()[frame.columns] for frame in (committed, regenerated)]
    result = _compare_aligned(*by_key)
    result["note"] = f"the {len(common)} rows of both compared (by {', '.join(key)}); " + "; ".join(
        f"only in the {side}: {', '.join(names)}" for side, names in only.items() if names)
    return result


def _compare_aligned(committed: pd.DataFrame, regenerated: pd.DataFrame) -> dict[str, object]:
    numeric_cells = changed = text_changed = 0
    largest, largest_column = 0.0, ""
    for column in committed.columns:
        old, new = _numeric(committed, column), _numeric(regenerated, column)
        if old is None or new is None:
            text = [frame[column].fillna("").astype(str) for frame in (committed, regenerated)]
            text_changed += int((text[0] != text[1]).sum())
            continue
        both = np.isfinite(old) & np.isfinite(new)
        relative = np.abs(old[both] - new[both]) / np.maximum(np.abs(old[both]), 1e-12)
        numeric_cells += int((np.isfinite(old) | np.isfinite(new)).sum())  # a number in one table only counts as changed
        changed += int((relative > CHANGED).sum()) + int((np.isfinite(old) != np.isfinite(new)).sum())
        if relative.size and relative.max() > largest:
            largest, largest_column = float(relative.max()), column
    estimates = inside = 0
    largest_move = 0.0
    for estimate, low, high in interval_columns(list(committed.columns)):
        values = [_numeric(frame, c) for frame, c in ((regenerated, estimate), (committed, low), (committed, high),
                                                       (committed, estimate))]
        if any(v is None for v in values):
            continue
        new, lo, hi, old = values
        known = np.isfinite(new) & np.isfinite(lo) & np.isfinite(hi) & np.isfinite(old)
        estimates += int(known.sum())
        inside += int(((new >= lo) & (new <= hi))[known].sum())
        if known.any():
            largest_move = max(largest_move, float(np.abs(new[known] - old[known]).max()))
    compared, flipped = _compare_verdict_cells(committed, regenerated)
    return {"rows": len(committed), "numeric_cells": numeric_cells, "numeric_changed": changed,
            "largest_relative_change": largest, "in_column": largest_column, "text_cells_changed": text_changed,
            "estimates_with_interval": estimates, "inside_committed_interval": inside,
            "largest_estimate_move": largest_move, "verdicts_compared": compared, "verdicts_changed": len(flipped),
            "note": "", "flipped": flipped}


def _compare_verdict_cells(committed: pd.DataFrame, regenerated: pd.DataFrame) -> tuple[int, list[str]]:
    """Paired verdicts (better, worse, no difference) given in both tables, and the ones whose word changed, each
    named by its row (the columns that name it, `_row_key`) and column: 'w4a8 vs_weights_only: no difference ->
    better'. A column is a verdict column where every cell given on either side is a verdict."""
    label_columns = _row_key(committed, regenerated) or [committed.columns[0]]
    labels = [" ".join(map(str, row)) for row in committed[label_columns].itertuples(index=False)]
    compared, flipped = 0, []
    for column in committed.columns:
        if _numeric(committed, column) is not None and _numeric(regenerated, column) is not None:
            continue
        cells = [frame[column].fillna("").astype(str).tolist() for frame in (committed, regenerated)]
        given = [cell for side in cells for cell in side if cell]
        if not given or not all(VERDICT.match(cell) for cell in given):
            continue
        for label, old, new in zip(labels, *cells):
            if old and new:
                compared += 1
                old_word, new_word = (VERDICT.match(cell).group(1) for cell in (old, new))
                if old_word != new_word:
                    flipped.append(f"{label} {column}: {old_word} -> {new_word}")
    return compared, flipped


def compare_reports(committed: str | Path, regenerated: str | Path) -> pd.DataFrame:
    """One row per table (``tables/*.csv``) of either report folder; a table in only one is named so."""
    folders = [Path(committed) / "tables", Path(regenerated) / "tables"]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: give two report folders (for example reports/quick)")
    names = sorted({p.stem for folder in folders for p in folder.glob("*.csv")})
    rows = []
    for name in names:
        paths = [folder / f"{name}.csv" for folder in folders]
        if not all(p.exists() for p in paths):
            rows.append({"table": name, "note": f"only in the {'committed' if paths[0].exists() else 'regenerated'} report"})
            continue
        rows.append({"table": name, **compare_tables(*(_read_table(p) for p in paths))})
    return pd.DataFrame(rows)


def _read_table(path: Path) -> pd.DataFrame:
    """A table's CSV; an empty file (what an empty table without columns was saved as before sitting 47) is
    an empty table."""
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def compare_verdicts(committed: str | Path, regenerated: str | Path) -> pd.DataFrame:
    """The summary's verdict on each of the paper's claims (`report_claims`), judged on either report's tables. A
    claim the regenerated report does not measure (its notebooks not rerun: a partial regeneration) is not
    compared, rather than counted as changed."""
    pairs = zip(report_claims.claims(committed), report_claims.claims(regenerated))
    return pd.DataFrame([{"claim": old.claim, "committed": old.verdict, "regenerated": new.verdict,
                          "compared": new.verdict != "not measured" or old.verdict == "not measured",
                          "changed": old.verdict != new.verdict and new.verdict != "not measured"}
                         for old, new in pairs])


def render(table: pd.DataFrame, verdicts: pd.DataFrame, committed: str | Path, regenerated: str | Path) -> Document:
    """The comparison as a page: what was compared, the verdicts, then the tables."""
    doc = Document(f"{regenerated} against {committed}")
    doc.heading(1, f"`{regenerated}` against `{committed}`")
    doc.paragraph("The summary's verdicts on the paper's claims, judged by the same rules on either report's tables; "
                  "then per table: numeric cells (a number in either table) and those changed by more than 1e-9 relative "
                  "or present in one table only, the largest relative change and "
                  "its column, text cells changed (verdicts, findings), how many regenerated estimates with a 95% "
                  "interval lie inside the committed interval, with the largest move of an estimate, and how many "
                  "paired verdicts (better, worse, no difference) given in both changed their word, named in the "
                  "note.")
    changed = int(verdicts["changed"].sum()) if len(verdicts) else 0
    absent = int((~verdicts["compared"]).sum()) if len(verdicts) else 0
    doc.table(verdicts, caption=f"The summary's verdicts: {changed} of {len(verdicts) - absent} changed"
              + (f" ({absent} not measured in the regenerated report: their notebooks were not rerun)." if absent else "."))
    doc.table(table, caption="The tables.")
    return doc
