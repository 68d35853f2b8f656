"""Published rows scored against the same presets with the activation scale shared by another number of
samples (analysis.scale_sharing)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import modiff as md
from analysis import experiments, scale_sharing, table1
from modiff.metrics.bootstrap import BootstrapConfig
from modiff.pipelines.evaluate import seed_images
from modiff.pipelines.generate import generate
from modiff.pipelines.summary import run_scores
from modiff.quant.presets import PUBLISHED_BATCH, PUBLISHED_LSUN_BATCH
from modiff.utils.device import resolve_device


def _scale_over(preset: str, samples: int) -> md.QuantConfig:
    config = md.presets[preset]
    return replace(config, activation=replace(config.activation, spec=replace(config.activation.spec,
                                                                               samples_per_scale=samples)))


def _run_with_scale_over(model, preset: str, samples: int, seeds, config, runs_dir: Path) -> Path:
    """A run of ``preset`` with each scale over ``samples`` samples, where `sample_run` would keep ``preset``'s."""
    quant = _scale_over(preset, samples)
    folder = experiments.spacing_runs_dir(model, runs_dir, config)
    run = experiments.run_location(model, preset, config.resolved(resolve_device("cpu")), folder)
    identity = {"model": model.name, "quant_preset": preset, "reset": None, "quant_config": quant.to_dict()}
    return generate(md.quantize(model, quant), seeds, run, config, batch_size=len(seeds), device="cpu",
                    identity=identity, prepare=md.trajectory, progress=False)


def test_published_presets_are_those_sharing_a_dynamic_scale() -> None:
    names = scale_sharing.published_presets()
    assert "published-w8a4" in names and "published-w4a2-modiff" in names
    assert not {"w8a4", "published-w8a32", "qdiff-w8a4", "fp"} & set(names)
    assert all(md.presets[n].samples_per_scale == PUBLISHED_BATCH for n in names if "lsun" not in n)
    assert all(md.presets[n].samples_per_scale == PUBLISHED_LSUN_BATCH for n in names if "lsun" in n)
    assert "published-lsun-w4a3-modiff" in names


def _manifest(folder: Path, identity: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"identity": identity}))
    return folder


def test_samples_per_scale_is_read_from_the_manifest(tmp_path: Path) -> None:
    quant = _scale_over("published-w8a6", 16).to_dict()
    made = {"model": {"model": "m", "quant_preset": "published-w8a6", "quant_config": quant},
            "execution": {"batch_size": 512}}
    assert scale_sharing.samples_per_scale(_manifest(tmp_path / "now", made)) == 16
    older = {"model": {"model": "m", "quant_preset": "published-w8a6"}, "execution": {"batch_size": 512}}
    assert scale_sharing.samples_per_scale(_manifest(tmp_path / "older", older)) == 512  # the scale spanned the batch
    per_sample = {"model": {"model": "m", "quant_preset": "w8a6"}, "execution": {"batch_size": 512}}
    with pytest.raises(ValueError, match="no dynamic per-tensor activation scale"):
        scale_sharing.samples_per_scale(_manifest(tmp_path / "per-sample", per_sample))


