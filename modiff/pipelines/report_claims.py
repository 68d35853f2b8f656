"""The report's verdicts on the paper's claims, computed from the tables a report folder holds.

Each claim function reads the saved tables (`SavedTables`: out_dir/tables/<name>.csv) and returns a
`Claim`: the paper's claim in a few words, a verdict ("reproduced", "partly", "not reproduced", or "not
measured" when its table is missing or in an older format) by the rule in its docstring, and the numbers
the verdict rests on. The paper's numbers come from data/paper_values.csv. Nothing here samples or loads a
model: an index can be rebuilt from a report folder alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import pandas as pd

__all__ = ["Claim", "Verdict", "SavedTables", "CLAIMS", "claims", "paper_value", "interval", "near_reference",
           "mebibytes", "weights_only_preset"]

Verdict = Literal["reproduced", "partly", "not reproduced", "inconclusive", "not measured"]

# The reading of "stays small" in Figure 3 (the paper gives no number): as in analysis.claims.compensation_claim.
SMALL_FEATURE_ERROR = 0.1
CACHING_TOLERANCE = 0.25  # "about 40%": within 25% (relative), as in analysis.claims.caching_claim
# "Near full precision": the paired FID difference to fp lies, with its whole 95% interval, within 10% of fp's FID
# (an equivalence reading: "no difference" with a wider interval is no evidence of nearness, only inconclusive).
EQUIVALENCE_MARGIN = 0.10


@dataclass(frozen=True)
class Claim:
    claim: str  # the paper's claim, in a few words
    verdict: Verdict
    evidence: str  # Markdown: the numbers the verdict rests on
    section: str  # anchor of the index section that shows them
    notebook: str  # the notebook that makes its tables


class SavedTables:
    """The CSV tables of a report folder, each read once; `get` gives None for a table that is missing
    or lacks one of the ``columns`` asked for (a table from an older version of its notebook)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.folder = Path(out_dir) / "tables"
        self._read: dict[str, Optional[pd.DataFrame]] = {}

    def get(self, name: str, columns: Sequence[str] = ()) -> Optional[pd.DataFrame]:
        if name not in self._read:
            path = self.folder / f"{name}.csv"
            try:
                self._read[name] = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
            except (OSError, ValueError, pd.errors.EmptyDataError):
                self._read[name] = None
        table = self._read[name]
        return table if table is not None and set(columns) <= set(table.columns) else None


@lru_cache(maxsize=1)
def _paper_values() -> pd.DataFrame:
    from modiff.models.registry import data_dir

    return pd.read_csv(data_dir() / "paper_values.csv")


def paper_value(table: str, cell: str) -> float:
    """One number of data/paper_values.csv, by its table and cell."""
    values = _paper_values()
    match = values[(values["table"] == table) & (values["cell"] == cell)]
    if match.empty:
        raise KeyError(f"data/paper_values.csv has no cell {cell!r} of {table!r}")
    return float(match["value"].iloc[0])


def interval(mean: float, low: float, high: float) -> str:
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def _unmeasured(claim: str, section: str, notebook: str, table: str) -> Claim:
    return Claim(claim, "not measured", f"`{table}` is missing or in an older format: rerun `{notebook}`.", section,
                 notebook)


