"""Two samplings of one run compared image by image (`modiff image-diff`): hand-made runs and summaries with
known differences, and the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from modiff.cli.main import main
from modiff.pipelines.agreement import agreement_rows, image_agreement

IDENTITY = {"model": {"model": "fmnist-ddim", "quant_preset": "w8a4-modiff"},
            "sample": {"sampler": "ddim", "steps": 100, "spacing": "quad", "precision": "tf32"}}


def _sampling(folder: Path, images: np.ndarray, seeds, device: str = "GPU A", summary: bool = False,
              identity: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    manifest = {"identity": {**(identity or IDENTITY), "execution": {"device": device, "batch_size": 512}},
                "seeds": list(seeds), "sessions": []}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    np.savez(folder / ("images.npz" if summary else "samples.npz"), images=images.astype(np.uint8),
             seeds=np.asarray(seeds))
    return folder


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, size=(n, 4, 4, 1))


def test_hand_made_differences_are_counted(tmp_path: Path) -> None:
    first = _images(4)
    second = first.copy()
    second[1, 0, 0, 0] += 4 if second[1, 0, 0, 0] < 251 else -4  # four grey levels: a differing pixel, not over 4
    second[2, 3, 3, 0] = (second[2, 3, 3, 0] + 100) % 255  # a visible difference
    a = _sampling(tmp_path / "a", first, range(4))
    b = _sampling(tmp_path / "b", second[[3, 2, 1, 0]], [3, 2, 1, 0], device="GPU B", summary=True)  # any order
    found = image_agreement(a, b)
    assert (found.seeds, found.identical_images, found.seeds_over_grey_levels) == (4, 0.5, 1)
    assert found.differing_pixels == pytest.approx(2 / 64)
    rel = [np.linalg.norm(second[i].astype(float) - first[i]) / np.linalg.norm(first[i].astype(float))
           for i in range(4)]
    assert found.rel_l2_mean == pytest.approx(np.mean(rel), rel=1e-12)
    t = 3.182446305284263  # Student t, 97.5% quantile, 3 degrees of freedom
    assert found.rel_l2_ci95_halfwidth == pytest.approx(t * np.std(rel, ddof=1) / 2, rel=1e-9)
    assert found.rel_l2_max == pytest.approx(max(rel), rel=1e-12) and found.black_first_images == 0
    assert image_agreement(a, a).rel_l2_max == 0 and image_agreement(a, a).identical_images == 1


def test_only_the_seeds_both_hold_are_compared_and_black_images_counted_apart(tmp_path: Path) -> None:
    first = _images(6)
    first[0] = 0  # a collapsed row's black image: no relative distance to it
    second = first.copy()
    second[0, 0, 0, 0] = 9
    a = _sampling(tmp_path / "a", first, range(6))
    b = _sampling(tmp_path / "b", second[:3], range(3), summary=True)  # a summary keeps its first seeds
    found = image_agreement(a, b)
    assert (found.seeds, found.black_first_images, found.seeds_over_grey_levels) == (3, 1, 1)
    assert found.rel_l2_mean == 0.0  # over the two seeds with a non-black first image, both identical


def test_other_runs_and_no_common_seed_are_refused(tmp_path: Path) -> None:
    a = _sampling(tmp_path / "a", _images(2), range(2))
    other = {**IDENTITY, "sample": {**IDENTITY["sample"], "steps": 50}}
    with pytest.raises(ValueError, match=r"not samplings of the same run: sample.steps: 100 -> 50"):
        image_agreement(a, _sampling(tmp_path / "b", _images(2), range(2), identity=other))
    with pytest.raises(ValueError, match="hold the images of no common seed"):
        image_agreement(a, _sampling(tmp_path / "c", _images(2), [5, 6]))
    with pytest.raises(ValueError, match="neither a run nor a summary"):
        image_agreement(a, tmp_path)


def test_folders_are_paired_by_path_and_the_command_writes_the_table(tmp_path: Path) -> None:
    for side, device in (("one", "GPU A"), ("two", "GPU B")):
        _sampling(tmp_path / side / "spacing-quad" / "w8a4-modiff", _images(3), range(3), device=device)
    _sampling(tmp_path / "one" / "only-here", _images(3), range(3))
    rows = agreement_rows(tmp_path / "one", tmp_path / "two")
    assert [(r["run"], r["first_device"], r["second_device"], r["identical_images"]) for r in rows] == \
        [("spacing-quad/w8a4-modiff", "GPU A", "GPU B", 1.0)]
    run = Path("spacing-quad") / "w8a4-modiff"
    one_run = agreement_rows(tmp_path / "one" / run, tmp_path / "two" / run)
    assert [r["run"] for r in one_run] == ["."]  # two runs, not folders of them
    out = tmp_path / "tables" / "agreement.csv"
    result = CliRunner().invoke(main, ["image-diff", str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "spacing-quad/w8a4-modiff" in result.output and pd.read_csv(out).run.tolist() == ["spacing-quad/w8a4-modiff"]
    (tmp_path / "empty").mkdir()
    refused = CliRunner().invoke(main, ["image-diff", str(tmp_path / "one"), str(tmp_path / "empty")])
    assert refused.exit_code == 1 and "no run or summary lies at the same path below" in refused.output
