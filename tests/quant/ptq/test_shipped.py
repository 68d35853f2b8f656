"""Shipped calibrations: AdaRound codes and static scales in a model folder, read without calibrating."""
from __future__ import annotations

import dataclasses
import json
import re
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import modiff as md
from modiff.cli import main
from modiff.pipelines.execution import float32_precision
from modiff.quant import QuantConfig, presets, quant_layers, quantize
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.cost import preset_report
from modiff.quant.ptq.data import CalibDataConfig
from modiff.quant.ptq.calibrate import CalibrationConfig, weight_only_config
from modiff.quant.ptq.reuse import Calibration, calibrate_shipped, first_round, quantized_model
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.ptq.saved import load_quantized, read_manifest, save_quantized
from modiff.quant.ptq.shipped import CALIBRATION_DIR, shipped_iterations, shipped_model
from modiff.pipelines.train import DDIMTrainConfig, export_weights

from conftest import TINY, tiny_net

ROOT = Path(__file__).resolve().parents[3]

FAST = Calibration(
    CalibDataConfig(steps=4, calib_steps=2, samples_per_step=4, batch_size=4),
    CalibrationConfig(AdaRoundConfig(iters=3, batch_size=4, log_every=3), ActCalibConfig(iters=2, batch_size=4, log_every=2),
                      capture_batch=4),
)
X, T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 300])