def caching_error(t: SavedTables) -> Claim:
    """Figure 1a. Reproduced: at N = 3 the error at the last step every N skips with a new input
    (`analysis.caching.last_informative_common_skip`) is within 25% of the
    paper's 0.40 and the mean over all steps rises with N (disjoint intervals); partly: one of the two."""
    claim, section, notebook = ("Caching error grows with N; about 40% late in sampling for N = 3 (compared at the last "
                                "step every N skips with a new input)", "fig1a", "fig1a_caching")
    table = t.get("fig1a_caching_summary", ["interval", "comparison", "mean", "ci95_low", "ci95_high", "steps"])
    if table is None or not (table["comparison"] == "last step every N skips").any():
        return _unmeasured(claim, section, notebook, "fig1a_caching_summary")
    paper = paper_value("Figure 1a", "N=3 last step")
    common = table[table["comparison"] == "last step every N skips"].set_index("interval")
    overall = table[table["comparison"] == "mean over all steps"].sort_values("interval")
    rising = bool((overall["ci95_high"].to_numpy()[:-1] < overall["ci95_low"].to_numpy()[1:]).all())
    if 3 not in common.index:
        return _unmeasured(claim, section, notebook, "fig1a_caching_summary (N = 3)")
    row = common.loc[3]
    level = abs(row["mean"] - paper) <= CACHING_TOLERANCE * paper
    verdict: Verdict = "reproduced" if level and rising else "partly" if level or rising else "not reproduced"
    own = table[(table["comparison"] == "its last skip of a new input") & (table["interval"] == 3)]
    late = ("" if own.empty else f"; at its own last skip of a new input (step {own['steps'].iloc[0]}) "
            f"{interval(own['mean'].iloc[0], own['ci95_low'].iloc[0], own['ci95_high'].iloc[0])}")
    evidence = (f"At step {row['steps']}, the last step every N skips with a new input, N = 3 gives "
                f"{interval(row['mean'], row['ci95_low'], row['ci95_high'])}{late} "
                f"(paper: about {paper:g}). Mean over all steps "
                + ", ".join(f"N = {int(r.interval)} {interval(r.mean, r.ci95_low, r.ci95_high)}" for r in overall.itertuples())
                + f": {'rises' if rising else 'does not rise (overlapping intervals)'} with N.")
    return Claim(claim, verdict, evidence, section, notebook)


def residual_ranges(t: SavedTables) -> Claim:
    """Figure 1b. Per layer, the median over steps of the per-step range ratio (activations / temporal
    differences). Reproduced: at least the paper's 10 for every layer; partly: above 1 (narrower) for
    every layer; not reproduced otherwise."""
    claim, section, notebook = "Temporal differences are more than 10x narrower than activations", "fig1b", "fig1b_activations"
    table = t.get("fig1b_range_ratios", ["layer", "overall", "median_per_step"])
    if table is None or table.empty:
        return _unmeasured(claim, section, notebook, "fig1b_range_ratios")
    paper = paper_value("Figure 1b", "range ratio")
    medians = table["median_per_step"]
    verdict: Verdict = ("reproduced" if (medians >= paper).all() else "partly" if (medians > 1).all()
                        else "not reproduced")
    with_ci = {"median_per_step_ci95_low", "median_per_step_ci95_high"} <= set(table.columns)

    def median(r: object) -> str:  # with its bootstrap interval over trajectories where the table has it
        return (interval(r.median_per_step, r.median_per_step_ci95_low, r.median_per_step_ci95_high) if with_ci
                else f"{r.median_per_step:.3g}")

    evidence = ("Median over steps of the per-step range ratio" + (" [95% over trajectories]" if with_ci else "") + ": "
                + ", ".join(f"{median(r)} (`{r.layer}`)" for r in table.itertuples())
                + f"; {int((medians >= paper).sum())} of {len(table)} layers at {paper:g} or more. Pooled over all "
                f"steps (one range per trajectory) the ratio is {table['overall'].min():.3g} to {table['overall'].max():.3g}.")
    within = t.get("fig1b_range_ratios", ["layer", "per_trajectory_median", "per_trajectory_ci95_low",
                                           "per_trajectory_ci95_high"])
    if within is not None:
        evidence += (" Within each trajectory, mean over trajectories [95%]: " + ", ".join(
            f"{interval(r.per_trajectory_median, r.per_trajectory_ci95_low, r.per_trajectory_ci95_high)} (`{r.layer}`)"
            for r in within.itertuples()) + ".")
    return Claim(claim, verdict, evidence, section, notebook)


def _checks(table: pd.DataFrame, prefix: str) -> pd.DataFrame:
    return table[(table["reading"] == "out-of-sample") & table["check"].str.startswith(prefix)]


