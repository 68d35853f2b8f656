"""The `modiff` command line, through click's test runner."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from modiff.cli import main
from modiff.models.registry import data_dir
from modiff.pipelines.train import DDIMTrainConfig, export_weights

from conftest import TINY, tiny_net


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_unknown_model_lists_presets(tmp_path: Path) -> None:
    """`sample --model nonexistent-preset` exits non-zero and names the valid presets."""
    result = _invoke("sample", "--model", "nonexistent-preset", "--seeds", "0-1", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "nonexistent-preset" in result.output and "fmnist-ddim" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("seeds", ["1-", "3-1", "a,b", "1,1"])
def test_malformed_seeds_is_a_usage_error(tmp_path: Path, seeds: str) -> None:
    """A bad --seeds spec is a usage error (exit 2) that names the option."""
    result = _invoke("sample", "--seeds", seeds, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "Invalid value for '--seeds'" in result.output


def test_bad_choice_is_a_usage_error(tmp_path: Path) -> None:
    """An unknown --sampler lists the allowed samplers."""
    result = _invoke("sample", "--sampler", "euler", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "dpm-solver" in result.output


def test_help_shows_examples() -> None:
    """`sample --help` and `train ddim --help` show runnable examples."""
    sample_help = _invoke("sample", "--help")
    assert sample_help.exit_code == 0
    assert "Examples:" in sample_help.output and "modiff sample --seeds 0-63 --out data/runs/fp" in sample_help.output
    train_help = _invoke("train", "ddim", "--help")
    assert train_help.exit_code == 0 and "modiff train ddim --out" in train_help.output


def test_sample_from_exported_folder(tmp_path: Path) -> None:
    """End to end on a tiny exported model: PNGs, grid, npz and a manifest naming the model."""
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    out = tmp_path / "run"
    result = _invoke("sample", "--model", str(tmp_path / "tiny"), "--seeds", "0-2", "--steps", "2", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote 3 new samples to {out}\n" in result.output
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "grid.png").exists() and (out / "samples.npz").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["model"]["model"] == str(tmp_path / "tiny")
    assert manifest["identity"]["sample"]["steps"] == 2
    again = _invoke("sample", "--model", str(tmp_path / "tiny"), "--seeds", "0-2", "--steps", "3", "--device", "cpu", "--out", str(out))
    assert again.exit_code == 1 and "another configuration" in again.output


def test_rerun_says_what_it_reused(tmp_path: Path) -> None:
    """A re-run of a finished run writes nothing new and says so; a longer seed range adds only the new seeds."""
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["sample", "--model", str(tmp_path / "tiny"), "--steps", "2", "--device", "cpu", "--out", str(out)]
    assert _invoke(*args, "--seeds", "0-2").exit_code == 0
    again = _invoke(*args, "--seeds", "0-2")
    assert again.exit_code == 0, again.output
    assert f"wrote 0 new samples to {out}; reused 3 already there\n" in again.output
    more = _invoke(*args, "--seeds", "0-4")
    assert more.exit_code == 0, more.output
    assert f"wrote 2 new samples to {out}; reused 3 already there\n" in more.output
    assert len(list((out / "samples").iterdir())) == 5


@pytest.mark.skipif(not (data_dir() / "fmnist-ddim" / "config.yaml").is_file(),
                    reason="the shipped fmnist-ddim weights (data/fmnist-ddim/config.yaml) are not in the repository yet")
def test_sample_shipped_preset(tmp_path: Path) -> None:
    """`modiff sample` with the default fmnist-ddim preset writes 32x32 grey PNGs."""
    from PIL import Image

    result = _invoke("sample", "--seeds", "0-1", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    image = Image.open(tmp_path / "run" / "samples" / "000001.png")
    assert image.size == (32, 32) and image.mode == "L"


def test_sample_with_quant_preset_records_config(tmp_path: Path) -> None:
    """`sample --preset w4a4-modiff` runs quantized sampling and the manifest records the quant config;
    an unknown preset fails before anything is sampled."""
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["sample", "--model", str(tmp_path / "tiny"), "--seeds", "0-1", "--steps", "3", "--device", "cpu", "--out", str(out)]
    result = _invoke(*args, "--preset", "w4a4-modiff")
    assert result.exit_code == 0, result.output
    identity = json.loads((out / "manifest.json").read_text())["identity"]["model"]
    assert identity["quant_preset"] == "w4a4-modiff"
    assert identity["quant_config"]["mode"] == "modulated" and identity["quant_config"]["activation"]["spec"]["bits"] == 4
    bad = _invoke(*args[:-1], str(tmp_path / "other"), "--preset", "w4a5")
    assert bad.exit_code == 1 and "valid presets" in bad.output and not (tmp_path / "other").exists()


def test_cuda_graphs_need_cuda(tmp_path: Path) -> None:
    """`sample --cuda-graphs` on the CPU is a clear error, raised before the run directory is made."""
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    result = _invoke("sample", "--model", str(tmp_path / "tiny"), "--seeds", "0", "--steps", "2", "--device", "cpu",
                     "--cuda-graphs", "--out", str(tmp_path / "run"))
    assert result.exit_code == 1 and "needs a CUDA device" in result.output
    assert not (tmp_path / "run").exists()


def test_execution_defaults_and_opt_outs_are_recorded(tmp_path: Path) -> None:
    """On the CPU `sample`, `evaluate`'s options and `calibrate-data` keep fp32 eager; --precision is part of
    the run identity and the manifests record compile and CUDA graphs."""
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    common = ("--model", str(tmp_path / "tiny"), "--seeds", "0-1", "--steps", "2", "--device", "cpu")
    assert _invoke("sample", *common, "--out", str(tmp_path / "auto")).exit_code == 0
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    session = manifest["sessions"][0]
    assert manifest["identity"]["sample"]["precision"] == "fp32" and manifest["identity"]["execution"]["compile"] is False
    assert session["cuda_graphs"] is False and session["precision"]["label"] == "fp32"
    result = _invoke("sample", *common, "--precision", "bf16", "--no-compile", "--no-cuda-graphs", "--out", str(tmp_path / "auto"))
    assert result.exit_code == 1 and "sample.precision: 'fp32' -> 'bf16'" in result.output
    assert "--no-compile" in _invoke("evaluate", "--help").output
    data = tmp_path / "calib"
    result = _invoke("calibrate-data", "--model", str(tmp_path / "tiny"), "--steps", "3", "--calib-steps", "1",
                     "--samples-per-step", "2", "--device", "cpu", "--out", str(data))
    assert result.exit_code == 0, result.output
    metadata = json.loads((data / "manifest.json").read_text())["metadata"]
    assert metadata["execution"] == {"precision": "fp32", "compile": False, "cuda_graphs": False}


def test_bops_of_cifar_config(tmp_path: Path) -> None:
    """`modiff bops` on the CIFAR-10 architecture: 113 layers, about 6.05 GMAC in conv/linear layers."""
    import torch
    import yaml

    from modiff.models.ddim_unet import DDIMUNetConfig, DDIMUNet

    config = DDIMTrainConfig(model=DDIMUNetConfig(ch=128, in_channels=3, out_ch=3)).official_yaml()
    (tmp_path / "cifar10.yml").write_text(yaml.safe_dump(config))
    torch.save(DDIMUNet(DDIMUNetConfig(ch=128, in_channels=3, out_ch=3)).state_dict(), tmp_path / "model.ckpt")
    result = _invoke("bops", "--model", str(tmp_path / "model.ckpt"), "--config", str(tmp_path / "cifar10.yml"),
                     "--preset", "w8a4-modiff")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layers_counted"] == 113
    assert report["gmacs_conv_linear"] == pytest.approx(6.05, abs=0.01)
    assert report["gmacs_paper_convention"] * 8 * 32 == pytest.approx(1636, abs=1)  # the paper's W8A32 GBops
    assert report["modiff_state_mb_per_image"] == pytest.approx(44.6, abs=0.1)


def test_reproduce_takes_comma_separated_notebooks(tmp_path: Path) -> None:
    """--notebooks a,b is split on commas (validated before anything runs: the unknown name is the error)."""
    result = CliRunner().invoke(main, ["reproduce", "--model", "fmnist-ldm", "--notebooks", "model_card,fig1b,fig3_compensation",
                                       "--reports", str(tmp_path)])
    assert result.exit_code != 0 and "unknown notebooks ['fig1b']" in result.output
    assert not list(tmp_path.iterdir())


def test_reproduce_overrides_are_typed() -> None:
    """`--set` values take the preset field's type; a wrong key or value says what is allowed."""
    from modiff.pipelines.reproduce import parse_override

    assert parse_override("num_samples=8") == ("num_samples", 8)
    assert parse_override("calibrate=true") == ("calibrate", True)
    assert parse_override("adaround_iters=5000") == ("adaround_iters", 5000)
    assert parse_override("device=cuda:1") == ("device", "cuda:1")
    with pytest.raises(ValueError, match="calibrate takes true or false"):
        parse_override("calibrate=yes please")
    with pytest.raises(ValueError, match="steps takes an integer"):
        parse_override("steps=many")
    with pytest.raises(ValueError, match="key one of num_samples"):
        parse_override("sample_count=3")
    result = CliRunner().invoke(main, ["reproduce", "--set", "steps=many"])
    assert result.exit_code != 0 and "steps takes an integer" in result.output
    from modiff.pipelines.reproduce import reproduce

    with pytest.raises(ValueError, match=r"sizes must be >= 1, got \{'analysis_samples': 0\}"):
        reproduce("quick", overrides={"analysis_samples": 0})
    assert parse_override("missing_runs=skip") == ("missing_runs", "skip")
    with pytest.raises(ValueError, match="missing_runs must be sample or skip, got 'drop'"):
        reproduce("quick", overrides={"missing_runs": "drop"})


