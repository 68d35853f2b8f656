"""Table 1 (Tables 2 and 3 for a latent model) with what a reviewer needs to read it: anchor rows (fp,
W8A32, W4A32) made from the same seeds and N as every other row, FID with a bootstrap 95% interval and IS
with its split std, paired-bootstrap verdicts (better / worse / no difference) against the fp anchor, the
weights-only anchor and the direct counterpart of a MoDiff row, the timestep spacing, the arithmetic each
run used (read from its manifest), the distance of each row's images to fp's of the same seed (mean relative L2
and PSNR, each with the half-width of its t-based 95% interval over the seeds), and the paper's numbers beside ours.

Rows are quantization presets, described from their configs: numerics "per-sample" (``wXaY``: dynamic,
asymmetric, one scale per sample), "published" (``published-wXaY``: symmetric, one scale per batch tensor of the
published code's 64 samples, split shortcut: the CIFAR-10 commands), "published-lsun" (``published-lsun-wXaY``, the
rows of a latent model: asymmetric, one scale per batch tensor of the LSUN commands' 8 samples, no split), "static"
(``qdiff-wXaY``: Q-Diffusion's calibrated scales); weights "RTN"
(round-to-nearest), "AdaRound" (the ``-adaround`` presets and the Q-Diffusion rows) or "fp".
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

import modiff as md
from analysis import experiments
from modiff.diffusion.schedules import Spacing
from modiff.pipelines.execution import PrecisionChoice
from modiff.pipelines.generate import SampleConfig, sample
from modiff.pipelines.summary import ReferenceImagesError, SummaryMismatchError, per_seed_fidelity, run_scores
from modiff.metrics.bootstrap import BootstrapConfig
from modiff.metrics.fidelity import Scores
from modiff.quant.cost import preset_report
from modiff.quant.ptq.calibrate import weight_only_config
from modiff.quant.ptq.reuse import Calibration
from modiff.quant.ptq.shipped import PUBLISHED_ITERS, has_shipped, shipped_iterations
from modiff.utils.device import resolve_device

__all__ = ["PAPER_COLUMNS", "ANCHORS", "ADAROUND_ANCHOR", "PUBLISHED_ANCHORS", "table_config", "table_calibration",
           "calibration_record", "adaround_presets", "qdiff_anchors", "lsun_presets", "adaround_status", "row_presets",
           "rows_to_score", "describe", "scored_table", "paper_columns", "findings", "fp_device_distance"]

ANCHORS = ("fp", "w8a32", "w4a32")
ADAROUND_ANCHOR = "w4a32-adaround"
PUBLISHED_ANCHORS = ("published-w8a32", "published-w4a32")  # the published rows' weights alone (split shortcut)
HELD_OUT_FIRST_SEED = 1_000_000  # calibration trajectories start here: never one of the scored seeds


def table_config(model: nn.Module, steps: int, spacing: Optional[Spacing] = None,
                 precision: PrecisionChoice = "auto") -> SampleConfig:
    """DDIM with ``spacing`` for a pixel model (its own, ``uniform``, when None; the paper's DDIM tables use
    ``quad``); a latent model always samples with its own ``ldm`` timesteps, as the LDM tables do. ``precision``
    is the arithmetic of every run ("auto": the device's, bf16 on CUDA and fp32 on the CPU; each run's manifest
    records it, and the table shows it per row)."""
    own = md.default_spacing(model)
    return SampleConfig(steps=steps, spacing=own if own == "ldm" or spacing is None else spacing, precision=precision)


def table_calibration(calibration: Optional[Calibration], config: SampleConfig) -> Optional[Calibration]:
    """The Q-Diffusion calibration on the table's timesteps, from trajectories of held-out seeds."""
    if calibration is None:
        return None
    data = replace(calibration.data, spacing=config.spacing, first_seed=HELD_OUT_FIRST_SEED)
    return replace(calibration, data=data)


