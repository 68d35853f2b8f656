"""How much the published numerics depend on how many samples share one dynamic activation scale.

The published quantizer computes each activation scale over a whole batch tensor, so a published FID depends on
the batch size its run happened to use (the published DDIM code samples in batches of 64). The published presets
here share each scale over 64 consecutive seeds (`modiff.quant.presets.PUBLISHED_BATCH`); this module scores them
against runs of the same presets and seeds whose scales spanned another number of samples, paired seed by seed.
Both sides are read from runs or their summaries (`modiff summarize`); nothing is sampled here.

Seeds that share a scale are not independent, while the FID bootstrap resamples single seeds: `design_effects`
measures, on each run's per-seed distances to the full-precision images, how much more they vary between runs of
consecutive seeds than independent seeds would (1 for independent seeds). A bootstrap over single seeds
understates the width of an interval of a mean over seeds by about the square root of it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from torch import nn

import modiff as md
from analysis import experiments
from modiff.metrics.bootstrap import BootstrapConfig, paired_difference
from modiff.pipelines.generate import SampleConfig
from modiff.pipelines.summary import ReferenceImagesError, per_seed_fidelity, run_scores, stored_fidelity
from modiff.quant.presets import PUBLISHED_BATCH
from modiff.utils.device import resolve_device

__all__ = ["COLUMNS", "published_presets", "samples_per_scale", "comparison", "finding", "section", "design_effect",
           "design_effects", "design_section"]


COLUMNS = ["preset", "method", "w_bits", "a_bits", "n", "samples_per_scale", "fid", "fid_ci95", "other_samples_per_scale",
           "other_fid", "other_fid_ci95", "difference", "difference_ci95_low", "difference_ci95_high", "verdict"]
_VERDICTS = {"better": "lower", "worse": "higher", "no difference": "no difference"}  # of FID(runs_dir)


def _shares_a_scale(quant: md.QuantConfig) -> bool:
    """Whether a config's dynamic activation scale spans samples (one per tensor: the published numerics)."""
    act = quant.activation
    return act is not None and act.dynamic and act.spec.granularity == "tensor"


def published_presets() -> list[str]:
    """The presets whose dynamic activation scale spans samples (the published numerics), in registry order."""
    return [name for name in md.presets if _shares_a_scale(md.presets[name])]


def samples_per_scale(run: str | Path) -> int:
    """Consecutive samples that shared each dynamic activation scale in a run of a published preset, from its
    manifest: the quantization config's ``samples_per_scale`` or, for a run made before that field existed, the
    batch size (its scale spanned each batch tensor; the last batch holds the remainder either way)."""
    identity = json.loads((Path(run) / "manifest.json").read_text())["identity"]
    preset = identity["model"]["quant_preset"]
    if not _shares_a_scale(md.presets[preset]):
        raise ValueError(f"{run}: preset {preset} has no dynamic per-tensor activation scale to share")
    recorded = identity["model"].get("quant_config", {}).get("activation", {}).get("spec", {})
    return int(recorded.get("samples_per_scale") or identity["execution"]["batch_size"])


def _scored(run: Path, seeds: Sequence[int], ref: str, bootstrap: BootstrapConfig) -> dict[str, Any]:
    scores = run_scores(run, seeds, ref, bootstrap)
    if scores.fid_resamples is None:
        raise ValueError(f"{run} has no FID bootstrap resamples to pair (summarize it again)")
    return {"samples_per_scale": samples_per_scale(run), "fid": scores.metrics["fid"],
            "low": scores.metrics["fid_ci95_low"], "high": scores.metrics["fid_ci95_high"],
            "resamples": scores.fid_resamples}


