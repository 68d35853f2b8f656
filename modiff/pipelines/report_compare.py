"""Ours beside the paper's: for each report section with paper values, a small table (the paper's number
next to ours) and one computed line per trend saying whether it agrees; the setting that differs from the
paper's, stated once; and the compact view of Table 1 with its paper columns.

Everything is read from a report folder's saved tables (`report_claims.SavedTables`) and the run
parameters of its manifest, so an index can be rebuilt without running a notebook.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from modiff.pipelines.report_claims import SavedTables, interval, near_reference, paper_value, weights_only_preset

__all__ = ["Comparison", "comparison", "setting_table", "table1_view", "is_latent"]


@dataclass
class Comparison:
    table: Optional[pd.DataFrame] = None  # columns: quantity, paper, ours
    lines: list[str] = field(default_factory=list)  # "agrees: ..." / "differs: ..."


def _line(agrees: bool, text: str) -> str:
    return f"{'agrees' if agrees else 'differs'}: {text}"


def _fig1a(t: SavedTables) -> Optional[Comparison]:
    table = t.get("fig1a_caching_summary", ["interval", "comparison", "mean", "ci95_low", "ci95_high", "steps"])
    if table is None:
        return None
    common = table[table["comparison"] == "last step every N skips"].set_index("interval")
    overall = table[table["comparison"] == "mean over all steps"].sort_values("interval")
    if 3 not in common.index or overall.empty:
        return None
    paper, row = paper_value("Figure 1a", "N=3 last step"), common.loc[3]
    rising = bool((overall["ci95_high"].to_numpy()[:-1] < overall["ci95_low"].to_numpy()[1:]).all())
    rows = pd.DataFrame([
        {"quantity": "relative L2, N = 3, late step", "paper": f"about {paper:g} (last step)",
         "ours": f"{interval(row['mean'], row['ci95_low'], row['ci95_high'])} (step {row['steps']}, the last every N skips)"},
        {"quantity": "mean over all steps, by N", "paper": "grows with N",
         "ours": ", ".join(f"N = {int(r.interval)}: {r.mean:.3g}" for r in overall.itertuples())}])
    ratio = row["mean"] / paper
    return Comparison(rows, [
        _line(rising, f"the error grows with N (disjoint 95% intervals of the mean over all steps): "
                      f"{'yes' if rising else 'no'}, as in the paper."),
        _line(abs(ratio - 1) <= 0.25, f"level at N = 3: {row['mean']:.3g} against the paper's {paper:g} "
                                      f"({ratio:.2g}x the paper's).")])


def _fig1b(t: SavedTables) -> Optional[Comparison]:
    table = t.get("fig1b_range_ratios", ["layer", "min_per_step", "median_per_step"])
    if table is None or table.empty:
        return None
    paper = paper_value("Figure 1b", "range ratio")
    rows = pd.DataFrame([{"quantity": f"median per-step range ratio, `{r.layer}`", "paper": f"more than {paper:g}",
                          "ours": f"{r.median_per_step:.3g}"} for r in table.itertuples()])
    narrower = table["min_per_step"] > 1
    ten = table["median_per_step"] >= paper
    return Comparison(rows, [
        _line(bool(narrower.all()), f"differences narrower than activations at every step in "
                                    f"{int(narrower.sum())} of {len(table)} layers (smallest per-step ratio above 1)."),
        _line(bool(ten.all()), f"more than {paper:g}x narrower (median over steps) in {int(ten.sum())} of {len(table)} layers.")])


def _pair_lines(table: pd.DataFrame) -> list[str]:
    """One line per MoDiff row whose direct counterpart also has a paper FID."""
    by_preset = table.set_index("preset")
    lines = []
    for row in table[table["modiff_vs_direct"].astype(str) != ""].itertuples():
        direct_name = str(row.preset).replace("-modiff", "")
        if direct_name not in by_preset.index or pd.isna(row.paper_fid) or pd.isna(by_preset.loc[direct_name, "paper_fid"]):
            continue
        direct = by_preset.loc[direct_name]
        ours = str(row.modiff_vs_direct).split(":")[0]
        paper_better = row.paper_fid < direct.paper_fid
        lines.append(_line(ours == ("better" if paper_better else "worse"),
                           f"W{row.w_bits}A{row.a_bits} {row.numerics}: the paper's FID goes {direct.paper_fid:g} -> "
                           f"{row.paper_fid:g} with MoDiff, ours {direct.fid_classifier:.3g} -> {row.fid_classifier:.3g} "
                           f"(MoDiff vs direct {row.modiff_vs_direct})."))
    return lines


def _near_anchor_lines(table: pd.DataFrame) -> list[str]:
    """One line per MoDiff row with a paper FID at W8A4 or W8A3: the paper's FID against its W8A32 anchor
    (full-precision activations), ours against our W8A32 row, near as the index's claim reads it."""
    by_preset, lines = table.set_index("preset"), []
    paper_anchor = paper_value("Table 1", "W8A32")
    for row in table[(table["method"] == "dynamic + MoDiff") & table["paper_fid"].notna()].itertuples():
        anchor = weights_only_preset(str(row.preset), int(row.a_bits))
        if anchor not in by_preset.index or not isinstance(row.vs_weights_only, str):
            continue
        ours = by_preset.loc[anchor, "fid_classifier"]
        lines.append(_line(near_reference(row.vs_weights_only, ours),
                           f"W{row.w_bits}A{row.a_bits} {row.numerics} MoDiff against full-precision activations: the "
                           f"paper's FID {row.paper_fid:g} against its W8A32 {paper_anchor:g} "
                           f"({row.paper_fid / paper_anchor:.2f}x), ours {row.fid_classifier:.3g} against {ours:.3g} "
                           f"({row.fid_classifier / ours:.2f}x; {row.vs_weights_only})."))
    return lines