def _export(folder: Path) -> Path:
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), folder)
    return folder


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder with a shipped calibration of qdiff-w4a4 and qdiff-w4a4-modiff."""
    folder = _export(tmp_path_factory.mktemp("shipped") / "tiny")
    calibrate_shipped(md.load_model(folder), ["qdiff-w4a4", "qdiff-w4a4-modiff"], FAST, "cpu", "test")
    return folder


def _weights_folder(model_folder: Path) -> Path:
    manifest = json.loads((model_folder / CALIBRATION_DIR / "manifest.json").read_text())
    (weights,) = manifest["weights"]
    return model_folder / CALIBRATION_DIR / weights


def test_adaround_preset_equals_the_saved_weights_bit_for_bit(shipped: Path) -> None:
    model = md.load_model(shipped)
    reference = load_quantized(model, _weights_folder(shipped))
    qmodel = quantize(model, presets["w4a32-adaround"])
    assert qmodel.quant_config == presets["w4a32-adaround"]
    ref_layers = quant_layers(reference)
    for name, layer in quant_layers(qmodel).items():
        assert torch.equal(layer.weight_codes(), ref_layers[name].weight_codes())
        assert torch.equal(layer.weight_q, ref_layers[name].weight_q)
    with torch.no_grad():
        assert torch.equal(qmodel(X, T), reference(X, T))
        assert not torch.equal(qmodel(X, T), quantize(model, presets["w4a32"])(X, T))
    modulated = quantize(model, presets["w4a4-adaround-modiff"])
    for name, layer in quant_layers(modulated).items():
        assert torch.equal(layer.weight_q, ref_layers[name].weight_q)


def _once(qmodel: torch.nn.Module) -> torch.Tensor:
    """Two calls (a warm-up and a modulated step for stateful models) on X at T."""
    with md.trajectory(qmodel) if qmodel.quant_config.stateful else torch.no_grad():
        return torch.stack([qmodel(X, T), qmodel(X.flip(0), T)])


def test_static_presets_come_from_the_shipped_calibration(shipped: Path, tmp_path: Path) -> None:
    model = md.load_model(shipped)
    root = shipped / CALIBRATION_DIR
    for preset in ("qdiff-w4a4", "qdiff-w4a4-modiff"):
        saved = root / "quantized" / preset
        assert read_manifest(saved)["weights_from"] == f"../weights/{_weights_folder(shipped).name}"
        assert torch.equal(_once(shipped_model(model, preset)), _once(load_quantized(model, saved)))
    fallback = quantized_model(model, "qdiff-w4a4", tmp_path)  # no calibration given: the shipped one
    with torch.no_grad():
        assert torch.equal(fallback(X, T), shipped_model(model, "qdiff-w4a4")(X, T))
    assert not any(tmp_path.iterdir())


def test_manifest_and_summary_say_what_was_run(shipped: Path) -> None:
    root = shipped / CALIBRATION_DIR
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["iterations"] == {"used": {"adaround": 3, "activations": 2},
                                      "published": {"adaround": 20_000, "activations": 5_000}}
    assert sorted(manifest["presets"]) == ["qdiff-w4a4", "qdiff-w4a4-modiff"]
    assert not any(name.startswith("calib-data") for name in manifest["files"])
    for name, entry in manifest["files"].items():
        assert (root / name).stat().st_size == entry["bytes"]
    summary = json.loads((root / "summary.json").read_text())
    (adaround,) = summary["adaround"].values()
    report = read_manifest(_weights_folder(shipped))["metadata"]["report"]
    assert len(adaround["per_unit"]) == adaround["units"] == len(report["weights"]) > 0
    for unit, record in zip(adaround["per_unit"], report["weights"]):
        assert unit["ratio"] == pytest.approx(record["loss_adaround"] / record["loss_nearest"])
    assert sorted(summary["activations"]) == ["qdiff-w4a4", "qdiff-w4a4-modiff"]
    for activations in summary["activations"].values():  # the learned step sizes against their observer start
        units = activations["per_unit"]
        assert activations["units"] == len(units) > 0
        assert activations["units_lowered"] == sum(u["loss_learned"] < u["loss_start"] for u in units)
        assert activations["median_loss_ratio"] == pytest.approx(float(np.median([u["loss_learned"] / u["loss_start"]
                                                                                   for u in units])))
    assert shipped_iterations(md.load_model(shipped)) == {"adaround": 3, "activations": 2}


def test_a_model_without_shipped_calibration_has_no_iterations(tmp_path: Path, tiny_denoiser: md.Denoiser) -> None:
    assert shipped_iterations(md.load_model(_export(tmp_path / "bare"))) is None
    assert shipped_iterations(tiny_denoiser) is None  # not loaded from a folder


def test_weights_from_a_folder_for_a_model_without_shipped_codes(shipped: Path) -> None:
    """A model without a folder (as from a checkpoint file) takes AdaRound codes from any saved model of the
    same weight quantization (here a static preset, whose codes live in the weights folder it names)."""
    model = md.load_model(shipped)
    reference = quantize(model, presets["w4a4-adaround"])
    model.folder = None
    qmodel = quantize(model, presets["w4a4-adaround"], weights=shipped / CALIBRATION_DIR / "quantized" / "qdiff-w4a4")
    with torch.no_grad():
        assert torch.equal(qmodel(X, T), reference(X, T))


def test_missing_codes_say_how_to_make_and_pass_them(tmp_path: Path, tiny_denoiser: md.Denoiser) -> None:
    bare = md.load_model(_export(tmp_path / "bare"))
    for model in (bare, tiny_denoiser):
        with pytest.raises(ValueError, match="modiff calibrate-shipped --model .* --preset qdiff-w4a4") as err:
            quantize(model, presets["w4a4-adaround-modiff"])
        assert "--weights-from" in str(err.value) and "weights=" in str(err.value)
    with pytest.raises(ValueError, match="modiff calibrate-data"):
        quantized_model(bare, "qdiff-w4a4", tmp_path / "runs")


def test_wrong_weights_are_refused(shipped: Path, tiny_denoiser: md.Denoiser, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only a config with weight codes 'adaround'"):
        quantize(tiny_denoiser, presets["w4a4"], weights=_weights_folder(shipped))
    save_quantized(quantize(tiny_denoiser, presets["w8a32"]), tmp_path / "w8")
    with pytest.raises(ValueError, match="quantizes weights otherwise"):
        quantize(tiny_denoiser, presets["w4a4-adaround"], weights=tmp_path / "w8")
    nearest = quantize(tiny_denoiser, presets["w4a32-adaround"].with_weight_codes("nearest"))
    with pytest.raises(ValueError, match="holds other weights"):
        save_quantized(nearest, tmp_path / "dedup", weights_from=_weights_folder(shipped))


def test_checksum_mismatch_is_a_clear_error(shipped: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(shipped, copy)
    codes = _weights_folder(copy) / "quantized.safetensors"
    data = bytearray(codes.read_bytes())
    data[-1] ^= 1
    codes.write_bytes(bytes(data))
    model = md.load_model(copy)
    with pytest.raises(ValueError, match=r"checksum mismatch .*quantized\.safetensors"):
        quantize(model, presets["w4a4-adaround"])
    with pytest.raises(ValueError, match="checksum mismatch"):
        shipped_model(model, "qdiff-w4a4")


def test_only_static_presets_are_shipped(shipped: Path) -> None:
    with pytest.raises(ValueError, match="needs no calibration data"):
        calibrate_shipped(md.load_model(shipped), ["w4a4-adaround-modiff"], FAST)


def test_bops_need_no_codes(tiny_denoiser: md.Denoiser) -> None:
    report = preset_report(tiny_denoiser, presets["w4a4-adaround-modiff"], steps=10)
    assert report["gbops_per_step"] == preset_report(tiny_denoiser, presets["w4a4-modiff"], steps=10)["gbops_per_step"]


def test_presets_are_listed() -> None:
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0
    for name in ("w4a32-adaround", "w4a4-adaround", "w4a4-adaround-modiff", "w4a3-adaround-modiff"):
        assert f"\n{name} " in result.output
    assert "4b asymmetric per-channel adaround" in result.output


@pytest.mark.parametrize("preset", ["w4a4-adaround-modiff", "qdiff-w4a4-modiff"])
def test_cli_samples_with_shipped_calibration(shipped: Path, tmp_path: Path, preset: str) -> None:
    out = tmp_path / "run"
    args = ["sample", "--model", str(shipped), "--preset", preset, "--seeds", "0-1", "--steps", "2", "--device", "cpu",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("samples/*.png")) == ["000000.png", "000001.png"]


def test_cli_without_shipped_codes_says_how(tmp_path: Path) -> None:
    bare = _export(tmp_path / "bare")
    for preset in ("w4a4-adaround-modiff", "qdiff-w4a4"):
        result = CliRunner().invoke(main, ["sample", "--model", str(bare), "--preset", preset, "--seeds", "0",
                                           "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "run")])
        assert result.exit_code == 1 and "modiff calibrate-shipped" in result.output
        assert "Traceback" not in result.output


def test_cli_calibrate_shipped_writes_the_model_folder(tmp_path: Path) -> None:
    folder = _export(tmp_path / "tiny")
    args = ["calibrate-shipped", "--model", str(folder), "--preset", "qdiff-w4a4", "--steps", "4", "--calib-steps", "2",
            "--samples-per-step", "4", "--set", "adaround.iters=2", "--set", "adaround.batch_size=4",
            "--set", "activations.iters=2", "--set", "activations.batch_size=4", "--set", "capture_batch=4",
            "--first-seed", "7", "--spacing", "quad", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "AdaRound lowered the reconstruction loss of" in result.output
    manifest = json.loads((folder / CALIBRATION_DIR / "manifest.json").read_text())
    (command,) = manifest["commands"]
    assert command.startswith(f"modiff calibrate-shipped --model {folder} --preset qdiff-w4a4 --steps 4")
    assert manifest["iterations"]["used"] == {"adaround": 2, "activations": 2}
    assert list(manifest["presets"]) == ["qdiff-w4a4"]
    data = manifest["settings"]["data"]  # calibration seeds held out from evaluation seeds, on the asked spacing
    assert (data["first_seed"], data["spacing"]) == (7, "quad")
    assert "--first-seed 7 --spacing quad" in command

    # A preset added later must be calibrated as the shipped ones were: one manifest states one set of settings.
    other = [a if a not in ("qdiff-w4a4", "quad") else {"qdiff-w4a4": "qdiff-w4a4-modiff", "quad": "uniform"}[a]
             for a in args]
    refused = CliRunner().invoke(main, other)
    assert refused.exit_code != 0
    assert "holds qdiff-w4a4 calibrated with other settings (data.spacing: 'quad' there, 'uniform' here)" in refused.output
    assert json.loads((folder / CALIBRATION_DIR / "manifest.json").read_text()) == manifest  # nothing touched
    old_style = {("command" if k == "commands" else k): (command if k == "commands" else v) for k, v in manifest.items()}
    (folder / CALIBRATION_DIR / "manifest.json").write_text(json.dumps(old_style))  # as shipped before "commands"
    added = CliRunner().invoke(main, [a if a != "qdiff-w4a4" else "qdiff-w4a4-modiff" for a in args])
    assert added.exit_code == 0, added.output
    manifest = json.loads((folder / CALIBRATION_DIR / "manifest.json").read_text())
    assert sorted(manifest["presets"]) == ["qdiff-w4a4", "qdiff-w4a4-modiff"] and len(manifest["weights"]) == 1
    assert manifest["commands"] == [command, command.replace("qdiff-w4a4", "qdiff-w4a4-modiff")]


def test_an_interrupted_calibration_leaves_no_manifest_and_its_resumption_keeps_the_commands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While presets are added the folder has no manifest (no checksums claim it); the command that resumes
    an interrupted one still lists the commands that made the presets before."""
    import modiff.quant.ptq.reuse as reuse

    folder = _export(tmp_path / "tiny")
    calibrate_shipped(md.load_model(folder), ["qdiff-w4a4"], FAST, "cpu", "first")
    real = reuse.quantized_model

    def interrupted(model: torch.nn.Module, name: str, *args, **kwargs) -> torch.nn.Module:
        if name == "qdiff-w4a4-modiff":
            raise RuntimeError("interrupted")
        return real(model, name, *args, **kwargs)

    both = ["qdiff-w4a4", "qdiff-w4a4-modiff"]
    monkeypatch.setattr(reuse, "quantized_model", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        calibrate_shipped(md.load_model(folder), both, FAST, "cpu", "second")
    assert not (folder / CALIBRATION_DIR / "manifest.json").exists()
    monkeypatch.setattr(reuse, "quantized_model", real)
    calibrate_shipped(md.load_model(folder), both, FAST, "cpu", "third")
    manifest = json.loads((folder / CALIBRATION_DIR / "manifest.json").read_text())
    assert manifest["commands"] == ["first", "second", "third"] and sorted(manifest["presets"]) == both
    assert not (folder / CALIBRATION_DIR / reuse.WITHDRAWN_MANIFEST).exists()
    calibrate_shipped(md.load_model(folder), both, FAST, "cpu", "third")  # the same command at once: listed once
    assert json.loads((folder / CALIBRATION_DIR / "manifest.json").read_text())["commands"] == ["first", "second", "third"]


def test_a_calibration_that_fails_before_changing_the_folder_keeps_its_manifest(tmp_path: Path) -> None:
    """Calibration data of other settings is refused before the shipped manifest is touched: the model keeps
    shipping its calibration."""
    folder = _export(tmp_path / "tiny")
    calibrate_shipped(md.load_model(folder), ["qdiff-w4a4"], FAST, "cpu", "first")
    before = (folder / CALIBRATION_DIR / "manifest.json").read_text()
    other = Calibration(dataclasses.replace(FAST.data, first_seed=FAST.data.first_seed + 1), FAST.recipe)
    shutil.rmtree(folder / CALIBRATION_DIR / "quantized" / "qdiff-w4a4")  # leaves only calib-data to disagree
    with pytest.raises(ValueError, match="other calibration settings"):
        calibrate_shipped(md.load_model(folder), ["qdiff-w4a4"], other, "cpu", "second")
    assert (folder / CALIBRATION_DIR / "manifest.json").read_text() == before


@pytest.mark.parametrize("runs,ready,size", [(0, 5, 1), (1, 10, 4), (2, 3, 2), (2, 7, 3), (1, 0, 3), (3, 4, 8)])
def test_first_round_gives_each_adaround_run_a_rank_of_its_own_when_there_are_enough(runs: int, ready: int,
                                                                                      size: int) -> None:
    weight_tasks, ready_tasks = [f"w{i}" for i in range(runs)], [f"p{i}" for i in range(ready)]
    shares = [first_round(weight_tasks, ready_tasks, rank, size) for rank in range(size)]
    assert sorted(sum(shares, [])) == sorted(weight_tasks + ready_tasks)  # every task once
    if size > runs:
        assert shares[:runs] == [[w] for w in weight_tasks]
        counts = [len(share) for share in shares[runs:]]
        assert max(counts) - min(counts) <= 1  # the presets spread evenly over the other ranks
    else:
        assert shares == [(weight_tasks + ready_tasks)[r::size] for r in range(size)]


def test_a_preset_named_twice_goes_to_one_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks' shares of a calibration whose presets repeat a name hold each task once (two ranks writing one
    preset folder would collide). The ranks here record their tasks instead of running them."""
    import modiff.quant.ptq.reuse as reuse
    from modiff.utils.distributed import World

    dealt: list[str] = []

    @dataclasses.dataclass(frozen=True)
    class RecordingRank(World):
        def from_leader(self, compute):
            return compute()

        def barrier(self) -> None:
            pass

        def run_own(self, mine, work) -> None:
            dealt.extend(task.args[1] for task in mine)

    folder = _export(tmp_path / "tiny")
    for rank in (0, 1):
        monkeypatch.setattr(reuse.World, "current", classmethod(lambda cls, rank=rank: RecordingRank(rank, 2)))
        calibrate_shipped(md.load_model(folder), ["qdiff-w4a4", "qdiff-w8a8", "qdiff-w4a4"], FAST, "cpu", "twice")
    assert sorted(dealt) == ["qdiff-w4a4", "qdiff-w4a4", "qdiff-w8a8", "qdiff-w8a8"]  # one AdaRound run and one preset each


def _calibrate_logging_ranks(device: str, folder: Path, names: list[str], log: Path) -> None:
    """One launched rank: calibrate_shipped with each AdaRound run and preset task logged as ``rank name``."""
    import torch.distributed as dist

    import modiff.quant.ptq.reuse as reuse

    def logged(task, label, made):  # logs the calls that make something (not a look-up of weights already there)
        def run(model, name, *args, **kwargs):
            if not made(name):
                with log.open("a") as out:
                    out.write(f"{dist.get_rank()} {label(name)}\n")
            return task(model, name, *args, **kwargs)
        return run

    root = folder / CALIBRATION_DIR
    reuse._shared_weights = logged(reuse._shared_weights, lambda name: f"adaround-for-{name}",
                                   lambda name: (reuse._weights_folder(name, root, FAST)[0] / "manifest.json").exists())
    reuse.quantized_model = logged(reuse.quantized_model, lambda name: name, lambda name: False)
    calibrate_shipped(md.load_model(folder), names, FAST, device, "ranks")


@pytest.mark.slow
def test_three_ranks_give_the_adaround_run_a_rank_and_share_the_rest(tmp_path: Path) -> None:
    """With the W4 weights there, the W8 AdaRound run takes rank 0 alone while ranks 1 and 2 make the W4 presets
    (one loaded, one calibrated); the W8 preset then goes round robin; the step sizes are one process's."""
    from modiff.pipelines import distributed

    single, ranks = _export(tmp_path / "single"), _export(tmp_path / "ranks")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 3))  # the threads of each launched rank
    try:
        for folder in (single, ranks):
            calibrate_shipped(md.load_model(folder), ["qdiff-w4a4"], FAST, "cpu", "first")
        calibrate_shipped(md.load_model(single), ["qdiff-w4a4", "qdiff-w4a4-modiff", "qdiff-w8a8"], FAST, "cpu", "rest")
    finally:
        torch.set_num_threads(threads)
    log = tmp_path / "ranks.log"
    distributed.launch(_calibrate_logging_ranks, ["cpu"] * 3, ranks, ["qdiff-w4a4", "qdiff-w4a4-modiff", "qdiff-w8a8"],
                       log)
    assert sorted(log.read_text().splitlines()) == ["0 adaround-for-qdiff-w8a8", "0 qdiff-w8a8", "1 qdiff-w4a4",
                                                    "2 qdiff-w4a4-modiff"]
    assert _calibration_files(ranks) == _calibration_files(single)
    manifest = json.loads((ranks / CALIBRATION_DIR / "manifest.json").read_text())
    assert manifest["commands"] == ["first", "ranks"] and len(manifest["presets"]) == 3


