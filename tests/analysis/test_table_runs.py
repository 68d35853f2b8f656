"""The runs of the table notebooks, made without the notebooks: the plan is what the notebooks made (the committed
paper tables and summaries), and making it samples, summarizes, stops at a deadline and resumes."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

import modiff as md
from analysis import table1, table_runs
from analysis.table_runs import Sitting
from modiff.metrics.bootstrap import BootstrapConfig
from modiff.pipelines.summary import SummarySettings

ROOT = Path(__file__).resolve().parents[2]
TINY_TABLE = {"steps": 3, "spacing": "quad", "precision": "fp32", "presets": ["w8a4", "w8a4-modiff"],
              "published_presets": [], "qdiff_presets": [], "adaround": False, "calibrate": False}


def test_parameters_are_the_notebooks_cell_with_the_presets_sizes() -> None:
    parameters = table_runs.notebook_parameters("table1_bitwidth", "paper", {"calibrate": False, "precision": "tf32"})
    assert (parameters["num_samples"], parameters["steps"], parameters["batch_size"]) == (10_000, 100, 512)
    assert parameters["precision"] == "tf32" and parameters["calibrate"] is False
    assert len(parameters["presets"]) == 20 and parameters["spacing"] == "quad"
    assert "warmups" in table_runs.notebook_parameters("samplers", "quick")
    with pytest.raises(ValueError, match="table notebooks are table1_bitwidth, samplers"):
        table_runs.notebook_parameters("fig1a_caching")


@pytest.mark.parametrize("model_name, report", [("fmnist-ddim", "paper"), ("fmnist-ldm", "paper-fmnist-ldm")])
def test_the_plan_is_what_the_committed_paper_tables_were_made_from(model_name: str, report: str,
                                                                   tmp_path: Path) -> None:
    """Every row of each committed table has its planned run, and the plan's folders are where its summary lies;
    so with the committed summaries nothing is left to sample but the rows the table names as not in it yet (a
    deadline of 0 starts nothing, so a missing summary shows as left)."""
    model = md.load_model(model_name)
    overrides = {"calibrate": False, "precision": "tf32"}
    planned = {notebook: table_runs.planned_runs(model, notebook, table_runs.notebook_parameters(notebook, "paper",
                                                                                                overrides),
                                                 tmp_path / report)
               for notebook in table_runs.TABLE_NOTEBOOKS}
    committed = pd.read_csv(ROOT / "reports" / report / "tables" / "table1_bitwidth.csv")
    finding = (ROOT / "reports" / report / "tables" / "table1_bitwidth_finding.md").read_text()
    named = re.search(r"Not in this table \(no run or summary at this N yet\): (.*)\.$", finding, re.MULTILINE)
    not_yet = named.group(1).split(", ") if named else []
    assert [run.preset for run in planned["table1_bitwidth"] if run.preset not in not_yet] == committed.preset.tolist()
    samplers = pd.read_csv(ROOT / "reports" / report / "tables" / "samplers_fid.csv")
    assert {(r.config.sampler, r.config.steps, r.preset) for r in planned["samplers"]} == \
        set(zip(samplers.sampler, samplers.steps, samplers.preset))
    records = table_runs.make_runs(model, [*planned["table1_bitwidth"], *planned["samplers"]], tmp_path / report,
                                   Sitting(range(10_000), device="cpu", deadline=0.0,
                                           summaries=ROOT / "data" / "summaries" / report), say=lambda line: None)
    assert sorted(r["run"].split("/")[-1].rsplit("-ddim100", 1)[0] for r in records if r["status"] == "left") == \
        sorted(not_yet)
    assert sum(r["status"] == "summarized" for r in records) == len(committed) + len(samplers) - 3  # the sampler
    # table's DDIM-100 runs are Table 1's


@pytest.mark.slow
def test_runs_are_made_summarized_stopped_at_a_deadline_and_resumed(tmp_path: Path, tame_denoiser) -> None:
    runs, summaries, log = tmp_path / "runs", tmp_path / "summaries", tmp_path / "runs.jsonl"
    planned = table_runs.planned_runs(tame_denoiser, "table1_bitwidth", TINY_TABLE, runs)
    assert [r.preset for r in planned] == [*table1.ANCHORS, "w8a4", "w8a4-modiff"]
    sitting = Sitting(range(10), device="cpu", summaries=summaries, log=log,
                      summary_settings=SummarySettings(bootstrap=BootstrapConfig(resamples=20), images=4))

    def make(**changes) -> list[str]:
        return [r["status"] for r in table_runs.make_runs(tame_denoiser, planned, runs, Sitting(**{**sitting.__dict__,
                                                                                                  **changes}),
                                                          say=lambda line: None)]

    assert make(deadline=0.0) == ["left"] * 5 and not log.exists()  # nothing fits: nothing started
    assert make() == ["made"] * 5
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["run"] for line in lines] == [f"spacing-quad/{p}-ddim3" for p in [*table1.ANCHORS, "w8a4", "w8a4-modiff"]]
    assert all(line["seconds"] >= 0 and line["summary_seconds"] >= 0 for line in lines)
    assert make() == ["summarized"] * 5 and len(log.read_text().splitlines()) == 5
    shutil.rmtree(summaries / "spacing-quad" / "w8a4-ddim3")
    assert make() == ["summarized"] * 3 + ["there", "summarized"]
    assert (summaries / "spacing-quad" / "w8a4-ddim3" / "per_seed.npz").is_file()  # distances to the fp run beside it
    shutil.rmtree(runs)  # the notebook renders from the summaries alone
    config = table1.table_config(tame_denoiser, 3, "quad", "fp32")
    rows = [*table1.ANCHORS, "w8a4", "w8a4-modiff"]
    assert table1.rows_to_score(tame_denoiser, rows, range(10), config, summaries.parent / "summaries", "skip",
                                "cpu") == (rows, [])

    # a row to sample beside summaries of another GPU's runs is refused before sampling, unless asked for
    manifest_path = summaries / "spacing-quad" / "w8a4-ddim3" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["identity"]["execution"]["device"] = "NVIDIA H100 80GB HBM3"
    manifest_path.write_text(json.dumps(manifest))
    shutil.rmtree(summaries / "spacing-quad" / "w8a4-modiff-ddim3")
    with pytest.raises(ValueError, match=r"sampled on NVIDIA H100 80GB HBM3, and this machine is cpu.*--mixed-devices"):
        make()
    assert not (runs / "spacing-quad" / "w8a4-modiff-ddim3").exists()
    assert make(mixed_devices=True) == ["summarized"] * 4 + ["made"]


def test_the_command_lists_what_a_sitting_leaves_and_refuses_bad_input(tmp_path: Path) -> None:
    from click.testing import CliRunner

    command = ["--model", "fmnist-ddim", "--preset", "quick", "--notebooks", "samplers", "--runs", str(tmp_path / "runs"),
               "--set", "steps=2", "--deadline", "0", "--log", str(tmp_path / "runs.jsonl")]
    result = CliRunner().invoke(table_runs.main, command)
    assert result.exit_code == 0, result.output
    assert "0 of 12 runs there or summarized; left for the next sitting: spacing-quad/fp-ddim1" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "runs.jsonl").exists()  # nothing started, nothing written
    only = CliRunner().invoke(table_runs.main, [*command, "--only", "fp-*, spacing-quad/w8a4-modiff-ddim1"])
    assert only.exit_code == 0, only.output
    assert ("0 of 5 runs there or summarized; left for the next sitting: spacing-quad/fp-ddim1, "
            "spacing-quad/fp-ddim2, spacing-quad/fp-ddpm2, spacing-quad/fp-dpm-solver2, "
            "spacing-quad/w8a4-modiff-ddim1") in only.output  # a folder name or its path under the runs, in their order
    first = CliRunner().invoke(table_runs.main, [*command, "--only", "w8a4-modiff-ddim2,*-ddpm2,fp-*"])
    assert first.exit_code == 0, first.output
    assert ("left for the next sitting: spacing-quad/fp-ddim2, spacing-quad/w8a4-modiff-ddim2, spacing-quad/fp-ddpm2, "
            "spacing-quad/w8a4-ddpm2, spacing-quad/w8a4-modiff-ddpm2, spacing-quad/fp-ddim1, "
            "spacing-quad/fp-dpm-solver2\n") in first.output  # each fp run before the first run it serves
    misspelt = CliRunner().invoke(table_runs.main, [*command, "--only", "fp-*,qdiff-*"])
    assert misspelt.exit_code != 0 and "no planned run matches qdiff-*; the runs are" in str(misspelt.exception)
    bad = CliRunner().invoke(table_runs.main, [*command[:6], "--set", "samples=3"])
    assert bad.exit_code != 0 and "expected key=value with key one of" in str(bad.exception)
    wrong = CliRunner().invoke(table_runs.main, [*command[:4], "--notebooks", "fig1a_caching"])
    assert wrong.exit_code != 0 and "the table notebooks are table1_bitwidth, samplers" in str(wrong.exception)


def test_the_command_refuses_to_sample_beside_another_devices_summaries(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before anything is sampled, with what to do; --mixed-devices reaches the sitting."""
    from click.testing import CliRunner

    other = tmp_path / "summaries" / "quick" / "spacing-quad" / "other-run"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text(json.dumps({"identity": {"execution": {"device": "NVIDIA H100 80GB HBM3"}},
                                                     "seeds": [], "sessions": [], "summary": {}}))
    command = ["--model", "fmnist-ddim", "--preset", "quick", "--notebooks", "samplers", "--runs", str(tmp_path / "runs"),
               "--summaries", str(tmp_path / "summaries"), "--set", "steps=2", "--set", "device=cpu"]
    refused = CliRunner().invoke(table_runs.main, command)
    assert refused.exit_code != 0 and "sampled on NVIDIA H100 80GB HBM3, and this machine is cpu" in str(refused.exception)
    assert "--mixed-devices" in str(refused.exception) and not (tmp_path / "runs").exists()
    seen = []
    monkeypatch.setattr(table_runs, "make_runs", lambda model, runs, runs_dir, sitting: seen.append(sitting) or [])
    assert CliRunner().invoke(table_runs.main, [*command, "--mixed-devices"]).exit_code == 0
    assert seen[0].mixed_devices and seen[0].summaries == tmp_path / "summaries" / "quick"