def calibration_record(model: nn.Module, calibrate: bool, adaround_iters: int, activation_iters: int) -> pd.DataFrame:
    """One row: where the table's AdaRound W4 weights and Q-Diffusion scales come from and the iterations they
    were made with, beside the published recipe's (the report index states it). ``calibrate=False`` takes the
    model's shipped calibration, whatever the notebook's iteration parameters say."""
    if calibrate:
        source, used = "calibrated by the notebook", {"adaround": adaround_iters, "activations": activation_iters}
    else:
        shipped = shipped_iterations(model)
        source, used = ("the model's shipped calibration", shipped) if shipped else ("none: no calibrated rows", {})
    return pd.DataFrame([{"source": source, "adaround_iters": used.get("adaround"),
                          "activation_iters": used.get("activations"),
                          "published_adaround_iters": PUBLISHED_ITERS["adaround"],
                          "published_activation_iters": PUBLISHED_ITERS["activations"]}])


def adaround_presets(presets: Sequence[str]) -> list[str]:
    """The AdaRound-weight counterparts (``w4aY-adaround[-modiff]``) of the per-sample W4 presets, and the
    weights-only anchor ``w4a32-adaround`` first."""
    out = [ADAROUND_ANCHOR]
    for name in presets:
        if name.startswith("w4a"):
            base, modiff = (name[: -len("-modiff")], True) if name.endswith("-modiff") else (name, False)
            out.append(f"{base}-adaround" + ("-modiff" if modiff else ""))
    return out


def qdiff_anchors(qdiff_presets: Sequence[str]) -> list[str]:
    """The weights-only anchors of the Q-Diffusion presets (``wXa32-adaround``: their AdaRound weights alone), one
    per weight bit width, in the presets' order."""
    return list(dict.fromkeys(f"w{md.presets[p].weight.spec.bits}a32-adaround" for p in qdiff_presets))


def lsun_presets(published_presets: Sequence[str]) -> list[str]:
    """The LSUN-command counterparts (``published-lsun-wXaY[-modiff]``) of the published presets: a latent model's
    table gives both numerics, the CIFAR-10 commands' and the LSUN commands' (`modiff.quant.presets`)."""
    return [name.replace("published-", "published-lsun-", 1) for name in published_presets]


def adaround_status(model: nn.Module, calibrate: bool) -> tuple[bool, str]:
    """Whether the AdaRound W4 rows can be made here, and what to do if not: their presets must exist and
    the weights must come from calibration (``calibrate``) or from the model's shipped calibration."""
    if ADAROUND_ANCHOR not in md.presets:
        return False, (f"this modiff has no AdaRound weight presets ({ADAROUND_ANCHOR}, w4a4-adaround-modiff, ...): "
                       f"the AdaRound rows are left out; update modiff to a version that ships them")
    if calibrate:
        return True, "AdaRound W4 weights: calibrated into the runs folder (the Q-Diffusion recipe)"
    try:
        md.quantize(model, md.presets[ADAROUND_ANCHOR])
    except (ValueError, FileNotFoundError) as err:
        return False, f"no AdaRound weights for this model, so the AdaRound rows are left out: {err}"
    return True, "AdaRound W4 weights: the model's shipped calibration"


