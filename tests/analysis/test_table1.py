"""Table 1 with anchors, intervals, verdicts, spacing and precision (analysis.table1)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import modiff as md
from analysis import experiments, table1


def test_rows_are_described_from_their_configs() -> None:
    assert table1.describe("fp") == {"numerics": "-", "method": "full precision", "weights": "fp", "w_bits": 32, "a_bits": 32}
    assert table1.describe("w8a32")["method"] == "full-precision activations"
    assert table1.describe("w4a4") == {"numerics": "per-sample", "method": "dynamic (LCQ)", "weights": "RTN",
                                       "w_bits": 4, "a_bits": 4}
    assert table1.describe("published-w8a3-modiff")["numerics"] == "published"
    assert table1.describe("published-w8a3-modiff")["method"] == "dynamic + MoDiff"
    assert table1.describe("published-lsun-w4a3-modiff") == {"numerics": "published-lsun", "method": "dynamic + MoDiff",
                                                             "weights": "RTN", "w_bits": 4, "a_bits": 3}
    assert table1.describe("qdiff-w8a4-modiff") == {"numerics": "static", "method": "Q-Diffusion + MoDiff",
                                                    "weights": "AdaRound", "w_bits": 8, "a_bits": 4}


def test_row_presets_put_the_anchors_first_and_say_what_is_left_out(tiny_denoiser: md.Denoiser) -> None:
    rows, note = table1.row_presets(tiny_denoiser, ["w4a4", "w4a4-modiff"], ["published-w4a4"], ["qdiff-w4a4"],
                                    adaround=False, calibrate=False)
    assert rows == ["fp", "w8a32", "w4a32", "w4a4", "w4a4-modiff", "published-w8a32", "published-w4a32",
                    "published-w4a4"]
    assert "published-numerics presets after their weights-only anchors published-w8a32, published-w4a32" in note
    assert "AdaRound W4 rows off" in note and "shipped calibration: none; the other 1 need calibration" in note
    assert table1.adaround_presets(["w8a4", "w4a4", "w4a4-modiff"]) == ["w4a32-adaround", "w4a4-adaround",
                                                                         "w4a4-adaround-modiff"]
    rows, note = table1.row_presets(tiny_denoiser, ["w4a4"], [], ["qdiff-w4a4"], adaround=True, calibrate=True)
    available, _ = table1.adaround_status(tiny_denoiser, True)
    assert ("w4a32-adaround" in rows) == available and rows[-1] == "qdiff-w4a4"
    rows, _ = table1.row_presets(tiny_denoiser, ["w4a4"], [], ["qdiff-w8a4", "qdiff-w4a4", "qdiff-w8a8-modiff"],
                                 adaround=False, calibrate=True)
    assert rows[-5:] == ["w8a32-adaround", "w4a32-adaround", "qdiff-w8a4", "qdiff-w4a4", "qdiff-w8a8-modiff"]
    assert table1.qdiff_anchors([]) == []
    if not available:  # this modiff lacks the AdaRound presets: the notebook says so instead of failing
        assert "left out" in note


def test_a_latent_models_table_adds_the_lsun_commands_numerics(tiny_denoiser: md.Denoiser) -> None:
    """A latent model's rows hold each published preset twice, with the CIFAR-10 and the LSUN commands'
    numerics; a pixel model's only with the CIFAR-10 ones."""
    from test_latent import _tiny_model

    published = ["published-w8a4", "published-w8a4-modiff"]
    rows, note = table1.row_presets(_tiny_model(), ["w8a4"], published, [], adaround=False, calibrate=False)
    assert rows[-4:] == [*published, "published-lsun-w8a4", "published-lsun-w8a4-modiff"]
    assert "published-lsun-*" in note
    rows, note = table1.row_presets(tiny_denoiser, ["w8a4"], published, [], adaround=False, calibrate=False)
    assert not any("lsun" in row for row in rows) and "lsun" not in note
    counterparts = table1._counterparts(["fp", "w8a32", "w8a4", "published-lsun-w8a4", "published-lsun-w8a4-modiff"])
    assert counterparts["published-lsun-w8a4-modiff"] == {"weights_only": "w8a32", "direct": "published-lsun-w8a4"}


