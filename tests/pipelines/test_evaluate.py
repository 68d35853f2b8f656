"""`evaluate --fp-run` checks its reference run (issue 23): a reference sampled with other settings
would score the difference of the settings, not of the quantization."""
from __future__ import annotations

from pathlib import Path

import pytest

from modiff.pipelines.evaluate import check_reference_run, evaluate
from modiff.pipelines.generate import SampleConfig, generate


def _reference(model, out: Path, config: SampleConfig, seeds=range(4)) -> Path:
    return generate(model, seeds, out, config, batch_size=4, device="cpu", progress=False,
                    identity={"model": "tame", "config": None, "quant_preset": None})


def test_reference_with_other_steps_is_refused_before_sampling(tmp_path: Path, tame_denoiser) -> None:
    """A 10-step reference for a 5-step run scored 27.6 dB instead of 33.2: now refused, naming the field."""
    fp = _reference(tame_denoiser, tmp_path / "fp", SampleConfig(steps=10))
    with pytest.raises(ValueError, match=r"--fp-run .* other settings .*steps: 10 -> 5"):
        evaluate(tame_denoiser, range(4), tmp_path / "q", SampleConfig(steps=5), quant_preset="w8a8",
                 metrics=("fid",), fp_run=fp, device="cpu", progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("field, value", [("sampler", "ddpm"), ("spacing", "quad"), ("eta", 0.5)])
def test_reference_fields_checked(tmp_path: Path, tame_denoiser, field: str, value: object) -> None:
    fp = _reference(tame_denoiser, tmp_path / "fp", SampleConfig(steps=3, **{field: value}))
    with pytest.raises(ValueError, match=f"{field}: "):
        check_reference_run(fp, range(4), SampleConfig(steps=3), "tame")


def test_reference_of_another_model_or_without_the_seeds(tmp_path: Path, tame_denoiser) -> None:
    fp = _reference(tame_denoiser, tmp_path / "fp", SampleConfig(steps=3))
    with pytest.raises(ValueError, match="model: 'tame' -> 'fmnist-ddim'"):
        check_reference_run(fp, range(4), SampleConfig(steps=3), "fmnist-ddim")
    with pytest.raises(ValueError, match="lacks 2 of the seeds"):
        check_reference_run(fp, range(6), SampleConfig(steps=3), "tame")
    check_reference_run(fp, range(4), SampleConfig(steps=3), "/some/folder/tame")  # a folder's name is its model
    with pytest.raises(ValueError, match="not a run folder"):
        check_reference_run(tmp_path, range(4), SampleConfig(steps=3), "tame")