def row_presets(model: nn.Module, presets: Sequence[str], published_presets: Sequence[str],
                qdiff_presets: Sequence[str], adaround: bool, calibrate: bool) -> tuple[list[str], str]:
    """The table's presets in order (anchors, per-sample, AdaRound W4 when asked for and available,
    published after their weights-only anchors, Q-Diffusion after theirs: those calibrated, or all when calibrating)
    and a Markdown note of what
    is in and what is left out."""
    rows = [*ANCHORS, *presets]
    notes = [f"Rows: the anchors {', '.join(ANCHORS)}, {len(presets)} per-sample presets, "
             f"{len(published_presets)} published-numerics presets"
             + (f" after their weights-only anchors {', '.join(PUBLISHED_ANCHORS)}." if published_presets else ".")]
    if adaround:
        available, message = adaround_status(model, calibrate)
        rows += adaround_presets(presets) if available else []
        notes.append(message + ".")
    else:
        notes.append("AdaRound W4 rows off (parameter `adaround = False`); the W4 rows use round-to-nearest weights.")
    rows += [*PUBLISHED_ANCHORS, *published_presets] if published_presets else []
    if published_presets and md.default_spacing(model) == "ldm":
        rows += lsun_presets(published_presets)
        notes.append(f"A latent model: the {len(published_presets)} published presets also with the published LSUN "
                     f"commands' numerics (published-lsun-*: asymmetric, one scale per 8 samples, no split; their "
                     f"weights-only anchors are {', '.join(ANCHORS[1:])}).")
    if calibrate:
        rows += [*qdiff_anchors(qdiff_presets), *qdiff_presets]
    else:
        shipped = [p for p in qdiff_presets if has_shipped(model, p)]
        rows += [*qdiff_anchors(shipped), *shipped]
        notes.append(f"Q-Diffusion rows from the model's shipped calibration: {', '.join(shipped) or 'none'}; the "
                     f"other {len(qdiff_presets) - len(shipped)} need calibration (parameter `calibrate = True`, GPU work).")
    return list(dict.fromkeys(rows)), " ".join(notes)


def rows_to_score(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig,
                  runs_dir: str | Path, missing_runs: experiments.MissingRuns = "sample",
                  device: str = "auto") -> tuple[list[str], list[str]]:
    """The rows `scored_table` is given, and those left out. ``missing_runs="sample"``: every row (runs not
    there are sampled). ``"skip"``: only the rows with a finished run or summary of ``seeds`` under the table's
    folder, so a machine that cannot sample the rest (a CPU rendering GPU summaries) still renders the table;
    the anchors must be there, every row is read against them."""
    if experiments.check_missing_runs(missing_runs) == "sample":
        return list(presets), []
    folder = experiments.spacing_runs_dir(model, runs_dir, config)
    there = {p for p in dict.fromkeys([*ANCHORS, *presets])
             if experiments.run_is_finished(model, p, seeds, config, folder, device)}
    absent_anchors = [a for a in ANCHORS if a not in there]
    if absent_anchors:
        raise ValueError(f"missing_runs='skip' still needs the anchor rows, and {', '.join(absent_anchors)} "
                         f"{'has' if len(absent_anchors) == 1 else 'have'} no run of these seeds under {folder}")
    return [p for p in presets if p in there], [p for p in presets if p not in there]


def describe(preset: str) -> dict[str, Any]:
    """numerics, method, weights, w_bits, a_bits of a preset, read from its config."""
    config = md.presets[preset]
    act, weight = config.activation, config.weight
    adaround = getattr(weight, "codes", "nearest") == "adaround" or (act is not None and not act.dynamic)
    modulated = config.mode == "modulated"
    if act is None:
        numerics = "published" if config.split_shortcut and not adaround else "-"  # the published rows' weights alone
        method = "full precision" if weight is None else "full-precision activations"
    elif not act.dynamic:
        numerics, method = "static", "Q-Diffusion + MoDiff" if modulated else "Q-Diffusion"
    else:
        shared = "published-lsun" if act.spec.scheme == "asymmetric" else "published"
        numerics = shared if act.spec.granularity == "tensor" else "per-sample"
        method = "dynamic (LCQ)" if not modulated else "dynamic + MoDiff" if config.compensation else "dynamic + modulation (no EC)"
    return {"numerics": numerics, "method": method,
            "weights": "fp" if weight is None else "AdaRound" if adaround else "RTN",
            "w_bits": 32 if weight is None else weight.spec.bits, "a_bits": 32 if act is None else act.spec.bits}