def test_calibration_record_says_which_iterations_made_the_calibrated_rows(tiny_denoiser: md.Denoiser) -> None:
    """Calibrating here records the notebook's iterations; otherwise the shipped calibration's, whatever the
    iteration parameters say (here none is shipped); the published recipe's beside them."""
    here = table1.calibration_record(tiny_denoiser, True, 300, 40).iloc[0].to_dict()
    assert here == {"source": "calibrated by the notebook", "adaround_iters": 300, "activation_iters": 40,
                    "published_adaround_iters": 20_000, "published_activation_iters": 5_000}
    none = table1.calibration_record(tiny_denoiser, False, 20_000, 5_000).iloc[0]
    assert none["source"] == "none: no calibrated rows" and none["adaround_iters"] is None
    shipped = table1.calibration_record(md.load_model("fmnist-ddim"), False, 20_000, 5_000).iloc[0]
    assert shipped["source"] == "the model's shipped calibration"
    assert (shipped["adaround_iters"], shipped["activation_iters"]) == (5_000, 1_000)  # data/fmnist-ddim/calibration


def test_spacing_and_run_folders(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    from test_latent import _tiny_model

    quad = table1.table_config(tiny_denoiser, 10, "quad")
    assert quad.spacing == "quad" and table1.table_config(tiny_denoiser, 10).spacing == "uniform"
    assert table1.table_config(_tiny_model(), 10, "quad").spacing == "ldm"  # a latent model keeps its timesteps
    assert experiments.spacing_runs_dir(tiny_denoiser, tmp_path, quad) == tmp_path / "spacing-quad"
    assert experiments.spacing_runs_dir(tiny_denoiser, tmp_path, table1.table_config(tiny_denoiser, 10)) == tmp_path
    from analysis.experiments import calibration_settings

    calibration = table1.table_calibration(calibration_settings(tiny_denoiser, 10, 4, 2, 2), quad)
    assert calibration.data.spacing == "quad" and calibration.data.steps == 10
    assert calibration.data.first_seed == table1.HELD_OUT_FIRST_SEED  # calibrated on seeds never scored


def test_scored_table_has_anchors_intervals_and_verdicts(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    from modiff.metrics.bootstrap import BootstrapConfig

    config = table1.table_config(tiny_denoiser, 3, "quad")
    table = table1.scored_table(tiny_denoiser, ["w8a4", "w8a4-modiff"], range(10), config, tmp_path, device="cpu",
                                bootstrap=BootstrapConfig(resamples=20))
    assert table.preset.tolist() == ["fp", "w8a32", "w4a32", "w8a4", "w8a4-modiff"]
    assert (table.n == 10).all() and (table.spacing == "quad").all() and (table.precision == "fp32 on cpu").all()
    assert (tmp_path / "spacing-quad" / "fp-ddim3" / "manifest.json").is_file()
    ok = table[table.note == ""]
    assert ((ok.fid_ci95_low <= ok.fid_classifier) & (ok.fid_classifier <= ok.fid_ci95_high)).all()
    assert ((ok.is_ci95_low <= ok.is_classifier) & (ok.is_classifier <= ok.is_ci95_high)).all()
    rows = table.set_index("preset")
    assert rows.loc["fp", "vs_fp"] == "" and rows.loc["fp", "rel_l2_pixels"] == 0.0
    verdicts = ("worse:", "better:", "no difference:")
    if rows.loc["w8a4-modiff", "note"] == "" and rows.loc["w8a4", "note"] == "":
        assert rows.loc["w8a4-modiff", "modiff_vs_direct"].startswith(verdicts)
        assert rows.loc["w8a4", "vs_weights_only"].startswith(verdicts) and rows.loc["w8a4", "modiff_vs_direct"] == ""
        for score in ("kid", "precision", "recall"):  # the other scores, MoDiff against direct only
            assert rows.loc["w8a4-modiff", f"modiff_vs_direct_{score}"].startswith(verdicts)
            assert rows.loc["w8a4", f"modiff_vs_direct_{score}"] == ""
    rows, left_out = table1.rows_to_score(tiny_denoiser, [*table1.ANCHORS, "w8a4", "w8a6", "w8a4-modiff"], range(10),
                                          config, tmp_path, "skip", device="cpu")
    assert rows == [*table1.ANCHORS, "w8a4", "w8a4-modiff"] and left_out == ["w8a6"]  # w8a6 was never sampled
    assert table1.rows_to_score(tiny_denoiser, ["w8a6"], range(10), config, tmp_path, "sample") == (["w8a6"], [])
    with_paper = table1.paper_columns(table, tiny_denoiser)
    assert "- Not in this table (no run or summary at this N yet): w8a6." in table1.findings(with_paper, ["w8a6"])
    assert with_paper.set_index("preset").loc["w8a32", "paper_fid"] == 4.24
    assert np.isnan(with_paper.set_index("preset").loc["w4a32", "paper_fid"])
    text = table1.findings(with_paper)
    assert "N = 10 samples" in text and "`quad` timesteps" in text and "fp32 on cpu" in text
    columns = ("vs_fp", "vs_weights_only", "modiff_vs_direct", "modiff_vs_direct_kid", "modiff_vs_direct_precision",
               "modiff_vs_direct_recall")
    counted = sum((with_paper[c].astype(str).str.len() > 0).sum() for c in columns)
    assert counted >= 7 and f"The table holds {counted} paired comparisons, each its own 95% interval" in text
    assert "MoDiff against its direct counterpart by the other scores" in text and "gives FID's verdict for KID in" in text
    assert "share each activation scale" not in text  # no published row here
    published = pd.concat([with_paper, with_paper[with_paper.preset == "w8a4"].assign(preset="published-w8a4")])
    assert "1 rows share each activation scale over consecutive seeds (published-w8a4, ...)" in table1.findings(published)


def test_a_modiff_row_worse_than_direct_is_read_against_its_weights_only_anchor() -> None:
    """Hand-made rows: W4A4 MoDiff worse than direct, both better than the broken W4A32 anchor; MoDiff
    nearer to it (|27.5 - 28.5| < |22.6 - 28.5|) is said, and the opposite case is said too."""
    import pandas as pd

    def table(modiff_fid: float) -> pd.DataFrame:
        return pd.DataFrame({
            "preset": ["fp", "w4a32", "w4a4", "w4a4-modiff"], "fid_classifier": [1.6, 28.5, 22.6, modiff_fid],
            "rel_l2_pixels": [0.0, 0.861, 0.72, 0.85], "vs_fp": ["", "worse: +26.9 [+26.4, +27.5]", "w", "m"],
            "vs_weights_only": ["", "", "better: -5.89 [-6.32, -5.54]", "better: -0.978 [-1.08, -0.864]"],
            "modiff_vs_direct": ["", "", "", "worse: +4.91 [+4.55, +5.29]"]})

    (line,) = table1._modiff_worse_lines(table(27.5))
    assert line.startswith("- w4a4-modiff is worse than w4a4 (worse: +4.91 [+4.55, +5.29])")
    assert "anchor w4a32 is worse: +26.9 [+26.4, +27.5] against fp (relative L2 to fp 0.861)" in line
    assert "w4a4-modiff better: -0.978 [-1.08, -0.864], w4a4 better: -5.89 [-6.32, -5.54]" in line
    assert line.endswith("MoDiff stays nearer the weights-only model, direct quantization moves the FID "
                         "further from it.")
    (line,) = table1._modiff_worse_lines(table(40.0))
    assert line.endswith("MoDiff is not the nearer of the two to the weights-only model.")
    assert table1._modiff_worse_lines(table(27.5).assign(modiff_vs_direct="")) == []


def test_each_row_is_compared_with_the_weights_only_anchor_of_the_same_weights() -> None:
    """Same bits, layers, split shortcut and weight origin (round to nearest or AdaRound): the published
    rows (split shortcut, which gives the second half of a concatenation's weights their own scales) have
    their own anchor, the AdaRound and Q-Diffusion rows theirs; a weights-only preset has none."""
    presets = ["fp", "w8a32", "w4a32", "w4a32-adaround", *table1.PUBLISHED_ANCHORS, "w4a4", "w4a4-modiff",
               "w4a4-adaround-modiff", "published-w4a4-modiff", "published-w8a4", "qdiff-w4a4", "w8a32-adaround",
               "qdiff-w8a4-modiff"]
    anchors = {p: pair["weights_only"] for p, pair in table1._counterparts(presets).items()}
    assert anchors == {"fp": None, "w8a32": None, "w4a32": None, "w4a32-adaround": None, "published-w8a32": None,
                       "published-w4a32": None, "w4a4": "w4a32", "w4a4-modiff": "w4a32",
                       "w4a4-adaround-modiff": "w4a32-adaround", "published-w4a4-modiff": "published-w4a32",
                       "published-w8a4": "published-w8a32", "qdiff-w4a4": "w4a32-adaround", "w8a32-adaround": None,
                       "qdiff-w8a4-modiff": "w8a32-adaround"}
    assert table1.describe("published-w4a32") == {"numerics": "published", "method": "full-precision activations",
                                                  "weights": "RTN", "w_bits": 4, "a_bits": 32}
    assert table1.describe("w4a32-adaround")["numerics"] == "-"


def test_rows_below_fp_are_listed_with_their_distance_to_fp() -> None:
    import pandas as pd

    scored = pd.DataFrame({"preset": ["w8a32", "w8a4", "w4a4"], "rel_l2_pixels": [0.0668, 0.37, 0.72],
                           "vs_fp": ["better: -0.169 [-0.209, -0.137]", "worse: +3.54 [+3.4, +3.69]",
                                     "no difference: +0.1 [-0.2, +0.3]"]})
    (line,) = table1._better_than_fp_line(scored)
    assert line.startswith("- 1 row has a lower FID than fp: w8a32 (-0.169 [-0.209, -0.137]; relative L2 to fp "
                           "0.0668). FID compares a row with the data, not with fp")
    assert table1._better_than_fp_line(scored.iloc[1:]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp_device_distance_measures_each_gpu_arithmetic(tiny_denoiser: md.Denoiser) -> None:
    """On a GPU: one row per arithmetic (IEEE fp32, tf32, bf16 autocast) against the CPU; IEEE fp32 closest."""
    config = table1.table_config(tiny_denoiser, 3, "quad")
    rows = table1.fp_device_distance(tiny_denoiser, range(2), config).set_index("gpu_precision")
    assert list(rows.index) == ["fp32 (TF32 off)", "tf32", "bf16 autocast"] and (rows.n == 2).all()
    assert rows.loc["fp32 (TF32 off)", "rel_l2_mean"] <= rows.loc["bf16 autocast", "rel_l2_mean"]


def test_fp_device_distance_says_when_there_is_no_gpu(tiny_denoiser: md.Denoiser, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    import pandas as pd

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = table1.fp_device_distance(tiny_denoiser, range(2), table1.table_config(tiny_denoiser, 3, "quad"))
    assert rows.note.tolist() == ["no GPU on this machine: the GPU-CPU distance is not measured"]
    measured = pd.DataFrame({"gpu_precision": ["fp32 (TF32 off)", "tf32"], "n": [8, 8], "rel_l2_mean": [8e-7, 1.6e-4],
                             "note": ["", ""]})
    earlier = tmp_path / "table1_fp_gpu_vs_cpu.csv"
    measured.to_csv(earlier, index=False)
    kept = table1.fp_device_distance(tiny_denoiser, range(2), table1.table_config(tiny_denoiser, 3, "quad"), earlier)
    assert kept.rel_l2_mean.tolist() == [8e-7, 1.6e-4] and kept.note.str.startswith("kept from an earlier run").all()
    rows.to_csv(earlier, index=False)  # an earlier CPU render measured nothing: nothing to keep
    again = table1.fp_device_distance(tiny_denoiser, range(2), table1.table_config(tiny_denoiser, 3, "quad"), earlier)
    assert again.gpu_precision.tolist() == ["-"]


def test_skipping_missing_rows_still_needs_the_anchors_and_a_known_choice(tiny_denoiser: md.Denoiser,
                                                                        tmp_path: Path) -> None:
    config = table1.table_config(tiny_denoiser, 3, "quad")
    with pytest.raises(ValueError, match="still needs the anchor rows, and fp, w8a32, w4a32 have no run"):
        table1.rows_to_score(tiny_denoiser, ["w8a4"], range(4), config, tmp_path, "skip", device="cpu")
    with pytest.raises(ValueError, match="missing_runs must be one of sample, skip, got 'ignore'"):
        table1.rows_to_score(tiny_denoiser, ["w8a4"], range(4), config, tmp_path, "ignore")  # type: ignore[arg-type]


def test_a_paper_pair_is_also_read_against_full_precision_activations() -> None:
    """Hand-made W8A3 rows with the paper's cells: MoDiff vs direct as the paper reports it, then against the
    paper's anchor W8A32 (4.14 against 4.24 there): near within 10% of our W8A32's FID, else DIFFERS."""
    import pandas as pd

    def table(vs_weights_only: str) -> pd.DataFrame:
        return pd.DataFrame({
            "preset": ["w8a32", "w8a3", "w8a3-modiff"], "w_bits": [8, 8, 8], "a_bits": [32, 3, 3],
            "numerics": ["-", "per-sample", "per-sample"], "weights": ["RTN"] * 3,
            "fid_classifier": [1.4, 71.3, 1.73], "fid_ci95_low": [1.3, 71.1, 1.62], "fid_ci95_high": [1.5, 71.5, 1.83],
            "paper_fid": [4.24, 143.39, 4.14], "vs_weights_only": ["", "w", vs_weights_only],
            "modiff_vs_direct": ["", "", "better: -69.6 [-69.8, -69.4]"]})

    (line,) = table1._paper_pairs(table("worse: +0.33 [+0.25, +0.41]"))
    assert "MoDiff vs direct better: -69.6 [-69.8, -69.4]: agrees with the paper." in line
    assert line.endswith("Against full-precision activations at these weights (the paper's 4.24, 0.98x there): "
                         "w8a32 1.4 [1.3, 1.5], MoDiff worse: +0.33 [+0.25, +0.41] (1.24x): DIFFERS from the paper "
                         "(not within 10% of it).")
    (line,) = table1._paper_pairs(table("worse: +0.05 [+0.02, +0.08]"))
    assert line.endswith("near it, as in the paper.")
