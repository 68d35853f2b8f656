"""Loss-curve figure of a trained model folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from analysis.training import save_training_curves, training_curves


def test_latent_folder_gets_two_panels(tmp_path: Path) -> None:
    """train_log.csv and autoencoder_log.csv give two panels, saved as PNG and PDF under figures/."""
    (tmp_path / "train_log.csv").write_text("step,loss,seconds\n100,0.5,1.0\n200,0.25,2.0\n")
    (tmp_path / "autoencoder_log.csv").write_text("step,l1,kl,seconds\n100,0.1,3.0,1.0\n")
    assert len(training_curves(tmp_path).axes) == 2
    paths = save_training_curves(tmp_path)
    assert [p.name for p in paths] == ["training_loss.png", "training_loss.pdf"] and all(p.stat().st_size for p in paths)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_log.csv"):
        training_curves(tmp_path)


def test_model_training_curves_of_a_folder(tmp_path: Path) -> None:
    """A folder path with a log gives its curves; one without logs, or a missing path, gives None."""
    from analysis.training import model_folder, model_training_curves

    assert model_training_curves(str(tmp_path)) is None and model_folder(str(tmp_path / "missing")) is None
    (tmp_path / "train_log.csv").write_text("step,loss,seconds\n100,0.5,1.0\n200,0.25,2.0\n")
    figure = model_training_curves(str(tmp_path))
    assert figure is not None and figure.axes[0].get_title() == f"{tmp_path.name}: denoiser training loss"
