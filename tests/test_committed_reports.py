"""The committed paper-preset Table 1 of each model is what its committed summaries give.

The table is made here as the table1 notebook makes it on a CPU from `data/summaries` (rows without a summary
left out, the shipped calibration), written and read back as CSV, and compared with the committed CSV cell by
cell: every score, interval, verdict, distance and note. A summary changed without the report rendered again
(or the other way round) fails here; so does a change of the table code that moves a committed number.
The image agreement tables the reproducibility log cites (two GPUs' summaries) are checked the same way.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import modiff as md
from analysis import table1
from modiff.metrics.bootstrap import BootstrapConfig

ROOT = Path(__file__).resolve().parents[1]
W_BITS, A_BITS = (8, 4), (8, 6, 4, 3, 2)
PRESETS = [f"w{w}a{a}{s}" for w in W_BITS for a in A_BITS for s in ("", "-modiff")]


def _table(model_name: str, summaries: str) -> pd.DataFrame:
    """The notebook's cells at the paper preset (`modiff reproduce --preset paper --runs data/summaries --set
    precision=tf32 --set calibrate=false --set missing_runs=skip`), without papermill."""
    model = md.load_model(model_name)
    runs = ROOT / "data" / "summaries" / summaries
    config = table1.table_config(model, 100, "quad", "tf32")
    rows, _ = table1.row_presets(model, PRESETS, [f"published-{p}" for p in PRESETS], [f"qdiff-{p}" for p in PRESETS],
                                 True, False)
    rows, _ = table1.rows_to_score(model, rows, range(10_000), config, runs, "skip", "cpu")
    table = table1.scored_table(model, rows, range(10_000), config, runs, device="cpu",
                                bootstrap=BootstrapConfig(resamples=300))
    return pd.read_csv(io.StringIO(table1.paper_columns(table, model).to_csv(index=False)))


@pytest.mark.slow
@pytest.mark.parametrize("model_name, report, summaries", [
    ("fmnist-ddim", "paper", "paper"), ("fmnist-ldm", "paper-fmnist-ldm", "paper-fmnist-ldm"),
    ("fmnist-ddim", "reproducibility/paper-h200", "h200/paper")])
def test_committed_table1_is_what_the_committed_summaries_give(model_name: str, report: str, summaries: str) -> None:
    committed = pd.read_csv(ROOT / "reports" / report / "tables" / "table1_bitwidth.csv")
    made = _table(model_name, summaries)
    assert made.columns.tolist() == committed.columns.tolist() and made.preset.tolist() == committed.preset.tolist()
    numeric = committed.select_dtypes("number").columns
    np.testing.assert_allclose(made[numeric].to_numpy(float), committed[numeric].to_numpy(float), rtol=1e-9,
                               equal_nan=True)
    text = committed.columns.difference(numeric)
    pd.testing.assert_frame_equal(made[text].fillna(""), committed[text].fillna(""))
    no_distances = committed.note.astype(object).fillna("").str.contains(table1.NO_DISTANCES, regex=False)
    assert committed.rel_l2_pixels[~no_distances & (committed.preset != "fp")].gt(0).all()



@pytest.mark.parametrize("kept, first, second", [
    ("paper-h100-sitting51/image_agreement.csv", "h200/paper", "h100/paper"),
    ("paper-fmnist-ldm-h100-sitting52/image_agreement.csv", "h200/paper-fmnist-ldm", "paper-fmnist-ldm"),
    ("paper-h200/image_agreement_h100_twice.csv", "h100/paper", "paper"),
    ("paper-h200/image_agreement_h200_h100.csv", "h200/paper", "paper")])
def test_committed_image_agreement_is_what_the_committed_summaries_give(kept: str, first: str, second: str) -> None:
    """Two samplings' images compared (`modiff image-diff`: two GPUs, or two processes on one), as the
    reproducibility log cites them."""
    from modiff.pipelines.agreement import agreement_rows

    summaries = ROOT / "data" / "summaries"
    committed = pd.read_csv(ROOT / "reports" / "reproducibility" / kept)
    made = pd.DataFrame(agreement_rows(summaries / first, summaries / second))
    made = pd.read_csv(io.StringIO(made.to_csv(index=False)))
    pd.testing.assert_frame_equal(made, committed)


@pytest.mark.parametrize("model_name, report, summaries", [("fmnist-ddim", "paper", "h200/paper"),
                                                            ("fmnist-ldm", "paper-fmnist-ldm", "paper-fmnist-ldm")])
def test_committed_design_effects_are_what_the_committed_summaries_give(model_name: str, report: str,
                                                                         summaries: str) -> None:
    """The published-code audit's design effects (the notebook's cell at the paper preset) from the per-seed
    distances of the committed summaries: a summary set swapped without the audit rendered again fails here.
    `fmnist-ddim`'s audit reads the H200 set, the only one holding every published row and the scale-sharing runs."""
    from analysis import scale_sharing

    model = md.load_model(model_name)
    published = scale_sharing.published_presets()
    presets = list(dict.fromkeys([*published, *(p.replace("published-lsun-", "").replace("published-", "")
                                                for p in published)]))
    made = scale_sharing.design_effects(model, presets, range(10_000), table1.table_config(model, 100, "quad", "tf32"),
                                       ROOT / "data" / "summaries" / summaries, device="cpu")
    made = pd.read_csv(io.StringIO(made.to_csv(index=False)))
    committed = pd.read_csv(ROOT / "reports" / report / "tables" / "published_design_effect.csv")
    pd.testing.assert_frame_equal(made, committed, check_exact=False, rtol=1e-9)