def theorem_43(t: SavedTables) -> Claim:
    """Theorem 4.3 on held-out trajectories as printed: s^2 d in the data's own max - min (``thm43_printed_*``).
    Reproduced: no check fails; partly: it never fails for one of the quantizers (the others do not meet its
    premise of a range mapped onto 2^b - 1 steps), or fails in at most 1 in 10,000 checks; not reproduced
    otherwise. The proof's quarter of that for rounding to nearest (``thm43_own_*``) is reported beside it. A
    table made before the printed check holds only that quarter (every sweep quantizer rounds to nearest): the
    printed ratios are a quarter of its ratios, so a largest ratio of at most 4 means no printed check fails, and
    otherwise its fails bound the printed ones from above. A table older still is judged by the bound with the
    quantizer's own scale, which holds by construction, and the evidence says so."""
    claim, section, notebook = "Theorem 4.3: the max-min quantizer's error bound", "theory", "theory_bounds"
    table = t.get("theory_bound_summary", ["reading", "check", "quantizer", "checks", "fails", "ratio_max"])
    if table is None or _checks(table, "thm43").empty:
        return _unmeasured(claim, section, notebook, "theory_bound_summary")
    printed, own = _checks(table, "thm43_printed"), _checks(table, "thm43_own")
    used = _checks(table, "thm43").drop(own.index).drop(printed.index)

    def counts(rows: pd.DataFrame) -> str:
        fails, checks = int(rows["fails"].sum()), int(rows["checks"].sum())
        return f"{fails:,} of {checks:,} checks fail; the largest error / bound is {rows['ratio_max'].max():.3g}"

    def each(rows: pd.DataFrame) -> str:
        return "; ".join(f"{q} {counts(part)}" for q, part in rows.groupby("quantizer", sort=True))

    by_construction = f"With the scale the quantizer used: {counts(used)}, by construction (a check of the simulator)."
    nearest = (f" Its proof's quarter for rounding to nearest, in the same range: {counts(own)} ({each(own)}); the "
               "quantizers do not quantize the data's own range (the per-sample one widens it to 0, the published "
               "per-tensor one is symmetric), so that form need not hold.")
    if not printed.empty:
        judged = printed
        evidence = (f"As printed, s^2 d in the data's own max - min (every layer, bit width and quantizer, held-out "
                    f"trajectories): {counts(printed)} ({each(printed)}).{nearest if not own.empty else ''} "
                    f"{by_construction}")
    elif not own.empty:
        judged = own.assign(fails=own["fails"].where(own["ratio_max"] > 4, 0))
        evidence = (f"As printed, s^2 d in the data's own max - min, read from this table's round-to-nearest quarter "
                    f"(made before the printed check): the largest error / bound is "
                    f"{own['ratio_max'].max() / 4:.3g}"
                    + (", so no check fails." if (own["ratio_max"] <= 4).all() else
                       f"; at most {int(judged['fails'].sum()):,} of {int(own['checks'].sum()):,} checks fail.")
                    + nearest + f" {by_construction}")
    else:
        judged = used
        evidence = (f"{by_construction} The theorem's form in the data's own max - min is not in this table (made "
                    "before that check existed).")
    fails, checks = int(judged["fails"].sum()), int(judged["checks"].sum())
    per_quantizer = judged.groupby("quantizer", sort=True)["fails"].sum()
    verdict: Verdict = ("reproduced" if fails == 0 else "partly" if (per_quantizer == 0).any() or fails <= 1e-4 * checks
                        else "not reproduced")
    return Claim(claim, verdict, evidence, section, notebook)


