"""The README's results are the committed reports' results, and the documents' links lead somewhere.

The README's verdict table must say what the summaries at the top of the two paper indexes say, claim by claim,
and its Table 1 excerpt must show each committed table's FID and interval to three significant figures (the
paper's column: the paper values the committed table carries). A report rendered again without the README
following, or a README edited by hand, fails here.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAPER_REPORTS = ("paper", "paper-fmnist-ldm")
DOCUMENTS = [README, ROOT / "reports" / "README.md", ROOT / "reports" / "reproducibility" / "README.md",
             ROOT / "benchmarks" / "README.md"]


def table_after(text: str, marker: str) -> list[list[str]]:
    """The body rows of the first markdown table after the line holding ``marker``."""
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|")) + 2  # past header and separator
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def index_verdicts(report: str) -> list[str]:
    index = (ROOT / "reports" / report / "index.md").read_text()
    return [row[1] for row in table_after(index, "## Summary: the paper's claims")]


def fid_cell(table: pd.DataFrame, preset: str) -> str:
    if preset not in table.index:
        return "-"
    row = table.loc[preset]
    return f"{row.fid_classifier:#.3g} [{row.fid_ci95_low:#.3g}, {row.fid_ci95_high:#.3g}]"


def test_the_verdict_table_says_what_the_paper_indexes_say() -> None:
    rows = table_after(README.read_text(), "<!-- verdicts:")
    for column, report in enumerate(PAPER_REPORTS, start=1):
        assert [row[column] for row in rows] == index_verdicts(report), report


def test_the_table1_excerpt_is_the_committed_tables() -> None:
    rows = table_after(README.read_text(), "<!-- table1:")
    tables = [pd.read_csv(ROOT / "reports" / r / "tables" / "table1_bitwidth.csv").set_index("preset")
              for r in PAPER_REPORTS]
    assert len(rows) >= 10
    for preset, *cells, paper in rows:
        preset = preset.strip("`")
        assert cells == [fid_cell(table, preset) for table in tables], preset
        published = tables[0].paper_fid.get(preset, float("nan"))
        assert paper == ("-" if pd.isna(published) else f"{published:g}"), preset


def test_the_reproducibility_log_links_every_comparison_page() -> None:
    folder = ROOT / "reports" / "reproducibility"
    log = (folder / "README.md").read_text()
    pages = {p.name for p in folder.glob("*.md")} - {"README.md"}
    assert pages and pages <= set(re.findall(r"\]\(([^)#]+\.md)\)", log))


def github_anchor(heading: str) -> str:
    """GitHub's id for a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    found = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_anchor_rule_matches_github() -> None:
    assert github_anchor("Runs that travel: summaries") == "runs-that-travel-summaries"
    assert github_anchor("Real W8A8 MoDiff (`bench_real.py`)") == "real-w8a8-modiff-bench_realpy"
    assert github_anchor("`reports/paper-fmnist-ldm/`") == "reportspaper-fmnist-ldm"


def _displayed(cell: str) -> list[tuple[float, float]]:
    """The numbers of a cell ("1.58 [1.47, 1.69]", "0.720"), each with half a unit of its last shown digit."""
    numbers = re.findall(r"-?\d+\.\d+|-?\d+", cell)
    return [(float(n), 0.5 * 10.0 ** -len(n.partition(".")[2]) + 1e-12) for n in numbers]


def _assert_shown(cell: str, values: list[float], what: str) -> None:
    shown = _displayed(cell)
    assert len(shown) == len(values), (what, cell)
    for (number, half_unit), value in zip(shown, values):
        assert abs(number - value) <= half_unit, (what, cell, value)


# Per score: its Table 1 columns (estimate, interval), its key in a metrics file, and the factor the README shows it at.
SCORES = [(("fid_classifier", "fid_ci95_low", "fid_ci95_high"), "fid", 1),
          (("is_classifier", "is_ci95_low", "is_ci95_high"), "is", 1),
          (("kid_classifier", "kid_ci95_low", "kid_ci95_high"), "kid", 1000),
          (("improved_precision", "improved_precision_ci95_low", "improved_precision_ci95_high"), "precision", 1),
          (("improved_recall", "improved_recall_ci95_low", "improved_recall_ci95_high"), "recall", 1)]


def test_the_metrics_table_shows_the_committed_scores() -> None:
    """The Metrics section's table: the floor from the shipped metrics file, each model's fp row from its committed
    Table 1 (all five scores with their intervals, KID x1000); the latent model's card shows the same fp scores."""
    import json

    text = README.read_text()
    rows = {row[0]: row[1:] for row in table_after(text, "| samples (classifier feature space), 10,000 each")}
    floor = json.loads((ROOT / "data" / "fmnist-ddim" / "metrics_fp_10k.json").read_text())["floor"]
    expected = {"floor: real against real (see below)":
                [[scale * floor[k] for k in ("is_mean" if key == "is" else key, f"{key}_ci95_low", f"{key}_ci95_high")]
                 for _, key, scale in SCORES]}
    for model, report in (("fmnist-ddim", "paper"), ("fmnist-ldm", "paper-fmnist-ldm")):
        fp = pd.read_csv(ROOT / "reports" / report / "tables" / "table1_bitwidth.csv").set_index("preset").loc["fp"]
        name = next(name for name in rows if name.startswith(f"`{model}`, fp"))
        expected[name] = [[scale * fp[c] for c in columns] for columns, _, scale in SCORES]
    assert set(rows) == set(expected)
    for name, scores in expected.items():
        for cell, values, (columns, _, _) in zip(rows[name], scores, SCORES):
            _assert_shown(cell, values, f"{name}: {columns[0]}")
    card = next(row for row in table_after(text, "## The embedded latent model") if row[0].startswith("FID / IS"))
    ldm = expected[next(name for name in rows if name.startswith("`fmnist-ldm`"))]
    _assert_shown(card[1], [values[0] for values in ldm], "fmnist-ldm card")