def _unmatched_paper_cells(t: SavedTables, table: pd.DataFrame) -> list[str]:
    """The paper's Table 1 FID cells that no row of ours measures (its Q-Diffusion cells, for instance)."""
    paper = t.get("table1_paper_values", ["table", "cell", "metric", "value"])
    if paper is None:
        return []
    cells = paper[(paper["table"] == "Table 1") & (paper["metric"] == "FID")]
    matched = set(table["paper_cell"].dropna().astype(str)) if "paper_cell" in table else set()
    missing = [f"{r.cell} ({r.value:g})" for r in cells.itertuples() if f"Table 1, {r.cell}" not in matched]
    return [f"not measured here: {', '.join(missing)}."] if missing else []


def _table1(t: SavedTables) -> Optional[Comparison]:
    table = t.get("table1_bitwidth", ["preset", "numerics", "method", "w_bits", "a_bits", "fid_classifier",
                                      "modiff_vs_direct", "paper_fid", "gbops_per_step"])
    if table is None:
        return None
    table = table.assign(modiff_vs_direct=table["modiff_vs_direct"].fillna(""))
    lines = _pair_lines(table)
    if "vs_weights_only" in table:
        lines += _near_anchor_lines(table)
    lines += _unmatched_paper_cells(t, table)
    full, low = (table.loc[(table["w_bits"] == 8) & (table["a_bits"] == a), "gbops_per_step"] for a in (32, 3))
    if len(full) and len(low):
        paper = paper_value("Table 1", "W8A32 GBops") / paper_value("Table 1", "W8A3 GBops")
        ours = full.iloc[0] / low.iloc[0]
        lines.append(_line(ours >= 0.9 * paper, f"GBops W8A32 / W8A3: {ours:.3g}x here, {paper:.3g}x in the paper."))
    return Comparison(None, lines) if lines else None


def _bops(t: SavedTables) -> Optional[Comparison]:
    table = t.get("modiff_state_accounting", ["model", "accounting", "mb_per_image"])
    if table is None:
        return None
    cifar = table[table["model"].astype(str).str.startswith("cifar10")]
    if cifar.empty:
        return None
    paper, ours = paper_value("Table 6", "batch 1 memory"), cifar.iloc[0]
    rows = pd.DataFrame([{"quantity": "extra memory at batch 1, CIFAR-10-size UNet (MB)", "paper": f"at most {paper:g}",
                          "ours": f"{r.mb_per_image:.3g} ({r.accounting})"} for r in cifar.itertuples()])
    return Comparison(rows, [_line(ours["mb_per_image"] <= paper, f"{ours['mb_per_image']:.3g} MB with our count "
                                                                  f"({ours['accounting']}) against at most {paper:g} MB.")])


_COMPARISONS = {"fig1a": _fig1a, "fig1b": _fig1b, "table1": _table1, "bops": _bops}


def comparison(anchor: str, tables: SavedTables) -> Optional[Comparison]:
    """The paper's values beside ours for the section ``anchor``; None where it has none or its table is missing."""
    build = _COMPARISONS.get(anchor)
    return build(tables) if build else None