def _calibration_files(model_folder: Path) -> dict[str, bytes]:
    root = model_folder / CALIBRATION_DIR / "quantized"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


@pytest.mark.slow
def test_torchrun_calibrates_the_files_of_one_process(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m modiff calibrate-shipped` (gloo, CPU) deals two AdaRound runs and then three
    presets over the ranks, and writes the weight codes and step sizes of one process bit for bit, one manifest
    that lists them all (its checksums verify on load), and one report."""
    single, ranks = _export(tmp_path / "single"), _export(tmp_path / "ranks")
    names = ["qdiff-w4a4", "qdiff-w8a8-modiff", "qdiff-w4a4-modiff"]
    args = ["calibrate-shipped", *(a for name in names for a in ("--preset", name)), "--steps", "4", "--calib-steps", "2",
            "--samples-per-step", "4", "--set", "adaround.iters=3", "--set", "adaround.batch_size=4",
            "--set", "activations.iters=2", "--set", "activations.batch_size=4", "--set", "capture_batch=4",
            "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--model", str(single)])
    assert result.exit_code == 0, result.output
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads of the reference run
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "modiff",
                          *args, "--model", str(ranks)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("shipped calibration of") == 1  # rank 0 speaks for the job
    files = _calibration_files(ranks)
    assert files == _calibration_files(single) and len(files) == 5  # two weight folders, three presets
    manifest = json.loads((ranks / CALIBRATION_DIR / "manifest.json").read_text())
    assert sorted(manifest["presets"]) == sorted(names) and len(manifest["weights"]) == 2
    model = md.load_model(ranks)
    assert all(quant_layers(shipped_model(model, name)) for name in names)


def test_a_calibration_with_another_split_set_is_refused(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Static scales saved for a split input cannot silently serve a model that no longer splits it."""
    from modiff.models.ddim_unet import DDIMUNet

    model = md.load_model(shipped)
    assert model.net.concat_splits(), "the tiny UNet has split-shortcut layers"
    monkeypatch.setattr(DDIMUNet, "concat_splits", lambda self: {})
    with pytest.raises(ValueError, match="split-shortcut layers differ"):
        shipped_model(model, "qdiff-w4a4")


@pytest.mark.parametrize("name", ["fmnist-ddim", "fmnist-ldm"])
def test_the_shipped_calibrations_load(name: str) -> None:
    """The calibrations committed in data/ verify and load for every shipped W4 preset, so a change to configs
    or their hashes cannot orphan them: AdaRound codes on the 4-bit grid that differ from round-to-nearest in
    some weights (AdaRound's decisions), and static scales set."""
    model = md.load_model(name)
    adaround = quant_layers(quantize(model, presets["w4a4-adaround-modiff"]))
    nearest = quant_layers(quantize(model, presets["w4a4-modiff"]))
    changed = 0
    for layer_name, layer in adaround.items():
        codes = layer.weight_codes()
        assert 0 <= int(codes.min()) and int(codes.max()) <= 15
        if nearest[layer_name].split is None and layer.split is None:
            changed += int((codes != nearest[layer_name].weight_codes()).sum())
    assert changed > 0
    for preset in ("qdiff-w4a4", "qdiff-w4a4-modiff"):
        static = quant_layers(shipped_model(model, preset))
        assert all(layer.act is not None and layer.act.scales for layer in static.values())


def _real_w4a8_adaround() -> QuantConfig:
    """W4A8 MoDiff on the real backend with AdaRound codes on the shipped calibrations' 4-bit grid."""
    return dataclasses.replace(presets["w4a8-int8-modiff-real"], weight=presets["w4a4-adaround-modiff"].weight)


def test_real_w4a8_names_what_keeps_the_shipped_adaround_codes_out(shipped: Path) -> None:
    """The shipped codes were calibrated with the split shortcut over every Conv/Linear, which the real backend
    does not compute: the refusal names those fields, not a config error from inside the lookup."""
    with pytest.raises(ValueError, match=r"split_shortcut True there, False here") as err:
        quantize(md.load_model(shipped), _real_w4a8_adaround())
    assert "layer_types ('Conv1d', 'Conv2d', 'Linear') there, ('Conv2d', 'Linear') here" in str(err.value)
    assert "backend" not in str(err.value)  # the backend does not change codes: a simulated calibration serves


def test_real_w4a8_takes_adaround_codes_of_its_weight_quantization(tmp_path: Path, tiny_denoiser: md.Denoiser,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Codes saved from the simulator with the real config's weight quantization load into the real layers, which
    pack them for the kernels: on the kernels (the Triton interpreter on the CPU) every direct W4A8 layer gives the
    simulator's output with the same codes, to float32 rounding. (Layer by layer: through the whole random tiny
    UNet, float32 against float64 alone moves the simulator's output by 4%.)"""
    pytest.importorskip("triton")
    from modiff.quant.layers import real as real_layers

    config = dataclasses.replace(_real_w4a8_adaround(), mode="direct")
    source = quantize(tiny_denoiser, weight_only_config(config))
    layers = quant_layers(source)
    for layer in layers.values():  # codes AdaRound might choose: one step off round-to-nearest, on the grid
        codes = layer.weight_codes()
        layer.set_weight_codes(torch.clamp(codes + (codes < 15).float(), 0, 15), layer.weight_scale,
                               layer.weight_zero_point)
    save_quantized(source, tmp_path / "w4")
    real = quantize(tiny_denoiser, config, weights=tmp_path / "w4")
    sim = quantize(tiny_denoiser, config.simulated(), weights=tmp_path / "w4")
    for name, layer in quant_layers(real).items():
        assert torch.equal(layer.weight_codes(), layers[name].weight_codes())
        assert torch.equal(layer.weight_offset_n, layer.weight_zero_point.reshape(-1).int())  # z - qmin, qmin 0
    monkeypatch.setattr(real_layers, "use_real_kernels", lambda x: True)
    sim_layers, gen = quant_layers(sim.double()), torch.Generator().manual_seed(0)
    for name, layer in quant_layers(real).items():
        shape = (2, layer.weight.shape[1], 6, 6) if layer.weight.ndim == 4 else (2, layer.weight.shape[1])
        x = torch.randn(shape, generator=gen)
        with float32_precision("fp32"), torch.no_grad():
            out, ref = layer(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x), \
                sim_layers[name](x.double())
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-5, name


def _make_commands(target: str) -> list[list[str]]:
    """The ``modiff ...`` commands of a Makefile target, its variables' defaults expanded (``?=`` lines)."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) \?= (.*)$", text, re.M))
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    commands = []
    for line in re.findall(r"\$\(BIN\)/modiff ([^>&;]*)", body):
        commands.append(shlex.split(re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)))
    return commands


@pytest.mark.parametrize("name", ["fmnist-ddim", "fmnist-ldm"])
def test_make_and_the_readme_remake_the_shipped_calibrations(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make shipped-calibration` and the README's commands calibrate with the settings and presets the shipped
    manifest states (a default that drifted, say the timestep spacing, would calibrate something else)."""
    import modiff.quant.ptq.reuse as reuse

    manifest = json.loads((ROOT / "data" / name / CALIBRATION_DIR / "manifest.json").read_text())
    asked: list[tuple[list[str], dict]] = []

    def record(model: torch.nn.Module, preset_names: list[str], calibration: Calibration, device: str, command: str) -> Path:
        asked.append((list(preset_names), calibration.to_dict()))
        return ROOT / "data" / name / CALIBRATION_DIR

    monkeypatch.setattr(reuse, "calibrate_shipped", record)
    readme = [shlex.split(line)[1:] for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith(f"modiff calibrate-shipped --model {name} ")]
    made = [args for args in _make_commands("shipped-calibration") if args[args.index("--model") + 1] == name]
    assert len(readme) == len(made) == 1
    for args in (*readme, *made):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    for preset_names, settings in asked:
        assert sorted(preset_names) == sorted(manifest["presets"])
        assert json.loads(json.dumps(settings)) == manifest["settings"]