def _counterparts(presets: Sequence[str]) -> dict[str, dict[str, Optional[str]]]:
    """Per preset: its weights-only anchor and (for a MoDiff row) its direct counterpart, among ``presets``.
    The anchor quantizes the same layers the same way (split shortcut included: it gives the second half of a
    concatenation's weights their own scales) with weights of the same origin, round to nearest or AdaRound."""
    def key(preset: str) -> str:
        return json.dumps([weight_only_config(md.presets[preset]).to_dict(), describe(preset)["weights"]],
                          sort_keys=True, default=str)

    weights_only = {key(p): p for p in presets if p != "fp" and md.presets[p].activation is None}
    out = {}
    for p in presets:
        config = md.presets[p]
        direct = p.replace("-modiff", "") if config.mode == "modulated" else None
        out[p] = {"weights_only": weights_only.get(key(p)) if config.activation is not None else None,
                  "direct": direct if direct in presets else None}
    return out


def _scored_row(model: nn.Module, preset: str, run: Path, seeds: Sequence[int], fp_run: Path, config: SampleConfig,
                ref: str, bootstrap: BootstrapConfig, device: str) -> tuple[dict[str, Any], Optional[Scores]]:
    """One row from a run or its summary (`modiff.pipelines.summary`): the same numbers either way (a run's
    classifier features extracted on ``device``; CPU and GPU features move FID by about 1e-4)."""
    row: dict[str, Any] = {"preset": preset, **describe(preset), "n": len(seeds), "steps": config.steps,
                           "spacing": config.spacing, "precision": experiments.run_precision(run)}
    try:
        scored = run_scores(run, seeds, ref, bootstrap, device)
        metrics, notes = scored.metrics, []
    except SummaryMismatchError:
        raise
    except ValueError as err:  # a degenerate set (all images alike, non-finite scores): reported, not fatal
        scored, metrics, notes = None, {}, [str(err)]
    distances, note = _distances(run, fp_run, seeds)
    row.update(**experiments.score_columns(metrics), is_std=metrics.get("is_std", np.nan), **distances,
               gbops_per_step=preset_report(model, md.presets[preset], config.steps)["gbops_per_step"],
               note="; ".join(notes + [note] if note else notes))
    return row, scored


NO_DISTANCES = "distances not shown: its summary measured them against another fp run"  # the finding counts these


def _distances(run: Path, fp_run: Path, seeds: Sequence[int]) -> tuple[dict[str, float], str]:
    """The row's fidelity to the fp images of the same seeds, and a note; NaN with `NO_DISTANCES` where the run
    is a summary whose distances were measured against other fp images than ``fp_run``'s (its scores stand)."""
    try:
        close = per_seed_fidelity(run, fp_run, seeds).averaged()
    except ReferenceImagesError:
        return dict.fromkeys(["psnr_db", "psnr_ci95_halfwidth", "identical_to_fp", "rel_l2_pixels",
                              "rel_l2_ci95_halfwidth"], np.nan), NO_DISTANCES
    return {"psnr_db": close["psnr_db"]["mean"] if close["psnr_db"] else np.inf,
            "psnr_ci95_halfwidth": close["psnr_db"]["ci95"] if close["psnr_db"] else np.nan,
            "identical_to_fp": close["identical_samples"], "rel_l2_pixels": close["rel_l2_pixels"]["mean"],
            "rel_l2_ci95_halfwidth": close["rel_l2_pixels"]["ci95"]}, ""


_OTHER_SCORES = {"kid": "KID", "precision": "precision", "recall": "recall"}  # verdicts beside FID's, by name


def _compare(rows: list[dict[str, Any]], scores: dict[str, Optional[Scores]], level: float) -> None:
    """Add the verdict columns (`experiments.paired_verdict`): FID against the fp anchor, the weights-only
    anchor and the direct counterpart, and KID, precision and recall against the direct counterpart (empty
    where a side is missing, degenerate or lacks that score)."""
    pairs = _counterparts([r["preset"] for r in rows])

    def against(preset: str, other: Optional[str], score: str = "fid") -> str:
        if other is None or other == preset:
            return ""
        return experiments.paired_verdict(scores, preset, other, level, score)

    for row in rows:
        p = row["preset"]
        row.update(vs_fp=against(p, "fp"), vs_weights_only=against(p, pairs[p]["weights_only"]),
                   modiff_vs_direct=against(p, pairs[p]["direct"]),
                   **{f"modiff_vs_direct_{score}": against(p, pairs[p]["direct"], score) for score in _OTHER_SCORES})