def is_latent(tables: SavedTables, model: str) -> bool:
    """A latent model samples with `ldm` timesteps (read from Table 1); without that table, by its name."""
    table = tables.get("table1_bitwidth", ["spacing"])
    return bool((table["spacing"] == "ldm").any()) if table is not None and len(table) else "ldm" in model


_PAPER_ACTIVATIONS = {
    False: "the published CIFAR-10 commands': symmetric, one scale per batch tensor of 64 images, split shortcut",
    True: "the published LSUN commands': asymmetric, one scale per batch tensor of 8 samples, no split"}

_MODELS = {"fmnist-ddim": "`fmnist-ddim`: the shipped Fashion-MNIST pixel DDIM (32x32, one channel)",
           "fmnist-ldm": "`fmnist-ldm`: the shipped Fashion-MNIST latent diffusion model"}


# Tables whose precision column records the arithmetic of their numbers, and what the report calls them.
_ARITHMETIC_SOURCES = {"table1_bitwidth": "Table 1's sample runs", "samplers": "the sampler table's runs",
                      "warmup_steps": "warm-up steps", "fig1a_caching_summary": "Figure 1a",
                      "fig1b_range_ratios": "Figure 1b", "table4_last_step_error": "Figure 3",
                      "w4_layer_sensitivity": "layer sensitivity"}


def _arithmetic(tables: SavedTables) -> str:
    """The arithmetic of the report's numbers as their tables record it, grouped by value ("not recorded"
    for a table saved without its precision column); the theory sweep and the audit always run IEEE float32."""
    sources: dict[str, list[str]] = {}
    for name, label in _ARITHMETIC_SOURCES.items():
        table = tables.get(name)
        if table is not None:
            recorded = "precision" in table.columns and len(table)
            value = "; ".join(sorted(set(table["precision"]))) if recorded else "not recorded"
            sources.setdefault(value, []).append(label)
    parts = [f"{', '.join(labels)}: {value}" for value, labels in sources.items()]
    return "; ".join([*parts, "theory sweep and published-code audit: IEEE float32"])


def _calibration(tables: SavedTables) -> str:
    """Where Table 1's AdaRound weights and Q-Diffusion scales come from, with their iterations against the
    published recipe's, as the Table 1 notebook recorded them."""
    record = tables.get("table1_calibration", ["source", "adaround_iters", "activation_iters",
                                               "published_adaround_iters", "published_activation_iters"])
    if record is None or not len(record):
        return "not recorded (run table1_bitwidth again)"
    row = record.iloc[0]
    if pd.isna(row["adaround_iters"]):
        return str(row["source"])
    used = (int(row["adaround_iters"]), int(row["activation_iters"]))
    published = (int(row["published_adaround_iters"]), int(row["published_activation_iters"]))
    reduced = "" if used == published else f" (reduced from the published {published[0]:,} and {published[1]:,})"
    return f"{row['source']}: AdaRound {used[0]:,} iterations per block, step sizes {used[1]:,}{reduced}"