def theorem_44(t: SavedTables) -> Claim:
    """Theorem 4.4, bound (31) with compensation, out of sample. Reproduced: (31) as printed never fails
    and 2c < 1 on every layer; partly: the unrolled (31) (the paper's proof, exponent k-t+1) fails in at
    most 1 in 10,000 checks; not reproduced otherwise."""
    claim, section, notebook = "Theorem 4.4: with compensation, past errors decay as (2c)^k", "theory", "theory_bounds"
    table = t.get("theory_bound_summary", ["reading", "check", "checks", "fails", "fail_rate", "ratio_max"])
    if table is None or _checks(table, "bound31").empty:
        return _unmeasured(claim, section, notebook, "theory_bound_summary")
    printed, unrolled = _checks(table, "bound31_printed"), _checks(table, "bound31_unrolled")
    cases = t.get("theory_c_per_layer", ["two_c31_ge_1"])
    flagged = 0 if cases is None else int(cases["two_c31_ge_1"].astype(str).str.lower().eq("true").sum())
    decaying = flagged == 0
    unrolled_fails, checks = int(unrolled["fails"].sum()), int(unrolled["checks"].sum())
    verdict: Verdict = ("reproduced" if printed["fails"].sum() == 0 and decaying
                        else "partly" if unrolled_fails <= 1e-4 * checks else "not reproduced")
    evidence = (f"(31) as printed fails in up to {printed['fail_rate'].max():.2%} of the checks of a quantizer and bit "
                f"width, all layers pooled (error up to "
                f"{printed['ratio_max'].max():.3g}x the bound); unrolled from the proof it fails in {unrolled_fails:,} of "
                f"{checks:,}.")
    if cases is not None:
        evidence += f" 2c >= 1 (no decay) in {flagged} of {len(cases)} layer, bit-width and quantizer cases."
    return Claim(claim, verdict, evidence, section, notebook)


TABLE4 = ("without error compensation", "with error compensation")


def error_compensation(t: SavedTables) -> Claim:
    """Figure 3 / Table 4, last step. Reproduced: with compensation the error is below the error without
    it (disjoint intervals) at every bit width and at most 0.1 (our reading of "stays small") at the
    lowest; partly: below at some bit widths; not reproduced: at none."""
    claim, section, notebook = "Error compensation stops the error from accumulating, even at 3 bits", "fig3", "fig3_compensation"
    cols = [f"{name}{suffix}" for name in TABLE4 for suffix in ("", ": ci95_low", ": ci95_high")]
    table = t.get("table4_last_step_error", ["bits", *cols])
    if table is None or table.empty:
        return _unmeasured(claim, section, notebook, "table4_last_step_error")
    without, with_ec = TABLE4
    lower = table[f"{with_ec}: ci95_high"] < table[f"{without}: ci95_low"]
    small = table.loc[table[with_ec] <= SMALL_FEATURE_ERROR, "bits"]
    lowest = int(table["bits"].min())
    verdict: Verdict = ("reproduced" if lower.all() and lowest in set(small) else "partly" if lower.any()
                        else "not reproduced")
    per_bits = "; ".join(f"A{int(r['bits'])} {interval(r[with_ec], r[f'{with_ec}: ci95_low'], r[f'{with_ec}: ci95_high'])} "
                         f"with, {interval(r[without], r[f'{without}: ci95_low'], r[f'{without}: ci95_high'])} without"
                         for _, r in table.sort_values("bits").iterrows())
    evidence = (f"Relative L2 of middle-block features at the last step: {per_bits}. Lower with compensation at "
                f"{int(lower.sum())} of {len(table)} bit widths; at most {SMALL_FEATURE_ERROR:g} at "
                + (", ".join(f"A{int(b)}" for b in sorted(small, reverse=True)) or "no bit width") + ".")
    return Claim(claim, verdict, evidence, section, notebook)


TABLE1 = ["preset", "numerics", "method", "w_bits", "a_bits", "fid_classifier", "fid_ci95_low", "fid_ci95_high",
          "vs_fp", "modiff_vs_direct", "gbops_per_step"]


def _interval_of(verdict: object) -> Optional[tuple[float, float]]:
    """The [low, high] of a verdict string such as "no difference: +0.1 [-0.2, +0.4]"."""
    found = re.search(r"\[([-+0-9.eE]+), ([-+0-9.eE]+)\]", str(verdict))
    return None if found is None else (float(found.group(1)), float(found.group(2)))