COLUMNS = ["numerics", "method", "weights", "w_bits", "a_bits", "preset", "n", "steps", "spacing", "precision",
           *experiments.SCORE_COLUMNS, "is_std", "vs_fp", "vs_weights_only", "modiff_vs_direct",
           "modiff_vs_direct_kid", "modiff_vs_direct_precision", "modiff_vs_direct_recall", "rel_l2_pixels",
           "rel_l2_ci95_halfwidth", "psnr_db", "psnr_ci95_halfwidth", "identical_to_fp", "gbops_per_step", "note"]


def scored_table(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig, runs_dir: str | Path,
           ref: str = "fmnist-train", batch_size: int = 64, device: str = "auto",
           calibration: Optional[Calibration] = None, devices: str | Sequence[str] = (),
           bootstrap: BootstrapConfig = BootstrapConfig()) -> pd.DataFrame:
    """One row per preset (the anchors fp, w8a32 and w4a32 added first when missing), every row from the same
    ``seeds``; runs are made (or reused, full or summarized) under `experiments.spacing_runs_dir`, static presets calibrated with
    `table_calibration`. Columns: `COLUMNS`; the verdicts read "worse: +d [low, high]" (FID difference, 95%
    paired-bootstrap interval; "no difference" when it holds 0), ``modiff_vs_direct_{kid,precision,recall}``
    likewise for those scores (higher precision and recall are better)."""
    rows_presets = list(dict.fromkeys([*ANCHORS, *presets]))
    folder, calibration = experiments.spacing_runs_dir(model, runs_dir, config), table_calibration(calibration, config)
    runs = {"fp": experiments.fp_reference_run(model, rows_presets, seeds, config, folder, batch_size, device)}
    if len([d for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]) > 1:
        experiments.fill_runs(model, rows_presets, seeds, config, folder, devices, batch_size, calibration)
    runs.update({p: experiments.sample_run(model, p, seeds, config, folder, batch_size, device, calibration=calibration)
                 for p in rows_presets if p != "fp"})
    rows, scores = [], {}
    for preset in rows_presets:
        row, scores[preset] = _scored_row(model, preset, runs[preset], seeds, runs["fp"], config, ref, bootstrap,
                                             str(resolve_device(device)))
        rows.append(row)
    _compare(rows, scores, bootstrap.level)
    return pd.DataFrame(rows)[COLUMNS]


# Transcribed from the paper: tables write them as printed (`tables.to_markdown`'s ``as_given``).
PAPER_COLUMNS = ("paper_fid", "paper_gbops")


def paper_columns(table: pd.DataFrame, model: nn.Module) -> pd.DataFrame:
    """``table`` with the paper's FID (and its cell) for the same method and bit widths, and the paper's
    GBops for the same bit widths, where `data/paper_values.csv` has them (Table 1 for a pixel model)."""
    paper = experiments.paper_values(experiments.paper_tables(model))
    fid = {(r.method, r.weight_bits, r.act_bits): (r.value, f"{r.table}, {r.cell}")
           for r in paper[paper.metric == "FID"].itertuples()}
    gbops = {(r.weight_bits, r.act_bits): r.value for r in paper[paper.metric == "GBops"].itertuples()}
    keys = list(zip(table.method, table.w_bits, table.a_bits))
    return table.assign(paper_fid=[fid.get(k, (np.nan, ""))[0] for k in keys],
                        paper_cell=[fid.get(k, (np.nan, ""))[1] for k in keys],
                        paper_gbops=[gbops.get(k[1:], np.nan) for k in keys])