def test_comparison_pairs_the_same_seeds_and_leaves_out_unpaired_presets(tame_denoiser, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    config, seeds, bootstrap = table1.table_config(tame_denoiser, 3, "quad"), range(12), BootstrapConfig(resamples=50)
    presets = ["published-w8a4", "published-w8a4-modiff"]
    ours = experiments.spacing_runs_dir(tame_denoiser, tmp_path / "table", config)
    runs = {p: experiments.sample_run(tame_denoiser, p, seeds, config, ours, device="cpu") for p in presets}
    other = _run_with_scale_over(tame_denoiser, "published-w8a4", 3, seeds, config, tmp_path / "scale3")

    table = scale_sharing.comparison(tame_denoiser, presets, seeds, config, tmp_path / "table", tmp_path / "scale3",
                                     bootstrap=bootstrap, device="cpu")
    assert list(table.columns) == scale_sharing.COLUMNS and table["preset"].tolist() == ["published-w8a4"]
    row = table.iloc[0]
    assert (row["samples_per_scale"], row["other_samples_per_scale"], row["n"]) == (64, 3, 12)
    a, b = (run_scores(r, seeds, bootstrap=bootstrap) for r in (runs["published-w8a4"], other))
    assert row["fid"] == a.metrics["fid"] and row["other_fid"] == b.metrics["fid"]
    assert row["difference"] == pytest.approx(a.metrics["fid"] - b.metrics["fid"])
    assert row["difference_ci95_low"] <= row["difference"] <= row["difference_ci95_high"]
    expected = ("lower" if row["difference_ci95_high"] < 0 else "higher" if row["difference_ci95_low"] > 0
                else "no difference")
    assert row["verdict"] == expected
    assert not np.array_equal(seed_images(runs["published-w8a4"], seeds), seed_images(other, seeds))

    with pytest.raises(ValueError, match="no preset of"):
        scale_sharing.comparison(tame_denoiser, ["published-w8a4-modiff"], seeds, config, tmp_path / "table",
                                 tmp_path / "scale3", bootstrap=bootstrap, device="cpu")
    empty, why = scale_sharing.section(tame_denoiser, presets, seeds, config, tmp_path / "table", tmp_path / "none",
                                       bootstrap=bootstrap, device="cpu")
    assert empty.empty and list(empty.columns) == scale_sharing.COLUMNS and why.startswith("Not compared")
    _, said = scale_sharing.section(tame_denoiser, presets, seeds, config, tmp_path / "table", tmp_path / "scale3",
                                    bootstrap=bootstrap, device="cpu")
    assert said.endswith("Not compared (a run here, none with the other sharing): published-w8a4-modiff; the "
                         "sentences above are about the compared rows only.")
    _, said = scale_sharing.section(tame_denoiser, [*presets, "published-w8a3"], seeds, config, tmp_path / "table",
                                    tmp_path / "scale3", bootstrap=bootstrap, device="cpu")
    assert "published-w8a3" not in said  # no run in either folder: not a row of this table
    monkeypatch.chdir(tmp_path)  # as the notebooks run, from the repository root: no machine's paths in a report
    _, why = scale_sharing.section(tame_denoiser, presets, seeds, config, tmp_path / "table", tmp_path / "none",
                                   bootstrap=bootstrap, device="cpu")
    assert why == "Not compared: no published preset has runs under both table and none for ddim with 3 steps, " \
                  "quad spacing, fp32."


def test_finding_reads_the_largest_change_per_method() -> None:
    rows = [("published-w8a3", "direct", 57.37, 64.86, -7.49, -7.70, -7.25, "lower"),
            ("published-w8a4", "direct", 60.79, 60.78, 0.01, -0.13, 0.15, "no difference"),
            ("published-w8a4-modiff", "MoDiff", 1.89, 1.90, -0.02, -0.03, -0.01, "lower")]
    table = pd.DataFrame([{"preset": p, "method": m, "n": 10_000, "samples_per_scale": 64, "other_samples_per_scale": 512,
                           "fid": f, "other_fid": o, "difference": d, "difference_ci95_low": lo,
                           "difference_ci95_high": hi, "verdict": v} for p, m, f, o, d, lo, hi, v in rows])
    text = scale_sharing.finding(table)
    assert "shared by 64 samples minus FID with it shared by 512, the same 10,000 seeds" in text
    assert "- direct: 1 of 2 rows moved; the largest change is published-w8a3 64.9 -> 57.4 (-7.49 [-7.7, -7.25])" in text
    assert "- MoDiff: 1 of 1 rows moved" in text
    assert "The MoDiff rows move by at most 0.02 FID, the direct rows by up to 7.49: a published MoDiff number " \
           "depends less" in text


def test_design_effect_by_hand() -> None:
    """Groups of 2: [1, 3, 5, 7] has group means 2 and 6, Var 8, Var of the values 20/3: 2 * 8 / (20/3) = 2.4; a
    trailing part is left out; alternating values inside each group cancel between groups (0)."""
    assert scale_sharing.design_effect([1, 3, 5, 7, 100], 2) == pytest.approx(2.4)
    assert scale_sharing.design_effect([0, 1, 0, 1, 0, 1], 2) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least 8 values"):
        scale_sharing.design_effect([1.0, 2.0, 3.0], 4)
    with pytest.raises(ValueError, match="do not vary"):
        scale_sharing.design_effect([1.0] * 8, 2)


def test_design_effect_sees_groups_that_move_together() -> None:
    """Independent values give about 1; a shared offset per group of 8 gives about 1 + 7 rho (rho the share of
    the variance the group offset carries), here rho = 1/2: 4.5."""
    rng = np.random.default_rng(0)
    independent = rng.normal(size=64_000)
    assert scale_sharing.design_effect(independent, 8) == pytest.approx(1.0, abs=0.05)
    shared = np.repeat(rng.normal(size=8_000), 8) + rng.normal(size=64_000)
    assert scale_sharing.design_effect(shared, 8) == pytest.approx(4.5, rel=0.05)


def test_design_section_needs_two_groups_and_reads_runs(tame_denoiser, tmp_path: Path) -> None:
    config = table1.table_config(tame_denoiser, 3, "quad")
    empty, why = scale_sharing.design_section(tame_denoiser, ["published-w8a4"], range(12), config, tmp_path,
                                              device="cpu")
    assert empty.empty and why.startswith("Not measured: 12 seeds hold fewer than two groups of 64")
    assert empty.columns.tolist() == scale_sharing.DESIGN_COLUMNS  # an empty table still names its columns
    none, why = scale_sharing.design_section(tame_denoiser, ["published-w8a4"], range(128), config, tmp_path,
                                             device="cpu")
    assert none.empty and why.startswith("Not measured: none of these presets has a run")
    assert none.columns.tolist() == scale_sharing.DESIGN_COLUMNS
    seeds, folder = range(128), experiments.spacing_runs_dir(tame_denoiser, tmp_path, config)
    runs = {p: experiments.sample_run(tame_denoiser, p, seeds, config, folder, batch_size=128, device="cpu")
            for p in ("fp", "published-w8a4", "w8a4")}
    table, why = scale_sharing.design_section(tame_denoiser, ["published-w8a4", "w8a4", "w8a3"], seeds, config, tmp_path,
                                              device="cpu")
    assert table["preset"].tolist() == ["published-w8a4", "w8a4"] and (table["groups"] == 2).all()
    assert table["shares_a_scale"].tolist() == [True, False] and (table["samples_per_group"] == 64).all()
    from modiff.pipelines.summary import per_seed_fidelity

    distances = per_seed_fidelity(runs["w8a4"], runs["fp"], list(seeds)).rel_l2_pixels
    assert table.iloc[1]["design_effect"] == pytest.approx(scale_sharing.design_effect(distances, 64))
    assert table["distances_to"].tolist() == ["the fp run"] * 2
    assert "direct rows sharing a scale" in why and "at least 2 groups" in why and "another fp run" not in why


def test_design_effect_of_a_summary_measured_against_another_fp_run(tame_denoiser, tmp_path: Path) -> None:
    """A summary whose distances are to another fp run of the same seeds (another GPU or process) gives its own
    distances' design effect, and the table says which fp run they are to; a row is not refused for it."""
    import shutil

    from modiff.pipelines.summary import SummaryMismatchError, per_seed_fidelity, stored_fidelity, summarize_run

    config, seeds = table1.table_config(tame_denoiser, 3, "quad"), range(128)
    sampled = experiments.spacing_runs_dir(tame_denoiser, tmp_path / "sampled", config)
    runs = {p: experiments.sample_run(tame_denoiser, p, seeds, config, sampled, batch_size=128, device="cpu")
            for p in ("fp", "w8a4")}
    folder = experiments.spacing_runs_dir(tame_denoiser, tmp_path / "summaries", config)
    other_fp = Path(shutil.copytree(runs["fp"], folder / runs["fp"].name))
    with np.load(other_fp / "samples.npz") as data:  # another fp run: one pixel differs
        arrays = {k: data[k].copy() for k in data.files}
    key = next(k for k, v in arrays.items() if v.dtype == np.uint8)
    arrays[key].flat[0] ^= 1
    np.savez(other_fp / "samples.npz", **arrays)
    summarize_run(runs["w8a4"], folder / runs["w8a4"].name, runs["fp"])
    table, why = scale_sharing.design_section(tame_denoiser, ["w8a4"], seeds, config, tmp_path / "summaries",
                                              device="cpu")
    distances = per_seed_fidelity(runs["w8a4"], runs["fp"], list(seeds)).rel_l2_pixels
    assert table["distances_to"].tolist() == ["another fp run of the same seeds"]
    assert table.iloc[0]["design_effect"] == pytest.approx(scale_sharing.design_effect(distances, 64))
    assert "1 row's distances are to another fp run of the same seeds" in why
    with pytest.raises(SummaryMismatchError, match="not a summary holding per-seed distances"):
        stored_fidelity(runs["w8a4"], seeds)  # a run, not a summary: its distances are to whatever run is asked
    with pytest.raises(SummaryMismatchError, match="not for"):
        stored_fidelity(folder / runs["w8a4"].name, range(200))