def near_reference(verdict: object, reference_fid: float) -> bool:
    """Better than the reference row (fp, or W8A32), or the whole interval within EQUIVALENCE_MARGIN of its FID:
    an equivalence reading, so a difference that is significant ("worse") but inside the margin is near, and
    "no difference" with an interval reaching past the margin is not."""
    text, bounds = str(verdict), _interval_of(verdict)
    return text.startswith("better") or (bounds is not None
                                         and max(abs(b) for b in bounds) <= EQUIVALENCE_MARGIN * reference_fid)


@dataclass(frozen=True)
class _ModiffRows:
    verdict: Verdict
    near: int  # rows near fp (`near_reference`)
    inconclusive: int  # rows with no difference from fp but an interval too wide to call them near
    better: int  # rows better than their direct counterpart

    def counts(self, rows: int, anchor: str = "fp") -> str:
        return (f"{self.near} of {rows} within {EQUIVALENCE_MARGIN:.0%} of {anchor}'s FID (paired 95% interval) or better"
                + (f", {self.inconclusive} inconclusive (no difference, but an interval wider than that)"
                   if self.inconclusive else "") + f"; MoDiff beats direct quantization in {self.better} of {rows}")


def _modiff_rows_verdict(rows: pd.DataFrame, anchor_fid: pd.Series, against: str = "vs_fp") -> _ModiffRows:
    """MoDiff rows with FID verdicts ``against`` an anchor (vs_fp, or vs_weights_only) and modiff_vs_direct
    (``anchor_fid``: the anchor's FID for each row): reproduced if every row is near its anchor, partly if some
    are, inconclusive if none is shown near or worse (intervals too wide), not reproduced otherwise. Beating
    direct quantization is another property: counted in the evidence, never a verdict of nearness."""
    near = pd.Series([near_reference(v, f) for v, f in zip(rows[against], anchor_fid)], index=rows.index)
    wide = rows[against].astype(str).str.startswith("no difference") & ~near
    better = rows["modiff_vs_direct"].astype(str).str.startswith("better")
    verdict: Verdict = ("reproduced" if near.all() else "partly" if near.any()
                        else "inconclusive" if wide.all() else "not reproduced")
    return _ModiffRows(verdict, int(near.sum()), int(wide.sum()), int(better.sum()))


def weights_only_preset(preset: str, a_bits: int) -> str:
    """The weights-only row of a MoDiff row: w8a4-modiff -> w8a32, published-w8a3-modiff -> published-w8a32, and
    published-lsun-w8a4-modiff -> w8a32 (those rows quantize the weights of wXaY, with no split)."""
    return preset.replace(f"a{a_bits}-modiff", "a32").replace("published-lsun-", "")


def low_bit_activations(t: SavedTables) -> Claim:
    """Table 1: the dynamic + MoDiff rows at W8A4 and W8A3 (every numerics), by `_modiff_rows_verdict` against
    the paper's anchor, full-precision activations at the same 8-bit weights (its W8A32, 4.24, beside W8A3
    MoDiff's 4.14): near is a paired FID difference to that row within EQUIVALENCE_MARGIN of its FID (or
    better). The difference to full precision (W32A32) is given beside it."""
    claim, section, notebook = "3-4 bit activations near full-precision activations (W8A32) with MoDiff", "table1", "table1_bitwidth"
    table = t.get("table1_bitwidth", TABLE1 + ["vs_weights_only"])
    rows = None if table is None else table[(table["method"] == "dynamic + MoDiff") & (table["w_bits"] == 8)
                                            & table["a_bits"].isin([3, 4])]
    if rows is None or rows.empty or not (table["preset"] == "fp").any():
        return _unmeasured(claim, section, notebook, "table1_bitwidth")
    by_preset = table.set_index("preset")
    anchors = [weights_only_preset(r.preset, int(r.a_bits)) for r in rows.itertuples()]
    if any(a not in by_preset.index for a in anchors):
        return _unmeasured(claim, section, notebook, "table1_bitwidth")
    fp = by_preset.loc["fp"]
    judged = _modiff_rows_verdict(rows, pd.Series([by_preset.loc[a, "fid_classifier"] for a in anchors], index=rows.index),
                                  against="vs_weights_only")

    def fid(row: pd.Series) -> str:
        return interval(row.fid_classifier, row.fid_ci95_low, row.fid_ci95_high)

    evidence = (f"FID (classifier features), full precision {fid(fp)}; the paper's anchor is full-precision "
                f"activations at the same 8-bit weights (W8A32): "
                + "; ".join(f"W8A{int(r.a_bits)} {r.numerics} {fid(r)} (against {a} {fid(by_preset.loc[a])}: "
                            f"{r.vs_weights_only}; against fp: {r.vs_fp})" for r, a in zip(rows.itertuples(), anchors))
                + f". {judged.counts(len(rows), 'W8A32')}.")
    return Claim(claim, judged.verdict, evidence, section, notebook)