def _interval(row: pd.Series) -> str:
    return f"{row.fid_classifier:.3g} [{row.fid_ci95_low:.3g}, {row.fid_ci95_high:.3g}]"


def _paper_pairs(table: pd.DataFrame) -> list[str]:
    """One line per MoDiff row whose direct counterpart and both paper values are in the table."""
    by_preset = table.set_index("preset")
    lines = []
    for row in table[table.modiff_vs_direct != ""].itertuples():
        direct = by_preset.loc[row.preset.replace("-modiff", "")]
        if np.isnan(row.paper_fid) or np.isnan(direct.paper_fid):
            continue
        paper_better = row.paper_fid < direct.paper_fid
        ours = row.modiff_vs_direct.split(":")[0]
        agreement = ("agrees with the paper" if (ours == "better") == paper_better and ours != "no difference"
                     else "does not show the paper's difference" if ours == "no difference" else "CONTRADICTS the paper")
        lines.append(f"- W{row.w_bits}A{row.a_bits} {row.numerics} numerics, {row.weights} weights: paper FID "
                     f"{direct.paper_fid:g} -> {row.paper_fid:g} with MoDiff; here {_interval(direct)} -> "
                     f"{_interval(pd.Series(row._asdict()))}, MoDiff vs direct {row.modiff_vs_direct}: {agreement}."
                     + _anchor_sentence(row, by_preset))
    return lines


def _anchor_sentence(row: Any, by_preset: pd.DataFrame) -> str:
    """The paper's other reading of its MoDiff cells: against full-precision activations at the same weights
    (its W8A32, 4.24), near as the index's claim reads it (`report_claims.near_reference`)."""
    from modiff.pipelines.report_claims import near_reference, paper_value

    anchor = _counterparts(list(by_preset.index))[row.preset]["weights_only"]
    if anchor is None or anchor not in by_preset.index or not row.vs_weights_only:
        return ""
    paper_anchor, ours = paper_value("Table 1", "W8A32"), by_preset.loc[anchor]
    near = near_reference(row.vs_weights_only, ours.fid_classifier)
    return (f" Against full-precision activations at these weights (the paper's {paper_anchor:g}, "
            f"{row.paper_fid / paper_anchor:.2f}x there): {anchor} {_interval(ours)}, MoDiff {row.vs_weights_only} "
            f"({row.fid_classifier / ours.fid_classifier:.2f}x): "
            + ("near it, as in the paper." if near else "DIFFERS from the paper (not within 10% of it)."))


def _modiff_worse_lines(table: pd.DataFrame) -> list[str]:
    """One line per MoDiff row worse than its direct counterpart: both read against their weights-only
    anchor (what MoDiff converges to as its residuals are quantized finely), with that anchor against fp."""
    by_preset = table.set_index("preset")
    anchors = _counterparts(list(table.preset))
    lines = []
    for row in table[table.modiff_vs_direct.str.startswith("worse")].itertuples():
        direct, anchor = by_preset.loc[row.preset.replace("-modiff", "")], anchors[row.preset]["weights_only"]
        if anchor is None or anchor not in by_preset.index:
            continue
        base = by_preset.loc[anchor]
        nearer = abs(row.fid_classifier - base.fid_classifier) < abs(direct.fid_classifier - base.fid_classifier)
        lines.append(
            f"- {row.preset} is worse than {direct.name} ({row.modiff_vs_direct}). Its weights-only anchor {anchor} is "
            f"{base.vs_fp or 'not compared'} against fp (relative L2 to fp {_distance(base.rel_l2_pixels)}). "
            f"Against that anchor: "
            f"{row.preset} {row.vs_weights_only}, {direct.name} {direct.vs_weights_only}; "
            + ("MoDiff stays nearer the weights-only model, direct quantization moves the FID further from it."
               if nearer else "MoDiff is not the nearer of the two to the weights-only model."))
    return lines


