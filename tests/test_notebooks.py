"""Every notebook runs under papermill (tiny model, tiny sizes) and the index links only what exists."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from modiff.models.latent import compvis_module
from modiff.pipelines.reproduce import NOTEBOOKS, notebook_dir, report_name, reproduce
from modiff.pipelines.train import DDIMTrainConfig, export_weights

from conftest import TINY, tiny_net
from test_latent import SCALE, TINY_LDM, _tiny_model

LATENT_NOTEBOOKS = ("fig1b_activations", "fig3_compensation", "table1_bitwidth")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_is_tagged_and_literal(name: str) -> None:
    """The first code cell is tagged `parameters` and holds only assignments of literals."""
    book = nbformat.read(notebook_dir() / f"{name}.ipynb", as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for line in code[0].source.splitlines():
        assert re.match(r"^\w+ = (\"[^\"]*\"|-?\d+|\[[^\]]*\]|True|False)(  # .*)?$", line), line
    assert all(not c.outputs for c in code), "notebooks are committed with outputs stripped"
    assert not any(re.search(r"^\s*(def|class) ", c.source, re.M) for c in code)


@pytest.mark.slow
def test_reproduce_runs_every_notebook(tmp_path: Path) -> None:
    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    results = reproduce("quick", str(tmp_path / "tiny"), tmp_path / "reports", tmp_path / "runs",
                        overrides={"num_samples": 10, "analysis_samples": 3, "steps": 3, "device": "cpu",
                                   "adaround_iters": 7})
    failed = {r.name: r.error[-500:] for r in results if not r.ok}
    assert not failed, failed
    out = tmp_path / "reports" / "quick-tiny"

    def injected(name: str) -> str:  # the parameters papermill injected into the executed notebook
        book = nbformat.read(out / "notebooks" / f"{name}.ipynb", as_version=4)
        return next(c.source for c in book.cells if "injected-parameters" in c.metadata.get("tags", []))

    assert "analysis_samples = 3" in injected("fig1a_caching") and "num_samples" not in injected("fig1a_caching")
    assert "num_samples = 10" in injected("table1_bitwidth") and "adaround_iters = 7" in injected("table1_bitwidth")
    assert "analysis_samples = 3" in injected("samplers") and "num_samples = 10" in injected("samplers")
    rows = {line.split("|")[1].strip(): line for line in (out / "index.md").read_text().splitlines() if "| ok |" in line}
    assert "analysis_samples 3, steps 3" in rows["[fig1a_caching](notebooks/fig1a_caching.html)"]
    assert "num_samples 10" in rows["[table1_bitwidth](notebooks/table1_bitwidth.html)"]
    assert all("| cpu (" in row for row in rows.values())  # the machine each notebook ran on
    assert len(list((out / "figures").glob("*.png"))) >= 8 and len(list((out / "tables").glob("*.md"))) >= 6
    index = (out / "index.md").read_text()
    links = [link for link in re.findall(r"\]\(([^)]+)\)", index) if not link.startswith("#")]
    assert links and all((out / link).exists() for link in links)
    findings = {p.name for p in (out / "tables").glob("*_finding.md")}  # each notebook saved what it displayed
    assert {"fig1a_caching_finding.md", "table1_bitwidth_finding.md", "samplers_finding.md"} <= findings
    assert "Finding not recorded" not in index
    manifest = {r["name"]: r for r in json.loads((out / "manifest.json").read_text())["notebooks"]}
    assert manifest["model_card"]["runs"]["made"] == 1 and manifest["fig1a_caching"]["runs"]["made"] == 0
    for name in NOTEBOOKS:
        assert (out / "notebooks" / f"{name}.html").exists()
    with pytest.raises(ValueError, match="unknown parameters"):
        reproduce("quick", overrides={"sample_count": 3})


def test_a_notebooks_own_sample_counts_are_recorded_for_the_index() -> None:
    """The audit's seeds come from its own parameter, which no preset sets: the index lists it, and
    analysis_samples, which it no longer reads, is neither passed nor listed."""
    import papermill

    from modiff.pipelines.reproduce import recorded_sizes

    declared = papermill.inspect_notebook(str(notebook_dir() / "published_audit.ipynb"))
    sizes = recorded_sizes(declared, {"num_samples": 10_000, "steps": 100, "out_dir": "reports/paper"})
    assert sizes == {"num_samples": 10_000, "steps": 100, "audit_samples": 4}
    assert recorded_sizes({"audit_samples": {"default": "4"}}, {"audit_samples": 8}) == {"audit_samples": 8}
    assert recorded_sizes({"odd_samples": {"default": "range(3)"}}, {}) == {}  # not a literal: left out


def test_report_names_keep_the_default_model_at_the_preset() -> None:
    assert report_name("quick") == report_name("quick", "fmnist-ddim") == "quick"
    assert report_name("paper", "fmnist-ldm") == "paper-fmnist-ldm"
    assert report_name("quick", "/data/models/my-ldm") == "quick-my-ldm"
    assert report_name("quick", "ckpts/model-790000.ckpt") == "quick-model-790000"


@pytest.mark.slow
def test_reproduce_latent_model(tmp_path: Path) -> None:
    """A tiny exported LDM runs Figures 1b and 3 and the bit-width table into reports/quick-tiny-ldm/:
    its own layers and middle block, ldm timesteps, UNet-only GBops, decoded 16x16 samples."""
    model = _tiny_model()
    export_weights(compvis_module(model.net, model.first_stage, SCALE), TINY_LDM.compvis_yaml(), tmp_path / "tiny-ldm")
    results = reproduce("quick", str(tmp_path / "tiny-ldm"), tmp_path / "reports", tmp_path / "runs",
                        notebooks=LATENT_NOTEBOOKS, overrides={"num_samples": 10, "analysis_samples": 10, "steps": 4, "device": "cpu"})
    failed = {r.name: r.error[-500:] for r in results if not r.ok}
    assert not failed, failed
    out = tmp_path / "reports" / "quick-tiny-ldm"
    figures = {p.name for p in (out / "figures").glob("*.png")}
    assert figures == {"fig1b_net_middle_block_0_in_layers_2.png", "fig1b_net_output_blocks_0_0_in_layers_2.png",
                       "fig1b_net_input_blocks_3_0_out_layers_3.png", "fig3_compensation.png"}
    ratios = pd.read_csv(out / "tables" / "fig1b_range_ratios.csv")
    assert len(ratios) == 3 and ratios["layer"].iloc[0] == "net.middle_block.0.in_layers.2"
    assert pd.read_csv(out / "tables" / "table4_last_step_error.csv")["bits"].tolist() == [3, 4, 6, 8]
    table = pd.read_csv(out / "tables" / "table1_bitwidth.csv")
    assert len(table) == 65 and (table.gbops_per_step > 0).all() and table.rel_l2_pixels.notna().all()  # 20 LSUN rows
    assert table.preset.tolist()[:5] == ["fp", "w8a32", "w4a32", "w8a8", "w8a8-modiff"]  # anchors first
    assert (table.spacing == "ldm").all() and (table.n == 10).all()
    assert {"published-w4a32", "published-w4a2-modiff", "published-lsun-w4a2-modiff"} <= set(table.preset)
    assert set(table[table.preset.str.startswith("published-lsun-")].numerics) == {"published-lsun"}
    run = tmp_path / "runs" / "quick-tiny-ldm" / "fp-ddim4"
    assert '"spacing": "ldm"' in (run / "manifest.json").read_text()
    with np.load(run / "samples.npz") as data:
        assert data["images"].shape == (10, 16, 16, 1)
    index = (out / "index.md").read_text()
    assert all((out / link).exists() for link in re.findall(r"\]\(([^)]+)\)", index) if not link.startswith("#"))
    assert "| samplers | not run yet |" in index  # notebooks left out are listed
    assert "Tables 2 and 3: bit widths on a latent model" in index


@pytest.mark.slow
def test_bitwidth_table_with_qdiffusion_rows(tmp_path: Path) -> None:
    """With calibrate on (the paper preset), the Q-Diff and Q-Diff+MoDiff rows are calibrated into the
    run directory and scored like the others (tiny sizes here)."""
    import shutil

    import papermill

    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    out, runs = tmp_path / "reports", tmp_path / "runs"

    def table1() -> pd.DataFrame:
        papermill.execute_notebook(
            str(notebook_dir() / "table1_bitwidth.ipynb"), str(tmp_path / "table1.ipynb"), progress_bar=False,
            cwd=str(notebook_dir().parent), kernel_name="python3",
            parameters={"model": str(tmp_path / "tiny"), "out_dir": str(out), "runs_dir": str(runs), "num_samples": 10,
                        "steps": 3, "device": "cpu", "presets": ["w8a4"], "published_presets": [], "adaround": False, "calibrate": True,
                        "qdiff_presets": ["qdiff-w8a4", "qdiff-w8a4-modiff"], "calib_samples_per_step": 4,
                        "adaround_iters": 2, "activation_iters": 2})
        return pd.read_csv(out / "tables" / "table1_bitwidth.csv")

    table = table1()
    assert table.preset.tolist() == ["fp", "w8a32", "w4a32", "w8a4", "w8a32-adaround", "qdiff-w8a4", "qdiff-w8a4-modiff"]
    assert table.rel_l2_pixels.notna().all() and (table.gbops_per_step > 0).all()
    assert (table.spacing == "quad").all() and table.set_index("preset").loc["qdiff-w8a4", "weights"] == "AdaRound"
    assert table.set_index("preset").vs_weights_only[["qdiff-w8a4", "qdiff-w8a4-modiff"]].notna().all()  # by w8a32-adaround
    quad = runs / "spacing-quad"  # the paper's timesteps: runs and calibrations of their own
    assert (quad / "quantized" / "qdiff-w8a4-modiff" / "manifest.json").is_file()
    # Runs made on a GPU render anywhere: without the calibrated models, finished runs are reused as they are.
    shutil.rmtree(quad / "quantized")
    shutil.rmtree(quad / "calib-data")
    pd.testing.assert_frame_equal(table1(), table)
    assert not (quad / "quantized").exists()


def test_overlapping_runs_into_one_report_keep_each_others_results(tmp_path: Path) -> None:
    """Runs into one report folder may finish at the same time (one per GPU): each merges its results
    into the manifest under a lock, so none is lost, and each notebook keeps the settings it ran with."""
    import json
    import threading

    from modiff.pipelines.reproduce import REPRODUCE_PRESETS, NotebookResult, _record

    spec = REPRODUCE_PRESETS["paper"]
    results = [NotebookResult(name, True, 1.0, parameters={"num_samples": i, "device": f"cuda:{i % 2}"})
               for i, name in enumerate(NOTEBOOKS)]
    threads = [threading.Thread(target=_record, args=(tmp_path, spec, "fmnist-ddim", {}, [r])) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = json.loads((tmp_path / "manifest.json").read_text())["notebooks"]
    assert [r["name"] for r in kept] == list(NOTEBOOKS)
    assert [r["parameters"]["num_samples"] for r in kept] == list(range(len(NOTEBOOKS)))
    index = (tmp_path / "index.md").read_text()
    assert ("| [samplers](notebooks/samplers.html) | ok | 1.0 s | run reuse not recorded (made before it was tracked) "
            "|  | num_samples 6, device cuda:0 |") in index
    assert "not run yet" not in index


def test_results_of_older_runs_get_their_parameters_from_the_executed_notebook(tmp_path: Path) -> None:
    """A manifest written before results kept their parameters: the index reads them back from the
    parameters papermill injected into the executed notebook."""
    import json

    from modiff.pipelines.reproduce import REPRODUCE_PRESETS, NotebookResult, _record

    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell('# Parameters\nmodel = "m"\nout_dir = "/x"\nnum_samples = 1024\ncalibrate = False\n',
                                            metadata={"tags": ["injected-parameters"]})]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(book, tmp_path / "notebooks" / "table1_bitwidth.ipynb")
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"notebooks": [{"name": "table1_bitwidth", "ok": True, "seconds": 3.0, "error": "", "outputs": []}]}))
    _record(tmp_path, REPRODUCE_PRESETS["paper"], "fmnist-ddim", {},
            [NotebookResult("samplers", True, 1.0, parameters={"num_samples": 32, "device": "cpu"})])
    index = (tmp_path / "index.md").read_text()
    assert "| [table1_bitwidth](notebooks/table1_bitwidth.html) | ok | 3.0 s | run reuse not recorded" in index
    assert "|  | num_samples 1024, calibrate False |" in index
    assert "| [samplers](notebooks/samplers.html) | ok | 1.0 s | run reuse not recorded" in index
    assert "|  | num_samples 32, device cpu |" in index