def gbops_saving(t: SavedTables) -> Claim:
    """Table 1 GBops per step, W8A32 against W8A3. Reproduced: a saving of at least 90% of the paper's
    ratio (1636 / 153); partly: any saving; not reproduced: none."""
    claim, section, notebook = "W8A3 needs >10x fewer GBops than W8A32", "table1", "table1_bitwidth"
    table = t.get("table1_bitwidth", ["w_bits", "a_bits", "gbops_per_step", "steps"])
    if table is None:
        return _unmeasured(claim, section, notebook, "table1_bitwidth")
    full, low = (table.loc[(table["w_bits"] == 8) & (table["a_bits"] == a), "gbops_per_step"] for a in (32, 3))
    if full.empty or low.empty:
        return _unmeasured(claim, section, notebook, "table1_bitwidth (W8A32 and W8A3 rows)")
    ours = full.iloc[0] / low.iloc[0]
    paper_full, paper_low = paper_value("Table 1", "W8A32 GBops"), paper_value("Table 1", "W8A3 GBops")
    paper = paper_full / paper_low
    verdict: Verdict = "reproduced" if ours >= 0.9 * paper else "partly" if ours > 1 else "not reproduced"
    steps = int(table["steps"].max())
    trajectory = steps * full.iloc[0] / (full.iloc[0] + (steps - 1) * low.iloc[0])
    return Claim(claim, verdict, f"GBops per image per step: W8A32 {full.iloc[0]:.4g}, W8A3 {low.iloc[0]:.4g}, "
                 f"{ours:.3g}x fewer (paper: {paper_full:g} and {paper_low:g}, {paper:.3g}x): per step the ratio is "
                 f"32 / 3 by the count's definition (MACs x weight bits x activation bits). Over a trajectory of "
                 f"{steps} steps, whose first MoDiff step has full-precision activations (W8A32's cost), "
                 f"{trajectory:.3g}x fewer.", section, notebook)


SAMPLERS_FID = ["sampler", "steps", "preset", "fid_classifier", "fid_ci95_low", "fid_ci95_high", "vs_fp",
                "modiff_vs_direct"]


CLAIMED_SAMPLERS = {"ddpm": "DDPM", "dpm-solver": "DPM-Solver", "ddim": "DDIM"}  # the samplers the claim names