def _comparisons_line(table: pd.DataFrame) -> list[str]:
    """How many verdicts the table holds, what that means for the ones near 0, and where single-seed resampling
    understates an interval (rows whose activation scale spans samples)."""
    columns = [c for c in ("vs_fp", "vs_weights_only", "modiff_vs_direct", *(f"modiff_vs_direct_{s}" for s in
                                                                           _OTHER_SCORES)) if c in table]
    verdicts = int(sum((table[c].astype(str).str.len() > 0).sum() for c in columns))
    shared = [p for p in table.preset if md.presets[p].samples_per_scale > 1]
    line = (f"- The table holds {verdicts} paired comparisons, each its own 95% interval (no correction for their "
            f"number): a few verdicts whose interval ends near 0 can be chance, so read those as weak.")
    if shared:
        line += (f" {len(shared)} rows share each activation scale over consecutive seeds ({shared[0]}, ...): "
                 f"their seeds need not be independent while the bootstrap resamples single seeds, so their "
                 f"intervals may be too narrow (the published audit measures the design effect of their per-seed "
                 f"distances).")
    return [line]


def _other_scores_line(table: pd.DataFrame) -> list[str]:
    """MoDiff against direct by each score (paired, 95%): how often KID, precision and recall give FID's
    verdict; nothing where the table has no such verdicts (summaries made before they were scored)."""
    pairs = table[table["modiff_vs_direct"].astype(str) != ""]
    parts = []
    for score in _OTHER_SCORES:
        if f"modiff_vs_direct_{score}" not in pairs:
            continue
        column = pairs[f"modiff_vs_direct_{score}"].astype(str)
        judged = pairs[column != ""]
        if judged.empty:
            continue
        word = column[column != ""].str.split(":").str[0]
        same = int((word == judged["modiff_vs_direct"].str.split(":").str[0]).sum())
        parts.append(f"{_OTHER_SCORES[score]} in {same} of {len(judged)} pairs (its own verdicts: better in "
                     f"{int((word == 'better').sum())}, worse in {int((word == 'worse').sum())})")
    if not parts:
        return []
    return [f"- MoDiff against its direct counterpart by the other scores (paired bootstrap, 95%; lower KID, higher "
            f"precision and recall count as better) gives FID's verdict for {'; '.join(parts)}."]


def _distance(rel_l2: float) -> str:
    return "not shown" if np.isnan(rel_l2) else f"{rel_l2:.3g}"


def _better_than_fp_line(scored: pd.DataFrame) -> list[str]:
    """The rows with a lower FID than fp, with their distance to fp: FID measures closeness to the data, not
    to the fp model, so a quantized row can score below fp while its images differ from fp's."""
    better = scored[scored.vs_fp.str.startswith("better")]
    if better.empty:
        return []
    listed = ", ".join(f"{r.preset} ({r.vs_fp.removeprefix('better: ')}; relative L2 to fp {_distance(r.rel_l2_pixels)})"
                       for r in better.itertuples())
    rows = "row has" if len(better) == 1 else "rows have"
    return [f"- {len(better)} {rows} a lower FID than fp: {listed}. FID compares a row with the data, not "
            f"with fp; a lower FID says quantization moved the samples' statistics nearer the data's in this "
            f"feature space, not that the row reproduces fp better."]


