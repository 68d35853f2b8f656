"""Run directories written by `generate`: files, manifest, resumption, refusals and atomic writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import modiff.pipelines.generate as gen
from modiff.pipelines.generate import SampleConfig, finished_run, generate, read_samples
from modiff.utils.runs import atomic_path

from conftest import fail_file_write

CONFIG = SampleConfig(steps=3)


def _run(model, seeds, out: Path, config: SampleConfig = CONFIG, **kw) -> Path:
    return generate(model, seeds, out, config, device="cpu", progress=False, **{"batch_size": 4, **kw})


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".probe")]


def test_generate_writes_run_directory(tmp_path: Path, tame_denoiser) -> None:
    """PNG per seed, grid.png, samples.npz (uint8 NHWC + seeds) and a manifest with config and sessions."""
    out = _run(tame_denoiser, range(6), tmp_path / "run")
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names == [f"{s:06d}.png" for s in range(6)]
    with np.load(out / "samples.npz") as npz:
        images, seeds = npz["images"], npz["seeds"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 1)
    assert seeds.tolist() == list(range(6))
    assert np.array_equal(images, read_samples(out / "samples", range(6)))
    assert len(np.unique(images)) > 20, "tame model should give graded images, not a saturated 0/255 mask"
    x0 = gen.sample(tame_denoiser, [4], CONFIG, torch.device("cpu"))
    expected = ((x0.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)[0, 0].numpy()
    assert np.array_equal(images[4, ..., 0], expected)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 18, 2 + 10 * 18)  # one row of 10 cells, 16 px + 2 px padding
    assert np.array_equal(grid[2:18, 2 + 18 : 18 + 18], images[1, ..., 0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["sample"] == {"sampler": "ddim", "steps": 3, "spacing": "uniform", "eta": 0.0, "precision": "fp32"}
    assert manifest["identity"]["model"] == {"name": "tame"}
    assert manifest["seeds"] == list(range(6))
    (session,) = manifest["sessions"]
    assert session["seeds_sampled"] == 6 and session["batch_size"] == 4
    assert {"torch", "git_sha", "device", "python"} <= set(session["environment"])
    assert not _leftovers(out)


def test_resume_samples_only_missing_seeds(tmp_path: Path, tame_denoiser) -> None:
    """0-3 then 0-7 into one dir samples 4 new seeds; files equal a single uninterrupted 0-7 run."""
    resumed, single = tmp_path / "resumed", tmp_path / "single"
    _run(tame_denoiser, range(4), resumed)
    _run(tame_denoiser, range(8), resumed)
    _run(tame_denoiser, range(8), single)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert [s["seeds_sampled"] for s in manifest["sessions"]] == [4, 4]
    assert manifest["seeds"] == list(range(8))
    for name in [f"samples/{s:06d}.png" for s in range(8)] + ["grid.png"]:
        assert (resumed / name).read_bytes() == (single / name).read_bytes(), name
    with np.load(resumed / "samples.npz") as a, np.load(single / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])
    _run(tame_denoiser, range(8), resumed)  # nothing left to do
    assert json.loads((resumed / "manifest.json").read_text())["sessions"][-1]["seeds_sampled"] == 0


def test_images_do_not_depend_on_batch_size(tmp_path: Path, tame_denoiser) -> None:
    """Batch size 8 vs 3: the same PNGs up to one grey level (float32 kernel rounding)."""
    a = _run(tame_denoiser, range(8), tmp_path / "a", batch_size=8)
    b = _run(tame_denoiser, range(8), tmp_path / "b", batch_size=3)
    diff = np.abs(read_samples(a / "samples", range(8)).astype(int) - read_samples(b / "samples", range(8)).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


def test_published_numerics_do_not_depend_on_batch_size(tmp_path: Path, tame_denoiser) -> None:
    """Scales shared by runs of 4 consecutive samples: batches of 8 give the images of batches of 4 (up to
    float32 kernel rounding); a batch size that splits those runs is refused before sampling."""
    from dataclasses import replace

    from modiff.quant import presets, quantize

    published = presets["published-w8a4"]
    runs_of_four = replace(published, activation=replace(published.activation,
                                                         spec=replace(published.activation.spec, samples_per_scale=4)))
    qmodel = quantize(tame_denoiser, runs_of_four)
    a = _run(qmodel, range(10), tmp_path / "a", batch_size=8)
    b = _run(qmodel, range(10), tmp_path / "b", batch_size=4)
    diff = np.abs(read_samples(a / "samples", range(10)).astype(int) - read_samples(b / "samples", range(10)).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2
    with pytest.raises(ValueError, match="shares each activation scale over 4 consecutive samples.*multiple of 4"):
        _run(qmodel, range(10), tmp_path / "c", batch_size=6)
    assert not (tmp_path / "c").exists()
    _run(qmodel, range(5), tmp_path / "d", batch_size=6)  # one batch holds every seed: nothing is split


def test_other_config_in_same_dir_is_refused(tmp_path: Path, tame_denoiser) -> None:
    """A different SampleConfig or model identity raises ValueError naming the differing values."""
    out = _run(tame_denoiser, range(2), tmp_path / "run")
    with pytest.raises(ValueError, match="another configuration") as err:
        _run(tame_denoiser, range(2), out, SampleConfig(steps=4))
    assert "sample.steps: 3 -> 4" in str(err.value)
    with pytest.raises(ValueError, match="another configuration"):
        _run(tame_denoiser, range(2), out, identity={"name": "other"})


def test_a_schedule_that_cannot_be_sampled_leaves_no_run_folder(tmp_path: Path, tame_denoiser) -> None:
    """Steps whose ldm spacing passes T - 1 are refused before the folder exists, so the corrected command is not
    refused as "another configuration" by a folder that holds no image."""
    with pytest.raises(ValueError, match="reaches timestep 1000"):
        _run(tame_denoiser, range(2), tmp_path / "run", SampleConfig(steps=3, spacing="ldm"))
    assert not (tmp_path / "run").exists()
    _run(tame_denoiser, range(2), tmp_path / "run", SampleConfig(steps=4, spacing="ldm"))


def test_finished_run_tells_whether_generate_would_reuse_every_seed(tmp_path: Path, tame_denoiser) -> None:
    """Callers skip building (or calibrating) a model when the run is complete for their seeds (asked for the
    device the run was made on: on a GPU machine "auto" precision would resolve to bf16)."""
    out, identity = tmp_path / "run", {"name": "tame", "quant": [4, 8]}
    assert not finished_run(out, range(3), CONFIG, identity, device="cpu")
    _run(tame_denoiser, range(3), out, identity=identity)
    assert finished_run(out, range(3), CONFIG, identity, device="cpu") and finished_run(out, [2, 0], CONFIG, identity, device="cpu")
    assert not finished_run(out, range(4), CONFIG, identity, device="cpu")
    (out / "samples" / "000001.png").unlink()
    assert not finished_run(out, range(3), CONFIG, identity, device="cpu")
    with pytest.raises(ValueError, match="another configuration"):
        finished_run(out, range(3), SampleConfig(steps=4), identity, device="cpu")


def test_identity_with_tuples_resumes(tmp_path: Path, tame_denoiser) -> None:
    """An identity holding tuples (e.g. asdict of a frozen config) still matches after the JSON round trip."""
    identity = {"name": "tame", "quant": {"bits": (4, 8), "layers": ("conv", "linear")}}
    out = _run(tame_denoiser, range(2), tmp_path / "run", identity=identity)
    _run(tame_denoiser, range(3), out, identity=identity)
    assert json.loads((out / "manifest.json").read_text())["seeds"] == [0, 1, 2]


def test_unwritable_output_dir(tmp_path: Path, tame_denoiser) -> None:
    """An output path below a regular file raises ValueError naming the directory."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot write to the output directory"):
        _run(tame_denoiser, range(2), blocker / "run")


