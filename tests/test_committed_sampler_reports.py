"""The committed paper-preset sampler tables of each model are what its committed summaries give.

The tables are made here as the samplers notebook makes them on a CPU from `data/summaries` (samplers without
every run's summary left out, per-seed distances read only against the fp images they were measured on):
samplers_fid (FID, IS and their intervals, paired verdicts), samplers (mean per-seed relative L2 to fp with its
interval) and samplers_paired (MoDiff minus direct per sampler), and the warm-up tables warmup_steps and
warmup_steps_paired from the warm-up per-seed table kept beside the summaries (read back, never sampled: the
test refuses to run without it). Each is written and read back as CSV and compared with the committed CSV cell
by cell. A summary changed without the report rendered again (or the other way round) fails here; so does a
change of the table code that moves a committed number. The findings (markdown) are not pinned.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch import nn

import modiff as md
from analysis import experiments
from analysis import intervals as ci
from modiff.metrics.bootstrap import BootstrapConfig

ROOT = Path(__file__).resolve().parents[1]
SEEDS, WARMUP_SEEDS, STEPS = range(10_000), range(1024), 100  # the paper preset's num_samples, warmup_samples, steps
PRESETS, WARMUP_PRESET, WARMUPS, WARMUP_ENOUGH = ["w8a4", "w8a4-modiff"], "w8a4-modiff", [1, 2, 4, 5, 8], 5  # its defaults


def _read_back(table: pd.DataFrame) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(table.to_csv(index=False)))


def _sampler_tables(model: nn.Module, runs: Path) -> dict[str, pd.DataFrame]:
    """The notebook's sampler cells at the paper preset (`modiff reproduce --preset paper --notebooks samplers
    --runs data/summaries --set precision=tf32 --set calibrate=false --set missing_runs=skip`), without papermill."""
    samplers, _ = experiments.samplers_to_run(model, PRESETS, experiments.paper_samplers(STEPS), SEEDS, runs, "skip",
                                              "cpu", "tf32")
    by_sampler = experiments.sampler_runs(model, PRESETS, samplers, SEEDS, runs, device="cpu", precision="tf32")
    scores = experiments.sampler_scores(by_sampler, SEEDS, bootstrap=BootstrapConfig(resamples=300), device="cpu")
    per_seed, _ = experiments.sampler_per_seed(by_sampler, SEEDS)
    paired = pd.concat([ci.paired_table(part, "preset", "rel_l2_pixels", PRESETS[0]).assign(sampler=s, steps=k)
                        for (s, k), part in per_seed.groupby(["sampler", "steps"], sort=False)], ignore_index=True)
    return {"samplers_fid": scores, "samplers": ci.summarize(per_seed, ["sampler", "steps", "preset", "precision"],
                                                             "rel_l2_pixels"), "samplers_paired": paired}


def _warmup_tables(model: nn.Module, runs: Path) -> dict[str, pd.DataFrame]:
    """The notebook's warm-up cells, reading the kept per-seed table (`warmup_per_seed` would sample without it)."""
    kept, _ = experiments.warmup_location(model, WARMUP_PRESET, WARMUPS, WARMUP_SEEDS, STEPS, runs)
    assert kept.exists() and kept.with_suffix(".json").exists(), f"{kept} (and its .json) must be committed"
    per_seed = experiments.warmup_per_seed(model, WARMUP_PRESET, WARMUPS, WARMUP_SEEDS, STEPS, runs_dir=runs)
    return {"warmup_steps": ci.summarize(per_seed, ["preset", "warmup_steps", "precision"], "rel_l2_pixels"),
            "warmup_steps_paired": experiments.warmup_paired(per_seed, WARMUPS[0], WARMUP_ENOUGH)}


def _assert_same(name: str, made: pd.DataFrame, committed: pd.DataFrame) -> None:
    assert made.columns.tolist() == committed.columns.tolist() and len(made) == len(committed), name
    numeric = committed.select_dtypes("number").columns
    np.testing.assert_allclose(made[numeric].to_numpy(float), committed[numeric].to_numpy(float), rtol=1e-9,
                               equal_nan=True, err_msg=name)
    text = committed.columns.difference(numeric)
    pd.testing.assert_frame_equal(made[text].fillna(""), committed[text].fillna(""), obj=name)


@pytest.mark.slow
@pytest.mark.parametrize("model_name, report, summaries, warmup", [
    ("fmnist-ddim", "paper", "paper", True), ("fmnist-ldm", "paper-fmnist-ldm", "paper-fmnist-ldm", True),
    ("fmnist-ddim", "reproducibility/paper-h200", "h200/paper", False)])  # the H200 set: its warm-up is the main report's
def test_committed_sampler_tables_are_what_the_committed_summaries_give(model_name: str, report: str, summaries: str,
                                                                       warmup: bool) -> None:
    model = md.load_model(model_name)
    runs = ROOT / "data" / "summaries" / summaries
    made = {**_sampler_tables(model, runs), **(_warmup_tables(model, runs) if warmup else {})}
    for name, table in made.items():
        committed = pd.read_csv(ROOT / "reports" / report / "tables" / f"{name}.csv")
        _assert_same(name, _read_back(table), committed)