def findings(table: pd.DataFrame, left_out: Sequence[str] = ()) -> str:
    """Markdown written from the numbers of a `paper_columns` table: settings, the fp anchor, how many rows
    differ from fp (and which score below it), each MoDiff-vs-direct pair the paper reports, with agreement or
    disagreement, and each pair where MoDiff is worse, read against its weights-only anchor; ``left_out`` names
    the rows not in the table for want of runs (`rows_to_score`)."""
    fp = table.set_index("preset").loc["fp"]
    scored = table[(table.preset != "fp") & (table.vs_fp != "")]
    same = scored[scored.vs_fp.str.startswith("no difference")]
    lines = [f"All {len(table)} rows: N = {fp.n} samples (seeds 0-{fp.n - 1}), {fp.steps} DDIM steps, "
             f"`{fp.spacing}` timesteps; arithmetic: {'; '.join(sorted(set(table.precision)))}.",
             f"- Full precision at this N: FID {_interval(fp)} (classifier feature space). FID is biased at "
             f"small N, so each row is read against this anchor, not against an fp FID at another N.",
             f"- {len(same)} of {len(scored)} quantized rows show no FID difference from fp (paired bootstrap, "
             f"95%): {', '.join(same.preset) or 'none'}."]
    lines += _comparisons_line(table)
    lines += _other_scores_line(table)
    lines += _better_than_fp_line(scored)
    lines += _paper_pairs(table) or ["- No MoDiff/direct pair of this table has paper values for both rows "
                                     "(the paper's cells are in the paper_fid column)."]
    lines += _modiff_worse_lines(table)
    no_distances = table[table.note.fillna("").str.contains(NO_DISTANCES, regex=False)].preset
    if len(no_distances):
        lines.append(f"- No fidelity to fp (PSNR, relative L2) for {len(no_distances)} rows: {', '.join(no_distances)}. "
                     f"Their summaries measured those distances against another fp run of the same model and sampling "
                     f"(other images: another GPU, commit or session); their scores stand, and sampling them again "
                     f"beside this fp run restores the distances.")
    if left_out:
        lines.append(f"- Not in this table (no run or summary at this N yet): {', '.join(left_out)}.")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def fp_device_distance(model: nn.Module, seeds: Sequence[int], config: SampleConfig,
                       earlier: Optional[str | Path] = None) -> pd.DataFrame:
    """Full-precision samples of ``seeds`` on the GPU against the CPU (fp32): per-sample relative L2 of the
    sampler output (mean and max) and the largest difference of a uint8 pixel, for the GPU in fp32 (TF32
    off), in TF32 and with bf16 autocast (the fast path's arithmetic: set beside the table's relative L2 of
    the W8 rows, it says whether bf16 alone would move images as far as 8-bit quantization does). Without a
    GPU: the measured rows of ``earlier`` (this table as a GPU run saved it, so rendering the report on a CPU
    keeps what only a GPU can measure), each noted as kept; else one row that says nothing was measured."""
    import copy

    from modiff.utils.images import to_uint8

    if not torch.cuda.is_available():
        kept = pd.read_csv(earlier) if earlier is not None and Path(earlier).is_file() else pd.DataFrame()
        if not kept.empty and (kept["gpu_precision"] != "-").all():
            return kept.assign(note="kept from an earlier run of this notebook on a GPU (none on this machine)")
        return pd.DataFrame([{"gpu_precision": "-", "note": "no GPU on this machine: the GPU-CPU distance is not measured"}])
    cpu_model = copy.deepcopy(model).cpu()  # a latent model decodes on its own device: each output with its copy
    cpu_out = sample(cpu_model, seeds, replace(config, precision="fp32"), torch.device("cpu"))
    cpu_images = to_uint8(md.to_images(cpu_model, cpu_out)).astype(np.int16)
    gpu_model = copy.deepcopy(model).to("cuda")
    rows = []
    labels = {"fp32": "fp32 (TF32 off)", "tf32": "tf32", "bf16": "bf16 autocast"}
    for precision, label in labels.items():
        out = sample(gpu_model, seeds, replace(config, precision=precision), torch.device("cuda"))
        images = to_uint8(md.to_images(gpu_model, out).cpu()).astype(np.int16)
        out = out.cpu()
        rel = ((out - cpu_out).flatten(1).norm(dim=1) / cpu_out.flatten(1).norm(dim=1)).numpy()
        pixels = np.abs(images - cpu_images)
        rows.append({"gpu_precision": label, "n": len(seeds),
                     "rel_l2_mean": float(rel.mean()), "rel_l2_max": float(rel.max()),
                     "max_pixel_difference_uint8": int(pixels.max()),
                     "pixels_differing_fraction": float((pixels > 0).mean()), "note": ""})
    return pd.DataFrame(rows)