def _paired_runs(model: nn.Module, presets: Sequence[str], config: SampleConfig, runs_dir: str | Path,
                 other_runs_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Per preset with a run (or summary) in both folders: the two run folders, as `sample_run` names them."""
    pairs = {}
    for preset in presets:
        runs = tuple(experiments.run_location(model, preset, config, experiments.spacing_runs_dir(model, d, config))
                     for d in (runs_dir, other_runs_dir))
        if all((r / "manifest.json").is_file() for r in runs):
            pairs[preset] = runs
    return pairs


def comparison(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig,
               runs_dir: str | Path, other_runs_dir: str | Path, ref: str = "fmnist-train",
               bootstrap: BootstrapConfig = BootstrapConfig(), device: str = "auto") -> pd.DataFrame:
    """One row per preset with a run (or summary) of ``seeds`` under both folders (laid out as Table 1's,
    `analysis.experiments.spacing_runs_dir`): each side's samples per scale and FID with its 95% bootstrap
    interval, and the paired-bootstrap verdict on FID(runs_dir) - FID(other_runs_dir) over the same resampled
    seeds ("lower", "higher", "no difference"). Runs are looked up as `analysis.experiments.sample_run` names
    them, "auto" precision resolved for ``device``. Presets missing on either side are left out; none found
    raises ValueError."""
    resolved = config.resolved(resolve_device(device))
    pairs = _paired_runs(model, presets, resolved, runs_dir, other_runs_dir)
    if not pairs:
        raise ValueError(f"no preset of {list(presets)} has runs under both {runs_dir} and {other_runs_dir}")
    rows = []
    for preset, runs in pairs.items():
        ours, other = (_scored(r, seeds, ref, bootstrap) for r in runs)
        compared = paired_difference(ours["fid"], other["fid"], ours["resamples"], other["resamples"], bootstrap.level)
        quant = md.presets[preset]
        rows.append({"preset": preset, "method": "MoDiff" if quant.mode == "modulated" else "direct",
                     "w_bits": quant.weight.spec.bits, "a_bits": quant.activation.spec.bits, "n": len(seeds),
                     "samples_per_scale": ours["samples_per_scale"], "fid": ours["fid"],
                     "fid_ci95": f"[{ours['low']:.3g}, {ours['high']:.3g}]",
                     "other_samples_per_scale": other["samples_per_scale"], "other_fid": other["fid"],
                     "other_fid_ci95": f"[{other['low']:.3g}, {other['high']:.3g}]",
                     "difference": compared["difference"], "difference_ci95_low": compared["low"],
                     "difference_ci95_high": compared["high"], "verdict": _VERDICTS[compared["verdict"]]})
    return pd.DataFrame(rows, columns=COLUMNS)


def finding(table: pd.DataFrame) -> str:
    """The comparison in words: per method, the largest change and the rows whose FID moved."""
    ours, other = sorted(set(table["samples_per_scale"])), sorted(set(table["other_samples_per_scale"]))
    lines = [f"FID with each scale shared by {'/'.join(map(str, ours))} samples minus FID with it shared by "
             f"{'/'.join(map(str, other))}, the same {table['n'].iloc[0]:,} seeds, paired bootstrap 95% intervals:"]
    for method, rows in table.groupby("method", sort=False):
        moved = rows[rows["verdict"] != "no difference"]
        largest = rows.loc[rows["difference"].abs().idxmax()]
        lines.append(f"- {method}: {len(moved)} of {len(rows)} rows moved; the largest change is "
                     f"{largest['preset']} {largest['other_fid']:.3g} -> {largest['fid']:.3g} "
                     f"({largest['difference']:+.3g} [{largest['difference_ci95_low']:+.3g}, "
                     f"{largest['difference_ci95_high']:+.3g}]).")
    spread = table.groupby("method")["difference"].apply(lambda d: d.abs().max())
    if {"direct", "MoDiff"} <= set(spread.index):
        lines.append(f"The MoDiff rows move by at most {spread['MoDiff']:.2g} FID, the direct rows by up to "
                     f"{spread['direct']:.3g}: " + (
                         "a published MoDiff number depends less than its baseline's on the batch the published "
                         "code happened to sample in." if spread["MoDiff"] < spread["direct"] else
                         "MoDiff is no less sensitive than direct quantization to that batch."))
    return "\n".join(lines)


def design_effect(values: Sequence[float], group: int) -> float:
    """g Var(means of consecutive groups of g) / Var(values), over the whole groups (a trailing part is left
    out): about 1 for independent values, larger when values of one group move together."""
    values = np.asarray(values, dtype=np.float64)
    whole = len(values) // group * group
    if group < 1 or whole < 2 * group:
        raise ValueError(f"a design effect over groups of {group} needs at least {2 * group} values, got {len(values)}")
    spread = values[:whole].var(ddof=1)
    if spread == 0:
        raise ValueError("the values do not vary: no design effect")
    return float(group * values[:whole].reshape(-1, group).mean(axis=1).var(ddof=1) / spread)


DESIGN_COLUMNS = ["preset", "method", "shares_a_scale", "samples_per_group", "groups", "design_effect",
                  "distances_to"]


def design_effects(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig,
                   runs_dir: str | Path, device: str = "auto") -> pd.DataFrame:
    """Per preset with a run (or summary) of ``seeds`` under ``runs_dir`` (laid out as Table 1's): the design
    effect of its per-seed relative L2 distance to the full-precision run's images (seeds sorted), over groups
    of its samples per scale (runs of a scale shared by samples) or, for comparison, of the published batch
    (per-sample presets); the number of whole groups."""
    resolved = config.resolved(resolve_device(device))
    folder = experiments.spacing_runs_dir(model, runs_dir, resolved)
    fp_run = experiments.run_location(model, "fp", resolved, folder)
    rows = []
    for preset in presets:
        run = experiments.run_location(model, preset, resolved, folder)
        if not (run / "manifest.json").is_file():
            continue
        group = samples_per_scale(run) if _shares_a_scale(md.presets[preset]) else PUBLISHED_BATCH
        distances, reference = _distances(run, fp_run, sorted(int(s) for s in seeds))
        quant = md.presets[preset]
        rows.append({"preset": preset, "method": "MoDiff" if quant.mode == "modulated" else "direct",
                     "shares_a_scale": _shares_a_scale(quant), "samples_per_group": group,
                     "groups": len(distances) // group, "design_effect": design_effect(distances, group),
                     "distances_to": reference})
    return pd.DataFrame(rows, columns=DESIGN_COLUMNS)


def _distances(run: Path, fp_run: Path, seeds: list[int]) -> tuple[np.ndarray, str]:
    """The run's per-seed relative L2 to ``fp_run``'s images, or, for a summary measured against another fp run
    of the same seeds (another GPU or process), to that run's: a design effect is a statistic of the row's own
    distances, and fp runs of the same seeds differ by a small fraction of a quantized row's distance."""
    try:
        return per_seed_fidelity(run, fp_run, seeds).rel_l2_pixels, "the fp run"
    except ReferenceImagesError:
        return stored_fidelity(run, seeds).rel_l2_pixels, "another fp run of the same seeds"


def design_section(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig,
                   runs_dir: str | Path, device: str = "auto") -> tuple[pd.DataFrame, str]:
    """`design_effects` and a sentence on it; an empty table and why, where ``seeds`` hold fewer than two groups
    of the published batch."""
    if len(seeds) < 2 * PUBLISHED_BATCH:
        return (pd.DataFrame(columns=DESIGN_COLUMNS), f"Not measured: {len(seeds)} seeds hold fewer than two groups of "
                                f"{PUBLISHED_BATCH} (the paper preset's 10,000 do).")
    table = design_effects(model, presets, seeds, config, runs_dir, device)
    if table.empty:
        return table, f"Not measured: none of these presets has a run of these seeds under {_shown(runs_dir)}."
    parts = []
    for (shared, method), rows in table.groupby(["shares_a_scale", "method"], sort=False):
        what = "sharing a scale" if shared else "one scale per sample (groups of the published batch, for comparison)"
        parts.append(f"{method} rows {what}: {rows['design_effect'].min():.2f}-{rows['design_effect'].max():.2f} "
                     f"({len(rows)} rows)")
    groups = int(table["groups"].min())
    others = int((table["distances_to"] != "the fp run").sum())
    whose = "row's" if others == 1 else "rows'"
    other_reference = "" if not others else (
        f" {others} {whose} distances are to another fp run of the same seeds (the one "
        f"{'its summary was' if others == 1 else 'their summaries were'} made against: `distances_to`).")
    return table, (f"Design effect of each row's per-seed distance to the full-precision images over groups of "
                   f"consecutive seeds (1: as independent seeds; at least {groups} groups, so about "
                   f"{(2 / (groups - 1)) ** 0.5:.2f} is its sampling noise): " + "; ".join(parts) + ". Where it is "
                   "above 1, a bootstrap over single seeds, as Table 1's and the comparison above, gives those rows "
                   "intervals too narrow, by about its square root for a mean over seeds; their FID intervals "
                   "likely so too (not measured: a summary keeps no classifier features to resample groups)."
                   + other_reference)


def _shown(folder: str | Path) -> str:
    """A folder as a report shows it: relative to the working directory (the repository root for the
    notebooks) when inside it, so a committed report names no machine's paths."""
    path = Path(folder).resolve()
    return str(path.relative_to(Path.cwd().resolve())) if path.is_relative_to(Path.cwd().resolve()) else str(path)


def section(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig, runs_dir: str | Path,
            other_runs_dir: str | Path, ref: str = "fmnist-train", bootstrap: BootstrapConfig = BootstrapConfig(),
            device: str = "auto") -> tuple[pd.DataFrame, str]:
    """`comparison` and its `finding`; or an empty table and a sentence saying why, when no preset has runs in both
    folders (the quick preset has none: the runs compared are paper-scale ones, under `data/summaries/paper/`)."""
    resolved = config.resolved(resolve_device(device))
    if not _paired_runs(model, presets, resolved, runs_dir, other_runs_dir):
        why = (f"Not compared: no published preset has runs under both {_shown(runs_dir)} and {_shown(other_runs_dir)} "
               f"for {config.sampler} with {config.steps} steps, {config.spacing} spacing, {resolved.precision}.")
        return pd.DataFrame(columns=COLUMNS), why
    table = comparison(model, presets, seeds, config, runs_dir, other_runs_dir, ref, bootstrap, device)
    folder = experiments.spacing_runs_dir(model, runs_dir, resolved)
    left_out = [p for p in presets if p not in set(table["preset"])
                and (experiments.run_location(model, p, resolved, folder) / "manifest.json").is_file()]
    return table, finding(table) + (f"\nNot compared (a run here, none with the other sharing): {', '.join(left_out)}; "
                                    f"the sentences above are about the compared rows only." if left_out else "")