def setting_table(tables: SavedTables, model: str, parameters: Mapping[str, Any]) -> pd.DataFrame:
    """What differs between the paper's setting and this report's (model, metric space, sample size,
    sampler, arithmetic), from the report's parameters and, where it has them, Table 1 and the sampler table."""
    latent = is_latent(tables, model)
    table1 = tables.get("table1_bitwidth", ["n", "steps", "spacing", "precision"])
    known = dict(parameters)
    if table1 is not None and len(table1):
        known.update(num_samples=int(table1["n"].max()), steps=int(table1["steps"].max()),
                     spacing=table1["spacing"].iloc[0])

    def get(key: str) -> str:
        value = known.get(key)
        return "not recorded" if value is None else f"{value:,}" if isinstance(value, int) else str(value)

    paper_model = ("LSUN-Bedrooms LDM-4 and LSUN-Churches LDM-8" if latent
                   else "the official CIFAR-10 DDIM UNet (35.75M parameters, 32x32 RGB)")
    compared = ([{"": "paper numbers compared", "paper": "its CIFAR-10 DDIM numbers (Table 1's FIDs and GBops, Figure "
                  "1a's 0.4, Figure 1b's 10x, 4 MB of state, 4-5 warm-up steps)",
                  "this report": "set beside this latent model's: the paper's brief gives no LSUN values to compare"}]
                if latent else [])
    return pd.DataFrame([
        {"": "model", "paper": paper_model, "this report": _MODELS.get(model, f"`{model}`")},
        *compared,
        {"": "FID feature space", "paper": "Inception-v3, against the data set's training images",
         "this report": "a Fashion-MNIST classifier (shipped), against Fashion-MNIST train: values are not comparable "
                        "with the paper's, directions and verdicts are"},
        {"": "samples per FID", "paper": "50,000", "this report": get("num_samples")},
        {"": "trajectories per figure", "paper": "not stated",
         "this report": f"{get('analysis_samples')} (Figures 1a, 1b, 3, grids); theory: {get('theory_calib_samples')} "
                        f"calibration + {get('theory_heldout_samples')} held-out; warm-up: {get('warmup_samples')} seeds"},
        {"": "sampler", "paper": "DDIM, 100 steps, quad timesteps" if not latent else
         "DDIM, eta 0, LDM timesteps; the published LSUN commands' 500 steps (churches, `-c 400`, stride 2) "
         "and 200 (bedrooms)",
         "this report": f"DDIM, {get('steps')} steps, {known.get('spacing', 'ldm' if latent else 'quad')} timesteps"},
        {"": "other samplers", "paper": "DDPM (the DDIM code's `ddpm_steps`) and DPM-Solver: the published MoDiff "
                                        "code's `--sample_type dpm_solver` is DPM-Solver++ of order 3, singlestep, "
                                        "time-uniform in continuous time",
         "this report": "DDPM as `ddpm_steps`; DPM-Solver++(2M), data prediction, multistep, on the report's "
                        "integer timesteps: another variant than the published one"},
        {"": "activation quantizer (dynamic rows)", "paper": _PAPER_ACTIVATIONS[latent],
         "this report": "`wXaY`: asymmetric min-max, one scale per sample, no split; the published commands' "
                        "numerics are the `published-*` rows, the like-for-like comparison"},
        {"": "weights", "paper": "Q-Diffusion's AdaRound checkpoints, at W8 as at W4 (`--resume`)",
         "this report": "rounded to nearest in the `wXaY` and `published-*` rows; AdaRound in the `-adaround` "
                        "and `qdiff-*` rows"},
        {"": "attention matmuls", "paper": "full precision in the MoDiff code (Q-Diffusion's quantize q, k, v and "
                                           "the softmax output); its GBops count them at the row's bit widths",
         "this report": "full precision in every preset, `qdiff-*` included; GBops count the Conv/Linear layers "
                        "only (W8A32 over W8A3 is 32/3 per step either way)"},
        {"": "arithmetic", "paper": "not stated", "this report": _arithmetic(tables)},
        {"": "calibration (AdaRound W4 and Q-Diffusion rows)",
         "paper": "AdaRound 20,000 iterations per block, step sizes 5,000 (Q-Diffusion's recipe)",
         "this report": _calibration(tables)},
    ])


def _fid(row: pd.Series) -> str:
    return interval(row["fid_classifier"], row["fid_ci95_low"], row["fid_ci95_high"]) if np.isfinite(row["fid_classifier"]) else ""


TABLE1_VIEW = ["preset", "numerics", "method", "weights", "w_bits", "a_bits", "n", "fid_classifier", "fid_ci95_low",
               "fid_ci95_high", "vs_fp", "modiff_vs_direct", "rel_l2_pixels", "gbops_per_step", "paper_fid", "paper_gbops"]


def table1_view(tables: SavedTables) -> Optional[pd.DataFrame]:
    """Table 1 as the index shows it: FID with its interval in one column, the verdicts, and the paper's
    FID and GBops beside ours; None when the table is missing or in an older format."""
    table = tables.get("table1_bitwidth", TABLE1_VIEW)
    if table is None:
        return None
    return pd.DataFrame({
        "preset": table["preset"], "numerics": table["numerics"], "method": table["method"], "weights": table["weights"],
        "W/A bits": [f"W{w}A{a}" for w, a in zip(table["w_bits"], table["a_bits"])],
        "FID [95%] (classifier)": [_fid(r) for _, r in table.iterrows()],
        "vs fp": table["vs_fp"].fillna(""), "MoDiff vs direct": table["modiff_vs_direct"].fillna(""),
        "rel. L2 to fp": table["rel_l2_pixels"], "GBops/step": table["gbops_per_step"],
        "paper FID (Inception)": [f"{v:g}" if np.isfinite(v) else "" for v in table["paper_fid"]],  # as printed: 143.39
        "paper GBops": table["paper_gbops"]})