def samplers_hold(t: SavedTables) -> Claim:
    """Tables 5 and 15-18 (samplers; the paper's brief states no result for them, so the claim is this toolkit's
    test): the MoDiff row of every sampler and step count against that sampler's fp run (FID, paired bootstrap,
    95%), by `_modiff_rows_verdict` as `low_bit_activations`. A sampler the claim names that
    the table lacks is named as not measured, and the verdict is at most partly."""
    claim = "MoDiff near full precision with DDPM, DPM-Solver and 20-step DDIM (our test of the paper's sampler tables)"
    section, notebook = "samplers", "samplers"
    table = t.get("samplers_fid", SAMPLERS_FID)
    rows = None if table is None else table[table["modiff_vs_direct"].notna() & (table["modiff_vs_direct"] != "")]
    if rows is None or rows.empty:
        return _unmeasured(claim, section, notebook, "samplers_fid")
    fp = table[table["preset"] == "fp"].set_index(["sampler", "steps"])["fid_classifier"]
    judged = _modiff_rows_verdict(rows, pd.Series([fp.get((r.sampler, r.steps), float("nan")) for r in rows.itertuples()],
                                                  index=rows.index))
    evidence = (f"`{rows['preset'].iloc[0]}` FID against the same sampler's fp: "
                + "; ".join(f"{r.sampler} {int(r.steps)} steps {interval(r.fid_classifier, r.fid_ci95_low, r.fid_ci95_high)} "
                            f"({r.vs_fp})" for r in rows.itertuples())
                + f". {judged.counts(len(rows))}.")
    absent = [name for key, name in CLAIMED_SAMPLERS.items() if key not in set(rows["sampler"])]
    verdict = judged.verdict
    if absent:
        evidence += f" Not measured: {', '.join(absent)}."
        verdict = "partly" if verdict == "reproduced" else verdict
    return Claim(claim, verdict, evidence, section, notebook)


# The paper's "4-5 warm-up steps suffice" read as: steps beyond 5 gain less than this share of the error at 5.
SUFFICE_SHARE = 0.10
PAPER_WARMUP_STEPS = 5


def warmup_helps(t: SavedTables) -> Claim:
    """Tables 5 and 15-18 (warm-up): relative L2 to fp with k full-precision warm-up steps, paired (95%) against the
    fewest steps measured and, for k beyond the paper's 5, against 5 (`analysis.experiments.warmup_paired`; the
    notebook's ``warmup_enough``). Where k beyond it is measured: reproduced when the most steps up to it are lower
    than the fewest and no later k can gain `SUFFICE_SHARE` of the error there (the far end of its interval stays
    under it); partly when one of the two holds; not reproduced otherwise. Tables without it (made before it was
    measured): reproduced when every k is lower and none lies above a smaller one (their intervals in
    `warmup_steps` apart); partly when the largest k is lower than the fewest; not reproduced otherwise."""
    claim, section, notebook = ("4-5 full-precision warm-up steps suffice at 4 bits (tested: they lower the error, "
                                f"and steps beyond {PAPER_WARMUP_STEPS} gain under {SUFFICE_SHARE:.0%} of it)",
                                "samplers", "samplers")
    paired = t.get("warmup_steps_paired", ["warmup_steps", "baseline", "mean_difference", "ci95_low", "ci95_high"])
    if paired is None or paired.empty:
        return _unmeasured(claim, section, notebook, "warmup_steps_paired")
    first = paired["baseline"].min()
    table = paired[paired["baseline"] == first].sort_values("warmup_steps")
    beyond = paired[paired["baseline"] != first].sort_values("warmup_steps")  # against the notebook's warmup_enough
    enough = int(beyond["baseline"].iloc[0]) if len(beyond) else PAPER_WARMUP_STEPS
    lower = table["ci95_high"] < 0
    summary = t.get("warmup_steps", ["warmup_steps", "mean", "ci95_low", "ci95_high"])
    reversals = _warmup_reversals(summary)
    evidence = ("Relative L2 to fp, paired against " + f"{int(first)} step: "
                + "; ".join(f"{int(r.warmup_steps)} steps {r.mean_difference:+.3g} [{r.ci95_low:+.3g}, {r.ci95_high:+.3g}]"
                            for r in table.itertuples())
                + f" ({int(lower.sum())} of {len(table)} lower)."
                + (" Not monotonic: " + "; ".join(reversals) + "." if reversals else ""))
    at_enough = summary[summary["warmup_steps"] == enough]["mean"] if summary is not None else []
    if beyond.empty or len(at_enough) == 0:
        verdict: Verdict = ("reproduced" if lower.all() and not reversals else "partly" if lower.iloc[-1]
                            else "not reproduced")
        return Claim(claim, verdict, evidence + f" Steps beyond {int(table['warmup_steps'].max())} not measured.",
                     section, notebook)
    up_to_enough = lower[table["warmup_steps"] <= enough]
    helps = bool(len(up_to_enough) and up_to_enough.iloc[-1])
    error = float(at_enough.iloc[0])
    shares = (-beyond["ci95_low"]).clip(lower=0) / error  # the largest gain each interval allows
    suffices = bool((shares < SUFFICE_SHARE).all())
    verdict = "reproduced" if helps and suffices else "partly" if helps or suffices else "not reproduced"
    evidence += (f" Beyond {enough} steps, paired against {enough} (error {error:.3g}): "
                 + "; ".join(f"{int(r.warmup_steps)} steps {r.mean_difference:+.3g} [{r.ci95_low:+.3g}, "
                             f"{r.ci95_high:+.3g}], " + ("higher: no gain" if r.ci95_low > 0 else
                                                         f"a gain of at most {share:.1%}")
                             for r, share in zip(beyond.itertuples(), shares))
                 + f" ({'under' if suffices else 'not all under'} {SUFFICE_SHARE:.0%}).")
    return Claim(claim, verdict, evidence, section, notebook)


