"""Where the repository's folders are: its root, the shipped `data/` and the `notebooks/`."""
from __future__ import annotations

from pathlib import Path

__all__ = ["data_dir", "notebook_dir", "repo_root"]


def repo_root() -> Path:
    """The folder that holds `modiff/`, `data/` and `notebooks/`."""
    return Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The repository's `data/` folder (embedded weights, reference statistics)."""
    return repo_root() / "data"


def notebook_dir() -> Path:
    """The papermill templates that `modiff reproduce` runs."""
    return repo_root() / "notebooks"
