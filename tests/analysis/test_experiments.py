"""Experiment drivers behind the notebooks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import modiff as md
from analysis import experiments


def test_published_audit_measures_both_behaviours(tiny_denoiser: md.Denoiser) -> None:
    """The per-step reset equals weight-only quantization exactly; per-tensor scales couple the batch."""
    audit = experiments.published_audit(tiny_denoiser, 4, range(3), steps=4).set_index("check")["value"]
    assert audit.iloc[0] == 0.0
    assert audit.iloc[1] > 0.0 and audit.iloc[2] > 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_published_audit_samples_on_the_device(tiny_denoiser: md.Denoiser) -> None:
    """On CUDA the audit samples there (the caller's model stays on the CPU) and measures the same behaviours."""
    audit = experiments.published_audit(tiny_denoiser, 4, range(3), steps=4, device="cuda")["value"]
    assert audit.iloc[0] == 0.0 and audit.iloc[1] > 0.0 and audit.iloc[2] > 0.0
    assert next(tiny_denoiser.parameters()).device.type == "cpu"


def test_bops_memory_table_scales_with_batch(tiny_denoiser: md.Denoiser) -> None:
    table = experiments.bops_memory_table(tiny_denoiser, ["w8a4-modiff"], [1, 4], steps=10)
    assert table.modiff_state_mb.iloc[1] == 4 * table.modiff_state_mb.iloc[0] > 0


def test_latent_model_samples_with_ldm_timesteps() -> None:
    """layer_inputs and sample_config follow the model: ldm spacing (range(0, 1000, 250) + 1 for 4 steps)."""
    from test_latent import _tiny_model

    model = _tiny_model()
    site = "net.middle_block.0.in_layers.2"
    inputs, ts = experiments.layer_inputs(model, [site], range(2), steps=4)
    assert ts == (751, 501, 251, 1)
    assert len(inputs[site]) == 4 and inputs[site][0].shape == (2, 64, 2, 2)
    assert experiments.sample_config(model, 4).spacing == "ldm"
    assert experiments.layer_inputs(model, ["net.out.2"], range(1), steps=4, spacing="uniform")[1] == (750, 500, 250, 0)


def test_paper_values_follow_the_model(tiny_denoiser: md.Denoiser) -> None:
    """A pixel model is compared with Table 1, a latent one with Tables 2 and 3 (LSUN LDMs)."""
    from test_latent import _tiny_model

    assert experiments.paper_tables(tiny_denoiser) == ("Table 1",)
    assert experiments.paper_tables(_tiny_model()) == ("Table 2", "Table 3")
    table1 = experiments.paper_values(["Table 1"])
    assert len(table1) and set(table1.table) == {"Table 1"}
    assert len(experiments.paper_values()) > len(table1)
    assert experiments.sample_config(tiny_denoiser, 4, "ddpm").spacing == "quad"


def test_the_paper_spacing_is_quad_for_a_pixel_model_and_the_model_own_otherwise(tiny_denoiser: md.Denoiser) -> None:
    """The paper's DDIM runs use the published quad timesteps; a latent model keeps its ldm ones."""
    from test_latent import _tiny_model

    assert experiments.paper_spacing(tiny_denoiser) == "quad" and md.default_spacing(tiny_denoiser) == "uniform"
    assert experiments.paper_spacing(_tiny_model()) == "ldm"
    assert experiments.layer_inputs(tiny_denoiser, ["net.conv_out"], range(1), steps=5)[1] == md.timesteps(5, "quad")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trajectories_run_on_the_device_and_come_back_to_the_cpu(tiny_denoiser: md.Denoiser) -> None:
    """layer_inputs and warmup_table on CUDA: the same numbers as on the CPU (to float tolerance), results
    on the CPU, and the caller's model left where it was."""
    site = "net.mid.block_1.conv1"
    on_cpu, _ = experiments.layer_inputs(tiny_denoiser, [site], range(3), steps=4)
    on_gpu, _ = experiments.layer_inputs(tiny_denoiser, [site], range(3), steps=4, device="cuda")
    assert all(g.device.type == "cpu" and torch.allclose(g, c, rtol=1e-2, atol=1e-2)  # TF32 convolutions on the GPU
               for g, c in zip(on_gpu[site], on_cpu[site]))
    cpu_table = experiments.warmup_table(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4)
    gpu_table = experiments.warmup_table(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4, device="cuda")
    assert gpu_table.rel_l2_pixels.to_numpy() == pytest.approx(cpu_table.rel_l2_pixels.to_numpy(), abs=5e-2)
    assert next(tiny_denoiser.parameters()).device.type == "cpu"


def test_parallel_runs_start_with_one_adaround_per_weight_quantization() -> None:
    """The first wave computes each weight quantization's AdaRound once (an -adaround preset shares the
    W4 weights of qdiff-w4a4); the presets reusing them follow. Only presets that calibrate take part."""
    presets = ["fp", "w8a4", "qdiff-w8a4", "qdiff-w8a6-modiff", "qdiff-w4a4", "qdiff-w4a4-modiff", "qdiff-w8a2",
               "w4a4-adaround-modiff"]
    assert experiments._waves(presets) == [["qdiff-w8a4", "qdiff-w4a4"],
                                           ["fp", "w8a4", "qdiff-w8a6-modiff", "qdiff-w4a4-modiff", "qdiff-w8a2",
                                            "w4a4-adaround-modiff"]]
    from modiff.quant.ptq.reuse import Calibration

    assert [p for p in presets if experiments._calibrates(p, Calibration())] == \
        ["qdiff-w8a4", "qdiff-w8a6-modiff", "qdiff-w4a4", "qdiff-w4a4-modiff", "qdiff-w8a2", "w4a4-adaround-modiff"]
    assert not any(experiments._calibrates(p, None) for p in presets)


@pytest.mark.slow
def test_runs_made_in_parallel_equal_those_made_in_turn(tmp_path) -> None:
    """fill_runs on two torch.distributed ranks (gloo) makes every run sample_run would make, with one
    AdaRound per weight quantization; the table functions then reuse them, and the images equal, bit for
    bit, runs made in one process."""
    import json

    import numpy as np

    from modiff.pipelines.train import DDIMTrainConfig, export_weights
    from conftest import TINY, tiny_net

    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), str(tmp_path / "tiny"))  # a str path too
    model = md.load_model(str(tmp_path / "tiny"))
    config, seeds = experiments.sample_config(model, 3), range(4)
    calibration = experiments.calibration_settings(model, 3, 4, 2, 2)
    presets = ["w8a4", "w8a4-modiff", "qdiff-w8a4", "qdiff-w8a4-modiff", "qdiff-w8a6"]
    experiments.fill_runs(model, ["fp", *presets], seeds, config, tmp_path / "parallel", "cpu,cpu", calibration=calibration)
    weights = list((tmp_path / "parallel" / "quantized" / "weights").iterdir())
    assert len(weights) == 1  # the three qdiff-w8 presets share one AdaRound
    for preset in ["fp", *presets]:
        run = experiments.sample_run(model, preset, seeds, config, tmp_path / "parallel", device="cpu")
        (session,) = json.loads((run / "manifest.json").read_text())["sessions"]  # reused, not re-sampled
        assert session["world_size"] == 2
    for preset in ["fp", "w8a4", "w8a4-modiff"]:
        alone = experiments.sample_run(model, preset, seeds, config, tmp_path / "alone", device="cpu")
        ours = tmp_path / "parallel" / alone.name
        with np.load(alone / "samples.npz") as a, np.load(ours / "samples.npz") as b:
            assert np.array_equal(a["images"], b["images"])
    experiments.fill_runs(model, ["fp"], seeds, config, tmp_path / "parallel", "cpu,cpu")  # done: nothing launched
    with pytest.raises(ValueError, match="at least one device"):
        experiments.fill_runs(model, ["fp"], seeds, config, tmp_path / "x", "")
    with pytest.raises(ValueError, match=r"pass calibration=Calibration"):  # a worker's error reaches the caller
        experiments.fill_runs(model, ["qdiff-w8a4"], seeds, config, tmp_path / "uncalibrated", "cpu,cpu")