def _warmup_reversals(summary: Optional[pd.DataFrame]) -> list[str]:
    """Pairs of warm-up settings where more steps sit higher than fewer, their 95% intervals apart."""
    if summary is None:
        return []
    rows = list(summary.sort_values("warmup_steps").itertuples())
    return [f"{int(b.warmup_steps)} steps {interval(b.mean, b.ci95_low, b.ci95_high)} above {int(a.warmup_steps)} "
            f"steps {interval(a.mean, a.ci95_low, a.ci95_high)}"
            for i, a in enumerate(rows) for b in rows[i + 1:] if b.ci95_low > a.ci95_high]


def mebibytes(megabytes: Any) -> Any:
    """MB (10^6 bytes) as MiB (2^20 bytes): a table's MB read in the other unit a paper may mean by "MB"."""
    return megabytes * 1e6 / 2**20


def extra_memory(t: SavedTables) -> Claim:
    """Tables 6 and 19-21, batch 1, a UNet of the CIFAR-10 checkpoint's shape. Reproduced: our count
    (the first accounting) is at most the paper's 4 MB; partly: another accounting fits; not reproduced
    otherwise. MB is 10^6 bytes, as the tables count it; the smallest accounting is also given in MiB, since the
    paper does not say which it means."""
    claim, section, notebook = "MoDiff needs at most 4 MB extra memory at batch 1 (CIFAR-10)", "bops", "bops_memory"
    table = t.get("modiff_state_accounting", ["model", "accounting", "mb_per_image"])
    cifar = None if table is None else table[table["model"].astype(str).str.startswith("cifar10")]
    if cifar is None or cifar.empty:
        return _unmeasured(claim, section, notebook, "modiff_state_accounting")
    paper = paper_value("Table 6", "batch 1 memory")
    fits = cifar[cifar["mb_per_image"] <= paper]
    verdict: Verdict = ("reproduced" if cifar["mb_per_image"].iloc[0] <= paper else "partly" if len(fits)
                        else "not reproduced")
    return Claim(claim, verdict, f"CIFAR-10-size UNet: {cifar['mb_per_image'].iloc[0]:.3g} MB per image "
                 f"({cifar['accounting'].iloc[0]}); the smallest accounting, {cifar['accounting'].iloc[-1]}, "
                 f"{cifar['mb_per_image'].iloc[-1]:.3g} MB = {mebibytes(cifar['mb_per_image'].iloc[-1]):.3g} MiB "
                 f"(paper: at most {paper:g} MB, the unit not stated).", section, notebook)


CLAIMS: tuple[Callable[[SavedTables], Claim], ...] = (
    caching_error, residual_ranges, theorem_43, theorem_44, error_compensation, low_bit_activations, gbops_saving,
    samplers_hold, warmup_helps, extra_memory,
)


def claims(out_dir: str | Path) -> list[Claim]:
    """Every claim of `CLAIMS`, in the paper's order, judged on the tables of ``out_dir``."""
    tables = SavedTables(out_dir)
    return [judge(tables) for judge in CLAIMS]
