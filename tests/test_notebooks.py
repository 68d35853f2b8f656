"""Every notebook runs under papermill (tiny model, tiny sizes) and the index links only what exists."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from modiff.reproduce import NOTEBOOKS, notebook_dir, reproduce
from modiff.train import DDIMTrainConfig, export_weights

from conftest import TINY, tiny_net


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_is_tagged_and_literal(name: str) -> None:
    """The first code cell is tagged `parameters` and holds only assignments of literals."""
    book = nbformat.read(notebook_dir() / f"{name}.ipynb", as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for line in code[0].source.splitlines():
        assert re.match(r"^\w+ = (\"[^\"]*\"|-?\d+|\[[^\]]*\]|True|False)$", line), line
    assert all(not c.outputs for c in code), "notebooks are committed with outputs stripped"
    assert not any(re.search(r"^\s*(def|class) ", c.source, re.M) for c in code)


@pytest.mark.slow
def test_reproduce_runs_every_notebook(tmp_path: Path) -> None:
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    results = reproduce("quick", str(tmp_path / "tiny"), tmp_path / "reports", tmp_path / "runs",
                        overrides={"num_samples": 10, "steps": 3, "device": "cpu"})
    failed = {r.name: r.error[-500:] for r in results if not r.ok}
    assert not failed, failed
    out = tmp_path / "reports" / "quick"
    assert len(list((out / "figures").glob("*.png"))) >= 8 and len(list((out / "tables").glob("*.md"))) >= 6
    index = (out / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert links and all((out / link).exists() for link in links)
    for name in NOTEBOOKS:
        assert (out / "notebooks" / f"{name}.html").exists()
    with pytest.raises(ValueError, match="unknown parameters"):
        reproduce("quick", overrides={"sample_count": 3})
