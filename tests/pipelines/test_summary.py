"""Run summaries: the tables read the same numbers from them as from the runs, in well under 1 MB."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import modiff.pipelines.generate as gen
from analysis import claims, experiments, table1
from modiff.cli import main
from modiff.metrics.bootstrap import BootstrapConfig
from modiff.pipelines.evaluate import seed_images
from modiff.pipelines.generate import SampleConfig, finished_run, generate
from conftest import TameNet
from modiff.diffusion.schedules import linear_schedule
from modiff.models.registry import Denoiser
from modiff.pipelines.summary import (ReferenceImagesError, SummaryMismatchError, SummarySettings, per_seed_fidelity,
                                      reference_fingerprint, rescore_summary, run_scores, summarize, summarize_run)
from modiff.utils.locks import FolderLockedError, folder_lock

BOOTSTRAP = BootstrapConfig(resamples=20)
SETTINGS = SummarySettings(bootstrap=BOOTSTRAP, images=4)
SAMPLERS = [("ddim", 3), ("ddpm", 3)]


def _tables(model, runs: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """What the table1 and samplers notebooks compute from a runs folder."""
    config = table1.table_config(model, 3, "quad")
    scored = table1.scored_table(model, ["w8a4", "w8a4-modiff"], range(10), config, runs, device="cpu",
                                 bootstrap=BOOTSTRAP)
    sampler_runs = experiments.sampler_runs(model, ["w8a4-modiff"], SAMPLERS, range(10), runs, device="cpu")
    per_seed, not_compared = experiments.sampler_per_seed(sampler_runs, range(10))
    assert not_compared == []
    return scored, per_seed, experiments.sampler_scores(sampler_runs, range(10), bootstrap=BOOTSTRAP)


@pytest.mark.slow
def test_tables_from_summaries_equal_tables_from_runs(tmp_path: Path, tame_denoiser) -> None:
    """Runs made, summarized, deleted: Table 1 (FID, interval, verdicts, fidelity, precision) and the
    samplers' per-seed table come out the same from the summaries; each summary is small; grids work
    from the kept images."""
    runs, summaries = tmp_path / "runs", tmp_path / "summaries"
    scored, per_seed, sampler_fid = _tables(tame_denoiser, runs)
    grid_images = seed_images(runs / "spacing-quad" / "w8a4-ddim3", range(4))
    made, refused = summarize([runs], summaries, settings=SETTINGS)
    # five table rows (three anchors), and fp and w8a4-modiff per sampler: the DDIM sampler's two are the
    # table's own runs (same quad timesteps, seeds and identity), so only the other sampler adds two
    assert not refused and len(made) == 5 + 2
    assert json.loads((made[0] / "manifest.json").read_text())["summary"]["settings"]["feature_device"] == "cpu"
    assert (summaries / "spacing-quad" / "w8a4-modiff-ddim3" / "per_seed.npz").is_file()  # the layout kept
    for summary in made:
        assert sum(p.stat().st_size for p in summary.iterdir()) < 100_000
    shutil.rmtree(runs)
    scored_again, per_seed_again, sampler_fid_again = _tables(tame_denoiser, summaries)
    pd.testing.assert_frame_equal(scored_again, scored)
    pd.testing.assert_frame_equal(per_seed_again, per_seed)
    pd.testing.assert_frame_equal(sampler_fid_again, sampler_fid)
    for metric in ("fid", "is", "kid", "improved_precision", "improved_recall"):  # every score carries its interval
        for table in (sampler_fid, scored.dropna(subset=["fid_classifier"])):
            value = table[metric if metric.startswith("improved") else f"{metric}_classifier"]
            assert ((table[f"{metric}_ci95_low"] <= value) & (value <= table[f"{metric}_ci95_high"])).all(), metric
    assert sampler_fid.fid_classifier.notna().all() and (sampler_fid.vs_fp != "").sum() == 2
    assert (scored.note == "").any() and scored.fid_classifier.notna().any()  # real scores compared, not only notes
    assert {p.name for p in summaries.rglob("*.png")} == {"grid.png"}  # nothing sampled into the summaries
    assert np.array_equal(seed_images(summaries / "spacing-quad" / "w8a4-ddim3", range(4)), grid_images)
    with pytest.raises(ValueError, match=r"keeps the images of seeds 0-3 only.*--images N"):
        seed_images(summaries / "spacing-quad" / "w8a4-ddim3", range(5))


def _run(model, seeds, out: Path, config: SampleConfig = SampleConfig(steps=3), name: str = "tame") -> Path:
    return generate(model, seeds, out, config, batch_size=4, device="cpu", identity={"model": name, "quant_preset": None},
                    progress=False)


def _quantized_run(model, seeds, out: Path) -> Path:
    from modiff.quant import presets, quantize, trajectory

    return generate(quantize(model, presets["w8a4"]), seeds, out, SampleConfig(steps=3), batch_size=4, device="cpu",
                    identity={"model": "tame", "quant_preset": "w8a4"}, prepare=trajectory, progress=False)


def test_summary_stands_for_its_run_and_refuses_what_it_cannot_answer(tmp_path: Path, tame_denoiser) -> None:
    """Reused by finished_run for its seeds; refused for more seeds, for another identity, as a place to
    sample into, and for questions about other seeds, bootstrap settings or reference runs."""
    fp, q = _run(tame_denoiser, range(12), tmp_path / "runs" / "fp"), _quantized_run(tame_denoiser, range(12), tmp_path / "runs" / "q")
    summary = summarize_run(q, tmp_path / "s" / "q", fp, SETTINGS)
    identity, config = {"model": "tame", "quant_preset": "w8a4"}, SampleConfig(steps=3)
    assert finished_run(summary, range(12), config, identity) and finished_run(summary, [3, 1], config, identity)
    with pytest.raises(ValueError, match="summary .* lacks 1 of the seeds"):
        finished_run(summary, range(13), config, identity)
    with pytest.raises(ValueError, match="another configuration"):
        finished_run(summary, range(12), config, {"model": "tame", "quant_preset": "w4a4"})
    with pytest.raises(ValueError, match="takes no new ones"):
        _quantized_run(tame_denoiser, range(13), summary)
    assert per_seed_fidelity(summary, fp, [5, 2]).rel_l2_pixels.tolist() == \
        per_seed_fidelity(q, fp, [5, 2]).rel_l2_pixels.tolist()
    other_fp = _run(tame_denoiser, range(12), tmp_path / "other", SampleConfig(steps=3, spacing="quad"))
    with pytest.raises(SummaryMismatchError, match="another reference run"):
        per_seed_fidelity(summary, other_fp, range(12))
    with pytest.raises(SummaryMismatchError, match="bootstrap"):
        run_scores(summary, range(12), bootstrap=BootstrapConfig(resamples=30))
    with pytest.raises(SummaryMismatchError, match="seeds"):
        run_scores(summary, range(10), bootstrap=BOOTSTRAP)
    scores = run_scores(summary, range(12), bootstrap=BOOTSTRAP)
    from_run = run_scores(q, range(12), bootstrap=BOOTSTRAP)
    assert scores.metrics == from_run.metrics and {"kid_ci95_low", "recall_ci95_high"} <= set(scores.metrics)
    assert set(scores.resamples) == set(from_run.resamples) == {"fid", "kid", "precision", "recall", "f_score"}
    for name, values in from_run.resamples.items():  # what paired verdicts need travels with the summary
        np.testing.assert_array_equal(scores.resamples[name], values)
    fp_summary = summarize_run(fp, tmp_path / "s" / "fp", fp, SETTINGS)
    assert np.array_equal(seed_images(fp_summary, range(12)), seed_images(fp, range(12)))  # fp keeps every image
    assert per_seed_fidelity(q, fp_summary, range(12)).rel_l2_pixels.tolist() == \
        per_seed_fidelity(q, fp, range(12)).rel_l2_pixels.tolist()
    _keep_images(fp_summary, range(4))
    with pytest.raises(SummaryMismatchError, match="need the images of the full run.*remove that summary"):
        per_seed_fidelity(q, fp_summary, range(12))


def _keep_images(summary: Path, seeds) -> None:
    """Cut a summary's kept images down to ``seeds``, as a quantized run's summary keeps them."""
    images = seed_images(summary, seeds)
    np.savez_compressed(summary / "images.npz", images=images, seeds=np.asarray(list(seeds), dtype=np.int64))


def test_a_row_to_sample_against_an_fp_summary_without_images_is_refused_first(tmp_path: Path, tame_denoiser) -> None:
    """Table 1 from summaries plus a row still to sample: refused before anything is sampled when the fp
    summary lacks images (its distances need them); sampled and scored when the fp summary keeps them all,
    and then the same table as from the runs in one sitting (how the paper preset's Table 1 is made)."""
    runs, summaries, seeds = tmp_path / "runs", tmp_path / "summaries", range(6)
    config = table1.table_config(tame_denoiser, 3, "quad")
    folder = experiments.spacing_runs_dir(tame_denoiser, runs, config)
    for preset in table1.ANCHORS:
        experiments.sample_run(tame_denoiser, preset, seeds, config, folder, device="cpu")
    summarize([runs], summaries, settings=SETTINGS)
    folder_of_summaries = experiments.spacing_runs_dir(tame_denoiser, summaries, config)
    fp_summary, row = folder_of_summaries / "fp-ddim3", folder_of_summaries / "w8a4-ddim3"
    assert fp_summary.is_dir() and not row.exists()
    _keep_images(fp_summary, range(2))
    with pytest.raises(SummaryMismatchError, match=r"keeping the images of 2 seeds, not of 4 .*w8a4 will be sampled"):
        table1.scored_table(tame_denoiser, ["w8a4"], seeds, config, summaries, device="cpu", bootstrap=BOOTSTRAP)
    assert not row.exists()
    shutil.rmtree(fp_summary)
    summarize([runs], summaries, settings=SETTINGS)  # the fp summary made anew keeps every image
    scored = table1.scored_table(tame_denoiser, ["w8a4"], seeds, config, summaries, device="cpu", bootstrap=BOOTSTRAP)
    assert scored.preset.tolist() == [*table1.ANCHORS, "w8a4"] and (row / "samples.npz").is_file()
    assert scored.rel_l2_pixels.iloc[-1] > 0
    one_sitting = table1.scored_table(tame_denoiser, ["w8a4"], seeds, config, runs, device="cpu", bootstrap=BOOTSTRAP)
    pd.testing.assert_frame_equal(scored, one_sitting)


def test_unfinished_busy_and_mismatched_runs_are_refused(tmp_path: Path, tame_denoiser,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run, a run being written, a reference of another sampling and an --out that is not a
    summary are refused with what to do; an up-to-date summary is kept, a changed run summarized again."""
    real_sample = gen.sample

    def dying_sample(model, seeds, *args, **kwargs):
        if 4 in seeds:
            raise RuntimeError("out of memory")
        return real_sample(model, seeds, *args, **kwargs)

    monkeypatch.setattr(gen, "sample", dying_sample)
    with pytest.raises(RuntimeError):
        _run(tame_denoiser, range(12), tmp_path / "broken")
    monkeypatch.setattr(gen, "sample", real_sample)
    with pytest.raises(ValueError, match="not a finished run"):
        summarize_run(tmp_path / "broken", tmp_path / "s" / "broken", settings=SETTINGS)
    fp = _run(tame_denoiser, range(12), tmp_path / "fp")
    with folder_lock(fp), pytest.raises(FolderLockedError, match="being written"):
        summarize_run(fp, tmp_path / "s" / "fp", settings=SETTINGS)
    other = _run(tame_denoiser, range(12), tmp_path / "other", SampleConfig(steps=4))
    with pytest.raises(ValueError, match="other settings .*steps: 4 -> 3"):
        summarize_run(fp, tmp_path / "s" / "fp", other, SETTINGS)
    with pytest.raises(ValueError, match="not a summary"):
        summarize_run(fp, tmp_path / "fp", fp, SETTINGS)
    summary = summarize_run(fp, tmp_path / "s" / "fp", fp, SETTINGS)
    made = (summary / "metrics.json").stat().st_mtime_ns
    assert summarize_run(fp, summary, fp, SETTINGS) == summary and (summary / "metrics.json").stat().st_mtime_ns == made
    _run(tame_denoiser, range(14), fp)
    summarize_run(fp, summary, fp, SETTINGS)
    assert json.loads((summary / "manifest.json").read_text())["seeds"] == list(range(14))
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # no staging left


def test_summarize_command(tmp_path: Path, tame_denoiser) -> None:
    """Summaries of a folder of runs, with their sizes; the unfinished run beside them is refused (exit 1),
    the fp run found beside the others; a folder without runs is an error."""
    _run(tame_denoiser, range(12), tmp_path / "runs" / "fp")
    _quantized_run(tame_denoiser, range(12), tmp_path / "runs" / "q")
    (tmp_path / "runs" / "fresh").mkdir()
    (tmp_path / "runs" / "fresh" / "manifest.json").write_text(json.dumps({"identity": {}, "seeds": [], "sessions": []}))
    args = ["summarize", str(tmp_path / "runs"), "--out", str(tmp_path / "s"), "--bootstrap-resamples", "20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "summary " + str(tmp_path / "s" / "q") in result.output and " kB)" in result.output
    assert "REFUSED" in result.output and "fresh: " in result.output and "not a finished run" in result.output
    manifest = json.loads((tmp_path / "s" / "q" / "manifest.json").read_text())
    assert manifest["summary"]["reference"]["run"] == str((tmp_path / "runs" / "fp").resolve())
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(main, ["summarize", str(tmp_path / "empty"), "--out", str(tmp_path / "t")])
    assert empty.exit_code == 1 and "holds no run folder" in empty.output
    _keep_images(tmp_path / "s" / "q", range(4))
    cut = CliRunner().invoke(main, ["summarize", str(tmp_path / "s" / "q"), "--out", str(tmp_path / "t")])
    assert cut.exit_code == 1 and "keeps the images of 4 of its 12 seeds" in cut.output
    no_jobs = CliRunner().invoke(main, [*args, "--jobs", "0"])
    assert no_jobs.exit_code == 2 and "--jobs" in no_jobs.output and ">=1" in no_jobs.output


def test_parallel_jobs_write_the_same_summaries(tmp_path: Path, tame_denoiser) -> None:
    """--jobs 2: the same summaries (scores, per-seed distances, kept images) and the same refusals as one
    run at a time, in the same order; a job count below 1 is refused."""
    _run(tame_denoiser, range(12), tmp_path / "runs" / "fp")
    _quantized_run(tame_denoiser, range(12), tmp_path / "runs" / "q")
    (tmp_path / "runs" / "fresh").mkdir()
    (tmp_path / "runs" / "fresh" / "manifest.json").write_text(json.dumps({"identity": {}, "seeds": [], "sessions": []}))
    one = summarize([tmp_path / "runs"], tmp_path / "one", settings=SETTINGS)
    two = summarize([tmp_path / "runs"], tmp_path / "two", settings=SETTINGS, jobs=2)
    assert [p.name for p in one[0]] == [p.name for p in two[0]] == ["fp", "q"]
    assert list(one[1]) == list(two[1]) == [tmp_path / "runs" / "fresh"]
    for name in ("fp", "q"):
        a, b = tmp_path / "one" / name, tmp_path / "two" / name
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
        for part in ("per_seed.npz", "images.npz"):
            with np.load(a / part) as x, np.load(b / part) as y:
                assert all(np.array_equal(x[k], y[k]) for k in x.files)
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        summarize([tmp_path / "runs"], tmp_path / "three", settings=SETTINGS, jobs=0)


def test_a_run_sampled_away_from_the_fp_run_takes_its_distances_from_the_fp_summary(
        tmp_path: Path, tame_denoiser, caplog: pytest.LogCaptureFixture) -> None:
    """Runs of two sittings: the fp run summarized in the first, a quantized run sampled in the second with no
    fp run beside it. Its summary finds the fp summary where it goes and stores the distances the fp run gives;
    with no fp summary there either, it is made without distances and the command says so."""
    fp = _run(tame_denoiser, range(6), tmp_path / "sitting1" / "fp")
    q = _quantized_run(tame_denoiser, range(6), tmp_path / "sitting2" / "q")
    summarize([tmp_path / "sitting2"], tmp_path / "bare", settings=SETTINGS)
    assert json.loads((tmp_path / "bare" / "q" / "manifest.json").read_text())["summary"]["reference"] is None
    assert "q is summarized without per-seed distances" in caplog.text and "give --fp-run" in caplog.text
    summarize([tmp_path / "sitting1"], tmp_path / "s", settings=SETTINGS)
    made, refused = summarize([tmp_path / "sitting2"], tmp_path / "s", settings=SETTINGS)
    assert made == [tmp_path / "s" / "q"] and not refused
    reference = json.loads((tmp_path / "s" / "q" / "manifest.json").read_text())["summary"]["reference"]
    assert reference["run"] == str((tmp_path / "s" / "fp").resolve())
    assert per_seed_fidelity(tmp_path / "s" / "q", tmp_path / "s" / "fp", range(6)).rel_l2_pixels.tolist() == \
        per_seed_fidelity(q, fp, range(6)).rel_l2_pixels.tolist()


def test_distances_are_read_only_against_the_fp_images_they_were_measured_on(tmp_path: Path, tame_denoiser) -> None:
    """Another fp run of the same identity (another GPU, commit or session) has other images: a summary's stored
    distances are refused against it, by the fingerprint the summary records or, for a summary made before the
    fingerprint, by recomputing the distances of the images it keeps; accepted against its own fp run and that
    run's summary."""
    fp = _run(tame_denoiser, range(8), tmp_path / "fp")
    other = _run(Denoiser(TameNet(1), linear_schedule(), "tame", {}), range(8), tmp_path / "other")
    assert not np.array_equal(seed_images(fp, range(8)), seed_images(other, range(8)))
    q = _quantized_run(tame_denoiser, range(8), tmp_path / "q")
    summary = summarize_run(q, tmp_path / "s" / "q", fp, SETTINGS)
    fp_summary = summarize_run(fp, tmp_path / "s" / "fp", None, SETTINGS)
    manifest_path = summary / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["summary"]["reference"]["images_sha256"] == reference_fingerprint(fp, range(8)) \
        == reference_fingerprint(fp_summary, range(8)) != reference_fingerprint(other, range(8))
    expected = per_seed_fidelity(q, fp, range(8)).rel_l2_pixels.tolist()
    for reference in (fp, fp_summary):
        assert per_seed_fidelity(summary, reference, range(8)).rel_l2_pixels.tolist() == expected
    with pytest.raises(ReferenceImagesError, match="other full-precision images than those of .*--fp-run"):
        per_seed_fidelity(summary, other, range(8))
    del manifest["summary"]["reference"]["images_sha256"]  # as a summary of format 3 has it
    manifest_path.write_text(json.dumps(manifest))
    assert per_seed_fidelity(summary, fp_summary, [6, 1]).rel_l2_pixels.tolist() == [expected[6], expected[1]]
    with pytest.raises(ReferenceImagesError):
        per_seed_fidelity(summary, other, range(8))


def test_tables_leave_out_distances_measured_against_another_fp_run(tmp_path: Path, tame_denoiser) -> None:
    """Table 1 keeps the row's scores and shows no distances, with a note its finding counts; the sampler table
    leaves that sampler's pair out and its finding names it."""
    runs = tmp_path / "runs"
    config = table1.table_config(tame_denoiser, 3, "quad")
    folder = experiments.spacing_runs_dir(tame_denoiser, runs, config)
    seeds = range(10)
    scored = table1.scored_table(tame_denoiser, ["w8a4"], seeds, config, runs, device="cpu", bootstrap=BOOTSTRAP)
    summarize([runs], tmp_path / "s", settings=SETTINGS)
    shutil.rmtree(tmp_path / "s" / folder.name / "fp-ddim3")
    other = Denoiser(TameNet(1), linear_schedule(), tame_denoiser.name, {})
    experiments.sample_run(other, "fp", seeds, config, tmp_path / "s" / folder.name, device="cpu")
    again = table1.scored_table(tame_denoiser, ["w8a4"], seeds, config, tmp_path / "s", device="cpu",
                                bootstrap=BOOTSTRAP).set_index("preset")
    row, before = again.loc["w8a4"], scored.set_index("preset").loc["w8a4"]
    assert row.fid_classifier == before.fid_classifier and np.isnan(row.rel_l2_pixels) and np.isnan(row.psnr_db)
    assert table1.NO_DISTANCES in row.note
    finding = table1.findings(table1.paper_columns(again.reset_index(), tame_denoiser))
    assert "No fidelity to fp (PSNR, relative L2) for 3 rows: w8a32, w4a32, w8a4" in finding
    sampler_runs = experiments.sampler_runs(tame_denoiser, ["w8a4"], [("ddim", 3)], seeds, tmp_path / "s", device="cpu")
    per_seed, not_compared = experiments.sampler_per_seed(sampler_runs, seeds)
    assert per_seed.empty and not_compared == [("ddim", 3)]
    assert "Not compared: ddim 3 steps" in claims.sampler_claim(pd.DataFrame(), not_compared=not_compared)


def test_scores_are_read_only_in_the_feature_space_they_were_made_in(tmp_path: Path, tame_denoiser,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A summary records the classifier's weights; read where another classifier scores the runs (a retrained
    one), it is refused. One made before the record (format 3) counts as made with the shipped classifier."""
    import modiff.metrics.fidelity as fidelity

    q = _quantized_run(tame_denoiser, range(10), tmp_path / "q")
    summary = summarize_run(q, tmp_path / "s" / "q", None, SETTINGS)
    manifest_path = summary / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["summary"]["settings"]["classifier_weights"] == fidelity.shipped_weights()
    run_scores(summary, range(10), bootstrap=BOOTSTRAP)
    del manifest["summary"]["settings"]["classifier_weights"]
    manifest_path.write_text(json.dumps(manifest))
    run_scores(summary, range(10), bootstrap=BOOTSTRAP)
    monkeypatch.setattr(fidelity, "extractor_weights", lambda extractor, weights: "f" * 64)
    with pytest.raises(SummaryMismatchError, match="another classifier .* than the one here \\(ffffffffffff\\)"):
        run_scores(summary, range(10), bootstrap=BOOTSTRAP)


def _as_format_2(summary: Path) -> None:
    """Make a summary look as one made before sitting 47: FID and IS only, no fingerprint, no classifier record."""
    metrics_path, manifest_path = summary / "metrics.json", summary / "manifest.json"
    record = json.loads(metrics_path.read_text())
    record["metrics"] = {k: v for k, v in record["metrics"].items()
                         if k.startswith(("fid", "is_")) or k in ("extractor", "feature_space", "num_samples", "reference")}
    metrics_path.write_text(json.dumps({k: v for k, v in record.items()
                                        if not k.endswith("_resamples") or k == "fid_resamples"}))
    manifest = json.loads(manifest_path.read_text())
    block = manifest["summary"]
    block["format"] = 2
    del block["reference"]["images_sha256"], block["settings"]["classifier_weights"]
    manifest_path.write_text(json.dumps(manifest))


def test_a_full_precision_summary_is_scored_again_without_its_run(tmp_path: Path, tame_denoiser) -> None:
    """An old fp summary (FID and IS only) given to `modiff summarize` gains KID and precision/recall equal to a
    fresh summary of its run, and its images' fingerprint, in place, its images and distances untouched and the
    rows measured against it still read; done again, nothing changes. A summary keeping fewer images than seeds,
    a run, and a summary with --fp-run or --seeds are refused."""
    fp, q = _run(tame_denoiser, range(12), tmp_path / "runs" / "fp"), _quantized_run(tame_denoiser, range(12), tmp_path / "runs" / "q")
    fresh = summarize_run(fp, tmp_path / "fresh" / "fp", fp, SETTINGS)
    old = summarize_run(fp, tmp_path / "s" / "fp", fp, SETTINGS)
    q_summary = summarize_run(q, tmp_path / "s" / "q", old, SETTINGS)
    _as_format_2(old)
    kept = {name: (old / name).read_bytes() for name in ("images.npz", "per_seed.npz", "grid.png")}
    made = json.loads((old / "manifest.json").read_text())["summary"]["made"]
    shutil.rmtree(tmp_path / "runs")
    args = ["summarize", str(old), "--out", str(tmp_path / "s"), "--bootstrap-resamples", "20", "--images", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((old / "metrics.json").read_text()) == json.loads((fresh / "metrics.json").read_text())
    assert {name: (old / name).read_bytes() for name in kept} == kept
    block = json.loads((old / "manifest.json").read_text())["summary"]
    assert block["format"] == json.loads((fresh / "manifest.json").read_text())["summary"]["format"] == 4
    assert block["reference"]["images_sha256"] == reference_fingerprint(fresh, range(12))
    assert block["made"] == made and "rescored" in block
    assert per_seed_fidelity(q_summary, old, range(12)).rel_l2_pixels.tolist() == \
        per_seed_fidelity(q_summary, fresh, range(12)).rel_l2_pixels.tolist()
    manifest_bytes = (old / "manifest.json").read_bytes()
    assert rescore_summary(old, old, SETTINGS) == old and (old / "manifest.json").read_bytes() == manifest_bytes
    with pytest.raises(ValueError, match=r"keeps the images of 4 of its 12 seeds.*summarize its run instead"):
        rescore_summary(q_summary, tmp_path / "t", SETTINGS)
    with pytest.raises(ValueError, match="is a run, not a summary"):
        rescore_summary(_run(tame_denoiser, range(2), tmp_path / "run"), tmp_path / "u", SETTINGS)
    with pytest.raises(ValueError, match="exists and is not a summary"):
        rescore_summary(old, tmp_path / "run", SETTINGS)
    refused = CliRunner().invoke(main, [*args, "--seeds", "0-3"])
    assert refused.exit_code == 1 and "--fp-run and --seeds are for runs" in refused.output