def test_sample_config_validation() -> None:
    """Unknown sampler/precision, eta with a non-DDIM sampler and steps < 1 are refused."""
    with pytest.raises(ValueError, match="allowed: ddim, ddpm, dpm-solver"):
        SampleConfig(sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed: auto, fp32, tf32, bf16"):
        SampleConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ddim sampler only"):
        SampleConfig(sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="steps"):
        SampleConfig(steps=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_resolve_device_without_cuda() -> None:
    """Asking for cuda without CUDA is a ValueError pointing to --device cpu; 'auto' falls back to the CPU."""
    with pytest.raises(ValueError, match="--device cpu"):
        gen.resolve_device("cuda")
    assert gen.resolve_device("auto") == torch.device("cpu")


def test_failed_png_write_leaves_no_partial_file(tmp_path: Path, tame_denoiser, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PNG write that dies half-way (on the writer thread) fails the run, leaves earlier PNGs whole, no
    partial/tmp file, and a clean resume."""
    fail_file_write(monkeypatch, 3, OSError("disk full"), partial=True)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        _run(tame_denoiser, range(4), out)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000000.png", "000001.png"]
    for png in (out / "samples").iterdir():
        Image.open(png).load()  # complete, decodable
    assert not _leftovers(out)
    assert json.loads((out / "manifest.json").read_text())["identity"]["sample"]["steps"] == 3  # written first
    _run(tame_denoiser, range(4), out)
    clean = _run(tame_denoiser, range(4), tmp_path / "clean")
    for s in range(4):
        assert (out / f"samples/{s:06d}.png").read_bytes() == (clean / f"samples/{s:06d}.png").read_bytes()


def test_failed_batch_keeps_finished_batches(tmp_path: Path, tame_denoiser, monkeypatch: pytest.MonkeyPatch) -> None:
    """If sampling dies in the second batch, the first batch's PNGs stay and the rerun does the rest."""
    real_sample, batches = gen.sample, []

    def dying_sample(model, seeds, *args, **kwargs):
        batches.append(list(seeds))
        if len(batches) == 2:
            raise RuntimeError("out of memory")
        return real_sample(model, seeds, *args, **kwargs)

    monkeypatch.setattr(gen, "sample", dying_sample)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _run(tame_denoiser, range(6), out, batch_size=2)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["000000.png", "000001.png"]
    batches.clear()

    def recording_sample(model, seeds, *args, **kwargs):
        batches.append(list(seeds))
        return real_sample(model, seeds, *args, **kwargs)

    monkeypatch.setattr(gen, "sample", recording_sample)
    _run(tame_denoiser, range(6), out, batch_size=2)
    assert batches == [[2, 3], [4, 5]]


def test_atomic_path(tmp_path: Path) -> None:
    """atomic_path renames onto the target on success; on error the target is untouched and no tmp remains."""
    target = tmp_path / "f.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("one")
    assert target.read_text() == "one"
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("two, half writ")
            raise KeyError("boom")
    assert target.read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_float32_precision_sets_tf32_and_restores_it() -> None:
    """fp32 (and bf16) turn TF32 off for CUDA matmuls and cuDNN convolutions, tf32 turns it on; whatever was
    set before comes back on exit, after an exception too."""
    from modiff.pipelines.execution import _tf32_switches, float32_precision

    switches = _tf32_switches()
    legacy = next(iter(switches.values()))[1] == "allow_tf32"
    off, on = (False, True) if legacy else ("ieee", "tf32")
    before = {k: getattr(o, a) for k, (o, a) in switches.items()}
    with float32_precision("fp32"):
        assert all(getattr(o, a) == off for o, a in switches.values())
    with pytest.raises(RuntimeError):
        with float32_precision("tf32"):
            assert all(getattr(o, a) == on for o, a in switches.values())
            raise RuntimeError("inside")
    assert {k: getattr(o, a) for k, (o, a) in switches.items()} == before
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        with float32_precision("fp16"):  # type: ignore[arg-type]
            pass


def test_manifest_records_the_precision(tmp_path: Path, tame_denoiser) -> None:
    import json

    from modiff.pipelines.generate import precision_record

    generate(tame_denoiser, range(2), tmp_path / "run", SampleConfig(steps=2), device="cpu", progress=False)
    session = json.loads((tmp_path / "run" / "manifest.json").read_text())["sessions"][0]
    assert session["precision"]["precision"] == "fp32" and session["precision"]["label"] == "fp32"
    assert session["precision"]["tf32"] is False and session["precision"]["device_type"] == "cpu"
    cuda = precision_record("fp32", torch.device("cuda"))  # reads torch's switches only: no GPU needed
    assert cuda["label"] == "fp32 (TF32 off)" and cuda["tf32"] is False
    assert precision_record("tf32", torch.device("cuda"))["tf32"] is True
    assert precision_record("bf16", torch.device("cuda"))["autocast"] == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision"):
        SampleConfig(precision="fp16")  # type: ignore[arg-type]


def test_manifest_records_the_quant_backend(tmp_path: Path, tame_denoiser) -> None:
    """Every session says which backend computed the quantized layers: a real config falls back to the simulator
    on the CPU, and the run's identity records the config as asked (backend "real")."""
    import json

    from modiff.quant import presets, quantize, trajectory

    qmodel = quantize(tame_denoiser, presets["w8a8-int8-modiff-real"])
    identity = {"model": "tame", "quant_config": presets["w8a8-int8-modiff-real"].to_dict()}
    generate(qmodel, range(2), tmp_path / "q", SampleConfig(steps=2), device="cpu", progress=False,
             identity=identity, prepare=trajectory)
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["sessions"][0]["quant_backend"] == {"asked": "real", "runs": "simulated", "format": "int"}
    assert manifest["identity"]["model"]["quant_config"]["backend"] == "real"
    generate(tame_denoiser, range(2), tmp_path / "fp", SampleConfig(steps=2), device="cpu", progress=False)
    assert json.loads((tmp_path / "fp" / "manifest.json").read_text())["sessions"][0]["quant_backend"] is None


def test_seeds_on_disk_reads_one_listing(tmp_path: Path) -> None:
    """The seeds whose PNG is in the folder, by name: temporary files and other names are not seeds, and an
    absent folder holds none."""
    from modiff.pipelines.run_folder import seeds_on_disk

    for name in ("000003.png", "1000000.png", ".000004.png.12-34.tmp", "000005.jpg", "grid.png"):
        (tmp_path / name).write_bytes(b"")
    assert seeds_on_disk(tmp_path, range(10)) == {3}
    assert seeds_on_disk(tmp_path, [10**6, 4, 5]) == {10**6}
    assert seeds_on_disk(tmp_path / "absent", range(10)) == set()


def test_resume_keeps_a_batchs_pngs_without_asking_for_each_file(tmp_path: Path, tame_denoiser,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch missing one PNG is sampled whole and only the missing file is written (the others keep their
    bytes); which PNGs exist comes from listings of the folder, not from a file-system call per seed."""
    out = _run(tame_denoiser, range(8), tmp_path / "run")
    (out / "samples" / "000005.png").unlink()
    kept = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "samples").iterdir()}
    asked: list[str] = []
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **kw: asked.append(self.name) or real_exists(self, **kw))
    _run(tame_denoiser, range(8), out)
    assert not [name for name in asked if name.endswith(".png") and name != "grid.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sessions"][-1]["seeds_sampled"] == 1 and (out / "samples" / "000005.png").is_file()
    for name, (data, mtime) in kept.items():
        path = out / "samples" / name
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, name