def test_reproduce_index_only_rewrites_the_index(tmp_path: Path) -> None:
    """--index-only runs no notebook: it rewrites index.html and index.md of an existing report folder, and
    names the command that makes a missing one."""
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "manifest.json").write_text(json.dumps({"preset": {"name": "quick"},
                                                                  "parameters": {"model": "fmnist-ddim"}}))
    result = CliRunner().invoke(main, ["reproduce", "--index-only", "--reports", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"index: {tmp_path / 'quick' / 'index.html'}"
    assert "Notebook `fig1a_caching`: not run yet" in (tmp_path / "quick" / "index.md").read_text()
    result = CliRunner().invoke(main, ["reproduce", "--index-only", "--preset", "paper", "--reports", str(tmp_path)])
    assert result.exit_code != 0 and "run `modiff reproduce --preset paper --model fmnist-ddim` first" in result.output


@pytest.mark.skipif(not (data_dir() / "fmnist-classifier" / "model.safetensors").is_file(), reason="no shipped classifier")
def test_evaluate_prints_the_fidelity_to_the_fp_run(tmp_path: Path, tame_denoiser, monkeypatch: pytest.MonkeyPatch) -> None:
    """Besides the metrics block, `evaluate --fp-run` prints PSNR and relative L2 to the fp run, the numbers of
    metrics.json; without --fp-run it says how to get them."""
    from modiff.cli import sampling

    monkeypatch.setattr(sampling, "load_model_option", lambda *args, **kwargs: tame_denoiser)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh machine: only the shipped statistics
    common = ["evaluate", "--seeds", "0-9", "--steps", "2", "--ref", "fmnist-test", "--device", "cpu"]
    fp = _invoke(*common, "--out", str(tmp_path / "fp"))
    assert fp.exit_code == 0, fp.output
    assert "add --fp-run RUN" in fp.output and f"written to {tmp_path / 'fp' / 'metrics.json'}" in fp.output
    result = _invoke(*common, "--preset", "w8a4-modiff", "--fp-run", str(tmp_path / "fp"), "--out", str(tmp_path / "q"))
    assert result.exit_code == 0, result.output
    fidelity = json.loads((tmp_path / "q" / "metrics.json").read_text())["fidelity_to_fp"]
    psnr, pixels = fidelity["psnr_db"], fidelity["rel_l2_pixels"]
    assert f"fidelity to the fp run {tmp_path / 'fp'}, per seed over 10 seeds (mean ± 95% CI):" in result.output
    assert f"  PSNR{' ' * 30}{psnr['mean']:.2f} ± {psnr['ci95']:.2f} dB\n" in result.output
    assert f"  relative L2 (pixels){' ' * 14}{pixels['mean']:.4f} ± {pixels['ci95']:.4f}\n" in result.output
    features = fidelity["rel_l2_features"]
    assert f"  relative L2 (classifier features) {features['mean']:.4f} ± {features['ci95']:.4f}\n" in result.output


def test_fidelity_lines_when_samples_equal_fp() -> None:
    """Seeds identical to fp have an infinite PSNR: they are left out of its mean, and the line says so."""
    from modiff.cli.summaries import fidelity_lines

    same = {"fp_run": "fp", "identical_samples": 4, "psnr_db": None, "rel_l2_pixels": {"mean": 0.0, "ci95": 0.0, "n": 4}}
    assert fidelity_lines(same) == ["fidelity to the fp run fp, per seed over 4 seeds (mean ± 95% CI):",
                                    f"  PSNR{' ' * 30}- (4 seeds identical to fp, left out)",
                                    f"  relative L2 (pixels){' ' * 14}0.0000 ± 0.0000"]