def test_warmup_per_seed_is_batch_invariant_and_summarised(tiny_denoiser: md.Denoiser) -> None:
    """Per-seed rows, the same in one batch or in batches of 2; the table is their mean with an interval."""
    one = experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4)
    split = experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4, batch_size=2)
    assert one["seed"].tolist() == [0, 1, 2, 0, 1, 2] and one["warmup_steps"].tolist() == [1, 1, 1, 2, 2, 2]
    assert split["rel_l2_pixels"].to_numpy() == pytest.approx(one["rel_l2_pixels"].to_numpy(), abs=1e-4)
    table = experiments.warmup_table(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4)
    assert table["rel_l2_pixels"].to_numpy() == pytest.approx(one.groupby("warmup_steps")["rel_l2_pixels"].mean().to_numpy())
    assert (table["ci95_low"] <= table["rel_l2_pixels"]).all() and (table["n"] == 3).all()
    with pytest.raises(ValueError, match="batch_size"):
        experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1], range(2), steps=4, batch_size=0)


def test_warmup_per_seed_travels_with_the_runs(tiny_denoiser: md.Denoiser, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With runs_dir the per-seed table is kept and read back exactly, without sampling; a call asking for other
    settings is refused; a table whose .json was never written (an interrupted write) is made again."""
    made = experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4, runs_dir=tmp_path)
    path, identity = experiments.warmup_location(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), 4, tmp_path)
    assert path.exists() and json.loads(path.with_suffix(".json").read_text())["identity"] == identity
    monkeypatch.setattr(experiments, "_sample_warmup", lambda *args: pytest.fail("sampled again"))
    kept = experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4, runs_dir=tmp_path)
    pd.testing.assert_frame_equal(kept, made, check_exact=True)
    with pytest.raises(ValueError, match=r"other settings .*warmup\.seeds: '0-2' -> '0-3'"):
        experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1, 2], range(4), steps=4, runs_dir=tmp_path)
    monkeypatch.undo()
    path.with_suffix(".json").unlink()
    again = experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1, 2], range(3), steps=4, runs_dir=tmp_path)
    pd.testing.assert_frame_equal(again, made)


def test_warmup_paired_adds_the_steps_beyond_enough() -> None:
    """Every setting against the fewest steps; those above ``enough`` also against it, by hand on three seeds."""
    errors = {1: [0.5, 0.7, 0.6], 2: [0.4, 0.5, 0.5], 5: [0.3, 0.35, 0.31], 8: [0.29, 0.36, 0.28]}
    per_seed = pd.DataFrame([{"warmup_steps": k, "seed": i, "rel_l2_pixels": e} for k, v in errors.items()
                             for i, e in enumerate(v)])
    paired = experiments.warmup_paired(per_seed, 1, enough=5)
    assert list(zip(paired["warmup_steps"], paired["baseline"])) == [(2, 1), (5, 1), (8, 1), (8, 5)]
    beyond = paired.iloc[-1]
    assert beyond["mean_difference"] == pytest.approx((-0.01 + 0.01 - 0.03) / 3) and beyond["n"] == 3
    assert paired.iloc[1]["mean_difference"] == pytest.approx((-0.2 - 0.35 - 0.29) / 3)
    for enough in (1, 8, 4):  # the baseline itself, nothing above it, not measured
        assert (experiments.warmup_paired(per_seed, 1, enough)["baseline"] == 1).all()


def test_layer_sensitivity_variants(tiny_denoiser: md.Denoiser) -> None:
    """The preset on all layers, on the first or last convolution only, and on all but those two."""
    from analysis import layer_sensitivity

    assert layer_sensitivity.edge_convolutions(tiny_denoiser) == ("net.conv_in", "net.conv_out")
    variants = layer_sensitivity.layer_variants(tiny_denoiser, md.presets["w4a32"])
    assert variants["net.conv_out only"].include == ("net.conv_out",)
    assert variants["all but net.conv_in and net.conv_out"].exclude == ("net.conv_in", "net.conv_out")
    table = layer_sensitivity.layer_sensitivity(tiny_denoiser, ["w4a32"], range(2), steps=3)
    assert table["layers"].tolist() == list(variants) and (table["n"] == 2).all()
    assert (table["rel_l2_pixels"] > 0).all()


def test_state_accounting_by_hand(tiny_denoiser: md.Denoiser) -> None:
    """fp32 a_hat + o_hat is the bops_memory count; a_hat only is smaller; one a_hat for q, k and v saves two
    attention inputs per attention block; 3-bit codes are 3/32 of the first."""
    from analysis import memory

    table = memory.state_accounting(tiny_denoiser, "w8a3-modiff")
    bops = experiments.bops_memory_table(tiny_denoiser, ["w8a3-modiff"], [1], steps=4)
    mb = table["mb_per_image"].to_numpy()
    assert mb[0] == pytest.approx(bops.modiff_state_mb.item())
    assert mb[2] == pytest.approx(mb[1] / 2) and mb[4] == pytest.approx(mb[0] * 3 / 32) and mb[1] < mb[0]
    attention = [m for m in tiny_denoiser.modules() if getattr(m, "shared_input", ())]
    assert attention  # the tiny UNet has attention blocks: q, k and v read one (1, C, H, W) tensor
    saved = 0
    for block in attention:
        inputs = []
        hook = block.q.register_forward_pre_hook(lambda m, args: inputs.append(args[0].numel()))
        with torch.no_grad():
            tiny_denoiser(torch.zeros(1, *tiny_denoiser.sample_shape), torch.full((1,), 500))
        hook.remove()
        saved += 2 * inputs[0]  # k's and v's a_hat, in bf16
    assert mb[2] - mb[3] == pytest.approx(saved * 2 / 1e6)
    with pytest.raises(ValueError, match="keeps no MoDiff state"):
        memory.state_accounting(tiny_denoiser, "w8a8")


def test_sample_run_notes_whether_it_made_or_reused_the_run(tiny_denoiser: md.Denoiser, tmp_path) -> None:
    """Inside a recording (as `modiff reproduce` runs each notebook), a first sample_run is noted as made,
    the same call again as reused, with the sampling time the run had taken."""
    from modiff.pipelines import run_usage

    config = experiments.sample_config(tiny_denoiser, 2)
    with run_usage.recording(tmp_path / "usage.jsonl") as path:
        experiments.sample_run(tiny_denoiser, "fp", range(2), config, tmp_path / "runs", device="cpu")
        made = run_usage.RunUsage.read(path)
        experiments.sample_run(tiny_denoiser, "fp", range(2), config, tmp_path / "runs", device="cpu")
        experiments.sample_run(tiny_denoiser, "fp", range(2), config, tmp_path / "other", device="cpu")
    assert made == run_usage.RunUsage(made=1, reused=0, reused_sampling_seconds=0.0)
    usage = run_usage.RunUsage.read(path)
    assert (usage.made, usage.reused) == (2, 0)  # a folder made here stays "made" when read back
    with run_usage.recording(tmp_path / "again.jsonl") as path:
        experiments.sample_run(tiny_denoiser, "fp", range(2), config, tmp_path / "runs", device="cpu")
    again = run_usage.RunUsage.read(path)
    import json

    sessions = json.loads((tmp_path / "runs" / "fp-ddim2" / "manifest.json").read_text())["sessions"]
    assert (again.made, again.reused) == (0, 1)
    assert again.reused_sampling_seconds == round(sum(s["seconds"] for s in sessions), 1)


def test_run_folders_keep_precisions_apart(tiny_denoiser: md.Denoiser, tmp_path) -> None:
    """Sample runs take the device's precision ("auto"); a bf16 run (the GPU default) gets its own folder
    beside the fp32 one (which keeps the older name), so neither refuses the other's identity."""
    config = experiments.sample_config(tiny_denoiser, 2)
    assert config.precision == "auto"
    cpu = experiments._run_location(tiny_denoiser, "w8a8", config.resolved(torch.device("cpu")), tmp_path)[0]
    gpu = experiments._run_location(tiny_denoiser, "w8a8", config.resolved(torch.device("cuda")), tmp_path)[0]
    assert cpu.name == "w8a8-ddim2" and gpu.name == "w8a8-ddim2-bf16"
    run = experiments.sample_run(tiny_denoiser, "fp", range(2), config, tmp_path, device="cpu")
    assert run.name == "fp-ddim2"
    with pytest.raises(AssertionError, match="resolve the precision"):
        experiments._run_location(tiny_denoiser, "fp", config, tmp_path)


def test_analysis_trajectories_run_in_ieee_float32(tiny_denoiser: md.Denoiser) -> None:
    """Figures 1a, 1b and 3, the warm-up table and the layer sensitivity sample with TF32 off even where it is
    on around them (cuDNN's default on a GPU), and their tables say so; the switch is restored afterwards."""
    from analysis import layer_sensitivity, network
    from modiff.pipelines.execution import float32_precision

    seen = []
    conv_switch = torch.backends.cudnn.conv
    hook = tiny_denoiser.net.conv_out.register_forward_pre_hook(lambda *_: seen.append(conv_switch.fp32_precision))
    try:
        with float32_precision("tf32"):
            experiments.layer_inputs(tiny_denoiser, ["net.conv_out"], range(1), steps=2)
            ts = md.timesteps(2, "quad")
            network.caching_error_samples(tiny_denoiser, [2], x_T=md.noise(range(1), tiny_denoiser.sample_shape), timesteps=ts)
            warm = experiments.warmup_per_seed(tiny_denoiser, "w8a8-modiff", [1], range(1), steps=2)
            table = layer_sensitivity.layer_sensitivity(tiny_denoiser, ["w4a32"], range(1), steps=2)
            assert conv_switch.fp32_precision == "tf32"
    finally:
        hook.remove()
    assert seen and set(seen) == {"ieee"}
    assert set(warm["precision"]) == set(table["precision"]) == {"fp32 on cpu"}
    assert experiments.analysis_precision(torch.device("cuda")) == "fp32 (TF32 off) on cuda"


def test_run_precision_reads_every_session(tmp_path: Path) -> None:
    sessions = [{"precision": {"label": "fp32 (TF32 off)", "device_type": "cuda"}}, {"environment": {}}]
    (tmp_path / "manifest.json").write_text(json.dumps({"sessions": sessions}))
    assert experiments.run_precision(tmp_path) == "fp32 (TF32 off) on cuda; fp32, TF32 not recorded (older run)"


def test_published_runs_record_their_config_and_older_ones_are_refused(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    """A published preset's run identity holds its config (scales per run of 64 samples), so a run made
    when the scale spanned the whole execution batch (identity without it) is refused, not reused; the
    other presets' identities keep their form, and their older runs stay reusable."""
    config = experiments.sample_config(tiny_denoiser, 2)
    run = experiments.sample_run(tiny_denoiser, "published-w8a4", range(2), config, tmp_path, device="cpu")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"]["model"]["quant_config"]["activation"]["spec"]["samples_per_scale"] == 64
    del manifest["identity"]["model"]["quant_config"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="quant_config"):
        experiments.sample_run(tiny_denoiser, "published-w8a4", range(2), config, tmp_path, device="cpu")
    direct = experiments.sample_run(tiny_denoiser, "w8a4", range(2), config, tmp_path, device="cpu")
    assert "quant_config" not in json.loads((direct / "manifest.json").read_text())["identity"]["model"]


def test_paper_samplers_are_ddim_20_half_and_all_steps_then_ddpm_and_dpm_solver() -> None:
    assert experiments.paper_samplers(100) == [("ddim", 20), ("ddim", 50), ("ddim", 100), ("ddpm", 100),
                                               ("dpm-solver", 100)]
    assert experiments.paper_samplers(20) == [("ddim", 10), ("ddim", 20), ("ddpm", 20), ("dpm-solver", 20)]
    assert experiments.paper_samplers(1) == [("ddim", 1), ("ddpm", 1), ("dpm-solver", 1)]


def test_samplers_without_runs_are_skipped_or_sampled_as_asked(tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    """missing_runs="skip" keeps the samplers whose fp and preset runs are all there (a CPU rendering GPU
    summaries), "sample" keeps every one; anything else is refused."""
    samplers = [("ddim", 2), ("ddpm", 2)]
    experiments.sampler_runs(tiny_denoiser, ["w8a4"], samplers[:1], range(3), tmp_path, device="cpu")
    experiments.sample_run(tiny_denoiser, "fp", range(3), experiments.sample_config(tiny_denoiser, 2, "ddpm"),
                           experiments.spacing_runs_dir(tiny_denoiser, tmp_path, experiments.sample_config(
                               tiny_denoiser, 2, "ddpm")), device="cpu")  # ddpm has its fp run, not the preset's
    assert experiments.samplers_to_run(tiny_denoiser, ["w8a4"], samplers, range(3), tmp_path, "skip", "cpu") == (
        [("ddim", 2)], [("ddpm", 2)])
    assert experiments.samplers_to_run(tiny_denoiser, ["w8a4"], samplers, range(4), tmp_path, "skip", "cpu") == (
        [], samplers)  # a seed more than the runs hold
    assert experiments.samplers_to_run(tiny_denoiser, ["w8a4"], samplers, range(3), tmp_path) == (samplers, [])
    with pytest.raises(ValueError, match="missing_runs must be one of sample, skip"):
        experiments.samplers_to_run(tiny_denoiser, ["w8a4"], samplers, range(3), tmp_path, "ignore")  # type: ignore[arg-type]


def test_paired_verdicts_of_the_sampler_table_read_each_score_its_way() -> None:
    """Higher KID is worse, higher precision better; a side without the score's resamples (a summary made
    before KID was scored) gives no verdict."""
    from modiff.metrics.fidelity import Scores

    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    low = Scores({"kid": 0.01, "precision": 0.6}, {"kid": 0.01 + 0.001 * base, "precision": 0.6 + 0.01 * base})
    high = Scores({"kid": 0.05, "precision": 0.8}, {"kid": 0.05 + 0.001 * base, "precision": 0.8 + 0.01 * base})
    scores = {"a": high, "b": low, "old": Scores({"fid": 3.0}, {"fid": 3.0 + base})}
    assert experiments.paired_verdict(scores, "a", "b", 0.95, "kid").startswith("worse: +0.04")
    assert experiments.paired_verdict(scores, "a", "b", 0.95, "precision").startswith("better: +0.2")
    assert experiments.paired_verdict(scores, "b", "a", 0.95, "precision").startswith("worse: -0.2")
    assert experiments.paired_verdict(scores, "a", "old", 0.95, "kid") == ""
    assert experiments.paired_verdict(scores, "a", "missing", 0.95) == ""
