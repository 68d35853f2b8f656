"""Theorems 4.3 and 4.4 checked out of sample, from the per-trajectory rows of `analysis.theory_sweep`.

c is the constant of Theorem 4.4's assumption ||r - Q(r)||^2 <= c ||r||^2, estimated per (layer,
quantizer, bits) as the largest c_i = ||r_i - Q(r_i)||^2 / ||r_i||^2 over the quantized steps i >= 1 of
a set of trajectories (``c30`` from the residuals of standard modulation, ``c31`` from MoDiff's; steps
with r_i = 0 are skipped). Two readings of the bound checks on the HELD-OUT trajectories:

- ``out-of-sample``: c from the CALIBRATION trajectories (other seeds). The evidence: nothing forces a
  held-out residual to round as well as the calibration ones did.
- ``in-sample``: c from the held-out trajectories themselves. The unrolled forms then hold by
  construction (the proof's inequalities applied to that very data), so a pass is no evidence.

For every held-out trajectory and step i >= 1 the four Theorem 4.4 bounds of `analysis.bounds`
(``bound30_*`` against ``err_sq_noec``, ``bound31_*`` against ``err_sq_ec``) are evaluated with that
trajectory's d_j and the layer's ||A||; ratio = measured error / bound (> 1: the bound fails; 0/0 = 0).
Theorem 4.3 needs no c: ``thm43_noec``, ``thm43_ec`` check rounding error / (s^2 d / 4) with the scale s the
quantizer used (holds by construction: a check of the simulator); ``thm43_printed_noec``, ``thm43_printed_ec`` the
theorem as printed, s^2 d with s = (max - min) / (2^b - 1) of the data's own range; ``thm43_own_noec``,
``thm43_own_ec`` its proof's quarter of that for rounding to nearest, which the quantizers here need not meet (they
do not quantize the data's own range).

Where 2c >= 1 the assumption of Theorem 4.4 (c < 1/2) fails: (31) unrolled weighs the difference j
steps back by (2c)^(j+1), which no longer decays with j (it grows for 2c > 1), so the bound is no longer
dominated by recent differences. Where c >= 1 the quantizer does no better than Q = 0 on some residual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.bounds import BOUNDS, theorem44_weights
from analysis.intervals import mean_interval

__all__ = ["CHECKS", "READINGS", "BoundChecks", "bound_checks", "decay_failures", "estimate_c", "findings",
           "tightness_summary"]

KEYS = ["layer", "quantizer", "bits"]
READINGS: tuple[str, ...] = ("out-of-sample", "in-sample")
CHECKS: tuple[str, ...] = (*BOUNDS, "thm43_noec", "thm43_ec", "thm43_printed_noec", "thm43_printed_ec",
                            "thm43_own_noec", "thm43_own_ec")
_CASES_PER_PASS = 16  # unrolled bounds: (16, steps, trajectories) float64 blocks stay in the CPU cache
_RTOL = 1e-6  # float slack (the simulation may run in float32): a bound holds where error <= bound (1 + 1e-6)


def _c_of(rows: pd.DataFrame, method: str) -> pd.Series:
    residual, rounding = rows[f"residual_sq_{method}"], rows[f"rounding_sq_{method}"]
    return (rounding / residual).where(residual > 0)


def estimate_c(stats: pd.DataFrame, role: str = "calibration") -> pd.DataFrame:
    """Per (layer, quantizer, bits): ``c30`` and ``c31`` (max c_i over the ``role`` rows), the
    trajectories and steps they come from, the median c_i, and the flags 2c >= 1 and c >= 1."""
    rows = stats[stats["role"] == role]
    if rows.empty:
        raise ValueError(f"no rows with role {role!r}; roles present: {sorted(stats['role'].unique())}")
    frame = rows[KEYS].copy()
    frame["c30_i"], frame["c31_i"] = _c_of(rows, "noec").to_numpy(), _c_of(rows, "ec").to_numpy()
    grouped = frame.groupby(KEYS, observed=True, sort=False)
    out = grouped.agg(c30=("c30_i", "max"), c31=("c31_i", "max"), c31_median=("c31_i", "median"))
    out["trajectories"] = rows.groupby(KEYS, observed=True, sort=False)["seed"].nunique()
    out["steps"] = rows.groupby(KEYS, observed=True, sort=False)["step"].nunique()
    out = out.reset_index()
    for eq in ("30", "31"):
        out[f"two_c{eq}_ge_1"] = 2 * out[f"c{eq}"] >= 1
        out[f"c{eq}_ge_1"] = out[f"c{eq}"] >= 1
    out.insert(0, "role", role)
    return out


def _ratio(actual: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """actual / bound, with the bound widened by the float slack; 0/0 = 0, x/0 = inf."""
    bound = bound * (1 + _RTOL)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = actual / bound
    return np.where((actual == 0) & (bound == 0), 0.0, ratio)


class _HeldOut:
    """The held-out rows as arrays (G cases (layer, quantizer, bits), steps, S trajectories), steps and
    seeds in sorted order; ``keys`` the cases in order of first appearance (as groupby(sort=False))."""

    def __init__(self, held: pd.DataFrame):
        grouped = held.groupby(KEYS, observed=True, sort=False)
        case = grouped.ngroup().to_numpy()
        first = np.unique(case, return_index=True)[1]
        self.keys = held[KEYS].iloc[first].reset_index(drop=True)
        self.steps, step = np.unique(held["step"].to_numpy(), return_inverse=True)
        self.seeds, seed = np.unique(held["seed"].to_numpy(), return_inverse=True)
        self.shape = (len(first), len(self.steps), len(self.seeds))
        self.flat = np.ravel_multi_index((case, step, seed), self.shape)
        if len(self.flat) != np.prod(self.shape) or np.bincount(self.flat, minlength=len(self.flat)).max() > 1:
            raise ValueError("the held-out rows must hold one row per (layer, quantizer, bits, step, seed), with the "
                             "same steps and seeds for every (layer, quantizer, bits), as sweep_trajectories gives")
        self.frame = held

    def __getitem__(self, column: str) -> np.ndarray:
        out = np.empty(self.shape)
        out.reshape(-1)[self.flat] = self.frame[column].to_numpy(np.float64)
        return out

    def t(self) -> np.ndarray:
        """Timestep t per (case, step), (G, steps)."""
        out = np.empty(self.shape[:2], dtype=np.int64)
        out.reshape(-1)[self.flat // self.shape[2]] = self.frame["t"].to_numpy(np.int64)
        return out


def _unrolled_sums(weights: np.ndarray, d: np.ndarray, out: np.ndarray) -> None:
    """out[g, i] += sum over j = 1..i of W[g, i, j] d[g, j], added in order of j (one pass per j over the
    rows i >= j). Where every weight is finite and every d >= 0, the mask d_j > 0 changes nothing
    (W * 0 = 0) and is skipped."""
    masked = not np.isfinite(weights).all() or (d < 0).any()
    buffer = np.empty_like(out)
    for j in range(1, d.shape[1]):
        term = np.multiply(weights[:, j:, j, None], d[:, None, j], out=buffer[:, j:])
        if masked:
            term[np.broadcast_to(~(d[:, None, j] > 0), term.shape)] = 0.0
        out[:, j:] += term


def _bounds(d: np.ndarray, form: str, c: np.ndarray, op_sq: np.ndarray) -> np.ndarray:
    """Theorem 4.4 ``form`` at every sampling index i >= 1, (G, n - 1, S), for d (G, n, S) (d_0 = 0) and
    c, ||A||^2 per case (G,). The weights come from `theorem44_weights` and every bound is the sum over
    j = 1..i of W[i, j] d_j added in order of j, the order of a sum over the j axis of (n, n, S) terms."""
    n = d.shape[1]
    weights = np.stack([theorem44_weights(n, form, value) for value in c])  # (G, n, n)
    with np.errstate(invalid="ignore", over="ignore"):
        if form.endswith("printed"):  # W[i, j] does not depend on i (j <= i): running sums over j
            total = np.cumsum(np.where(d > 0, weights[:, -1, :, None] * d, 0.0), axis=1)
        else:
            total = np.zeros_like(d)
            for chunk in range(0, len(d), _CASES_PER_PASS):
                part = slice(chunk, chunk + _CASES_PER_PASS)
                _unrolled_sums(weights[part], d[part], total[part])
        return total[:, 1:] * op_sq[:, None, None]


def _ratios(cube: _HeldOut, c: pd.DataFrame, op_norms: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Ratios (G, steps, S) of every Theorem 4.4 form with the c of ``c`` (indexed by KEYS)."""
    cases = pd.MultiIndex.from_frame(cube.keys)
    est = c.reindex(cases)
    if est["c30"].isna().any():
        missing = cube.keys[est["c30"].isna().to_numpy()].iloc[0].to_dict()
        raise ValueError(f"no calibration rows for {missing}: sweep both roles")
    d = np.nan_to_num(cube["diff_sq"])
    d = np.concatenate([np.zeros_like(d[:, :1]), d], axis=1)  # d_0 = 0 (the warm-up step has no difference)
    op_sq = np.array([float(op_norms[layer]) ** 2 for layer in cube.keys["layer"]])
    out = {}
    for form in BOUNDS:
        eq = form[5:7]
        out[form] = _ratio(cube[f"err_sq_{'noec' if eq == '30' else 'ec'}"],
                           _bounds(d, form, est[f"c{eq}"].to_numpy(np.float64), op_sq))
    return out


@dataclass(frozen=True)
class BoundChecks:
    """The held-out checks two ways: ``per_step``, one row per (layer, quantizer, bits, reading, check, step)
    with ``trajectories`` checked, ``seed_independent`` (the case's inputs are the same on every trajectory),
    ``fails`` (ratio > 1), ``ratio_max`` (worst trajectory) and ``ratio_median``; ``per_trajectory``, one row
    per (reading, check, quantizer, bits, seed) with the
    ``checks`` (layers x steps) and ``fails`` of that held-out trajectory, for intervals over trajectories
    (steps of one trajectory are not independent). Theorem 4.3 rows carry reading ``out-of-sample``."""

    per_step: pd.DataFrame
    per_trajectory: pd.DataFrame


def bound_checks(stats: pd.DataFrame, op_norms: Mapping[str, float]) -> BoundChecks:
    """Every bound on every held-out trajectory and step, with c from the calibration trajectories
    (out-of-sample) and from the held-out ones (in-sample); see `BoundChecks`."""
    missing = sorted(set(stats["layer"].unique()) - set(op_norms))
    if missing:
        raise ValueError(f"op_norms lacks layers {missing[:5]}; compute them with theory_sweep.operator_norms")
    c = {reading: estimate_c(stats, role).set_index(KEYS)
         for reading, role in zip(READINGS, ("calibration", "held-out"))}
    cube = _HeldOut(stats[stats["role"] == "held-out"])
    thm43 = {f"thm43_{form}{m}": _ratio(cube[f"rounding_sq_{m}"], cube[f"thm43_{form}bound_{m}"])
             for form in ("", "printed_", "own_") for m in ("noec", "ec")}
    parts = []  # (reading, check, ratios (G, steps, S)) in output order
    for reading in READINGS:
        ratios = {**_ratios(cube, c[reading], op_norms), **thm43}
        # Theorem 4.3 has no c: reported once, under out-of-sample
        parts += [(reading, check, ratios[check]) for check in CHECKS
                  if not (reading == "in-sample" and check.startswith("thm43"))]
    return BoundChecks(_summary_rows(cube, parts), _trajectory_rows(cube, parts))


def _trajectory_rows(cube: _HeldOut, parts: list[tuple[str, str, np.ndarray]]) -> pd.DataFrame:
    """Per (reading, check, quantizer, bits) and held-out seed: checks and fails summed over layers and steps."""
    groups = cube.keys.groupby(["quantizer", "bits"], observed=True, sort=False).indices
    steps, seeds = cube.shape[1], cube.seeds
    frames = []
    for reading, check, ratios in parts:
        fails = (ratios > 1).sum(axis=1)  # (G, S)
        for (quantizer, bits), cases in groups.items():
            frames.append(pd.DataFrame({"reading": reading, "check": check, "quantizer": quantizer,
                                        "bits": int(bits), "seed": seeds, "checks": len(cases) * steps,
                                        "fails": fails[cases].sum(axis=0)}))
    return pd.concat(frames, ignore_index=True)


def _seed_independent(cube: _HeldOut) -> np.ndarray:
    """(G,) bool: the case's residuals and their rounding are the same on every held-out trajectory at every
    step, i.e. its inputs do not depend on the seed (the time embedding's layers, fed by t alone)."""
    same = [np.ptp(cube[column], axis=2).max(axis=1) == 0 for column in ("residual_sq_noec", "rounding_sq_noec")]
    return same[0] & same[1] & (cube.shape[2] > 1)


def _summary_rows(cube: _HeldOut, parts: list[tuple[str, str, np.ndarray]]) -> pd.DataFrame:
    """Per case, then (reading, check), then step: trajectories, fails, max and median ratio."""
    (g, steps, s), p = cube.shape, len(parts)
    out = pd.DataFrame({key: np.repeat(cube.keys[key].to_numpy(), p * steps) for key in KEYS})
    out["bits"] = out["bits"].astype(np.int64)
    out["reading"] = np.tile(np.repeat([reading for reading, _, _ in parts], steps), g)
    out["check"] = np.tile(np.repeat([check for _, check, _ in parts], steps), g)
    out["step"] = np.tile(np.arange(1, steps + 1), g * p)
    out["t"] = np.repeat(cube.t()[:, None], p, axis=1).reshape(-1)
    out["trajectories"] = s
    out["seed_independent"] = np.repeat(_seed_independent(cube), p * steps)
    for column, reduce in (("fails", lambda r: (r > 1).sum(axis=-1)), ("ratio_max", lambda r: r.max(axis=-1)),
                           ("ratio_median", lambda r: np.median(r, axis=-1))):
        out[column] = np.stack([reduce(r) for _, _, r in parts], axis=1).reshape(-1)  # (G, P, steps)
    return out


def tightness_summary(checks: BoundChecks, quantiles: Sequence[float] = (0.5, 0.9, 0.99),
                      resamples: int = 10_000) -> pd.DataFrame:
    """Per (reading, check, quantizer, bits): checks (trajectory-steps over all layers), fails, the fail rate
    with its 95% interval over held-out trajectories (bootstrap of the per-trajectory fail fraction: a
    trajectory's steps are not independent; nor, for the per-tensor quantizer, are the trajectories of one
    batch, so its intervals are too narrow) and how many trajectories fail anywhere; quantiles over (layer,
    step) of the worst-trajectory ratio ``ratio_max``, its maximum and where it is (layer and step)."""
    per_seed = checks.per_trajectory.groupby(["reading", "check", "quantizer", "bits"], observed=True, sort=False)
    rows = []
    for (reading, check, quantizer, bits), part in checks.per_step.groupby(["reading", "check", "quantizer", "bits"],
                                                                           observed=True, sort=False):
        worst = part.loc[part["ratio_max"].idxmax()]
        finite = part["ratio_max"].replace(np.inf, np.nan)
        trajectories = per_seed.get_group((reading, check, quantizer, bits))
        rate = mean_interval(trajectories["fails"] / trajectories["checks"], resamples=resamples)
        row = {"reading": reading, "check": check, "quantizer": quantizer, "bits": int(bits),
               "checks": int(part["trajectories"].sum()), "fails": int(part["fails"].sum())}
        row.update(fail_rate=row["fails"] / row["checks"], fail_rate_ci95_low=rate.low, fail_rate_ci95_high=rate.high,
                   trajectories=len(trajectories), trajectories_failing=int((trajectories["fails"] > 0).sum()))
        row.update({f"ratio_q{round(q * 100)}": float(finite.quantile(q)) for q in quantiles})
        row.update(ratio_max=float(worst["ratio_max"]), worst_layer=worst["layer"], worst_step=int(worst["step"]))
        rows.append(row)
    order = {name: i for i, name in enumerate(CHECKS)}
    out = pd.DataFrame(rows)
    return out.sort_values(["reading", "check", "quantizer", "bits"], key=lambda s: s.map(order) if s.name == "check"
                           else (s.map({r: i for i, r in enumerate(READINGS)}) if s.name == "reading" else s),
                           ascending=[True, True, True, False]).reset_index(drop=True)


def decay_failures(c_table: pd.DataFrame) -> pd.DataFrame:
    """The (layer, quantizer, bits) where 2c >= 1 for c30 or c31: Theorem 4.4's assumption fails there,
    and (31) unrolled, a sum of (2c)^(j+1) d over past differences j, no longer decays (``growth`` = 2 c31,
    the factor each step further back multiplies its weight by). ``trajectories`` and ``steps`` say how many
    calibration trajectories and steps each c is the maximum over."""
    flagged = c_table[c_table["two_c30_ge_1"] | c_table["two_c31_ge_1"]]
    columns = ["layer", "quantizer", "bits", "c30", "c31", "c30_ge_1", "c31_ge_1", "trajectories", "steps"]
    out = flagged[columns].copy()
    out["growth"] = 2 * out["c31"]
    return out.sort_values(["quantizer", "bits", "c31"], ascending=[True, True, False]).reset_index(drop=True)


def _percent(share: float) -> str:
    """A share as a percentage with two significant digits and no exponent (0.000017%, 33%, 100%)."""
    return np.format_float_positional(100 * share, precision=2, unique=False, fractional=False, trim="-") + "%"


def _share(fails: int, checks: int) -> str:
    return f"{fails:,} of {checks:,} ({_percent(fails / checks)})" if checks else "none checked"


def _trajectory_spread(per_trajectory: pd.DataFrame, reading: str, check: str) -> str:
    """In how many held-out trajectories the check fails, and the fail rate's 95% interval over them."""
    part = per_trajectory[(per_trajectory["reading"] == reading) & (per_trajectory["check"] == check)]
    per_seed = part.groupby("seed")[["checks", "fails"]].sum()
    rate = mean_interval(per_seed["fails"] / per_seed["checks"])
    return (f"in {int((per_seed['fails'] > 0).sum())} of {len(per_seed)} trajectories; 95% interval of the rate over "
            f"trajectories [{_percent(rate.low)}, {_percent(rate.high)}]")


def _check_line(summary: pd.DataFrame, per_trajectory: pd.DataFrame, reading: str, check: str) -> str:
    part = summary[(summary["reading"] == reading) & (summary["check"] == check)]
    fails, checks = int(part["fails"].sum()), int(part["checks"].sum())
    line = f"`{check}` fails at {_share(fails, checks)} held-out trajectory-steps"
    if fails:
        worst = part.loc[part["ratio_max"].idxmax()]
        failing = part[part["fails"] > 0]
        where = ", ".join(f"{r.quantizer} A{r.bits}: {r.fails:,}" for r in failing.itertuples())
        line += (f" ({where}; {_trajectory_spread(per_trajectory, reading, check)}); worst: error "
                 f"{worst['ratio_max']:.3g}x the bound at `{worst['worst_layer']}`, {worst['quantizer']} "
                 f"A{worst['bits']}, step {worst['worst_step']}")
    else:
        line += f" (largest error / bound {part['ratio_max'].max():.3g})"
    median = part["ratio_q50"].median()
    return line + (f"; median over quantizers and bit widths of the median over layers and steps of the worst "
                   f"trajectory's error/bound {median:.2g}.")


def findings(summary: pd.DataFrame, checks: BoundChecks, c_calibration: pd.DataFrame, c_heldout: pd.DataFrame) -> str:
    """Markdown paragraphs written from the numbers: what holds by construction (in sample), what the
    held-out trajectories show (out of sample, with how many trajectories fail), Theorem 4.3, and where
    2c >= 1. ``summary``: `tightness_summary` of ``checks``."""
    n_cal, n_held = int(c_calibration["trajectories"].max()), int(c_heldout["trajectories"].max())
    units = len(c_calibration)

    def line(reading: str, check: str) -> str:
        return _check_line(summary, checks.per_trajectory, reading, check)

    lines = [f"**Setup.** {c_calibration['layer'].nunique()} layers x {c_calibration['bits'].nunique()} bit widths x "
             f"{c_calibration['quantizer'].nunique()} quantizers ({units} cases). c estimated on {n_cal} calibration "
             f"trajectories; the bounds checked on {n_held} held-out trajectories (other seeds), every quantized step. "
             "Fail-rate intervals resample held-out trajectories; the per-tensor quantizer's trajectories share a "
             "scale within their batch, so for it they are not independent either and its intervals are too narrow.",
             "", "**In sample (c from the held-out trajectories themselves): holds by construction, not evidence.**"]
    lines += [f"- {line('in-sample', c)}" for c in ("bound30_unrolled", "bound31_unrolled")]
    lines += ["", "**Out of sample (c from the calibration trajectories): the evidence.**"]
    lines += [f"- {line('out-of-sample', c)}" for c in ("bound30_unrolled", "bound31_unrolled")]
    merged = c_calibration.merge(c_heldout, on=KEYS, suffixes=("_cal", "_held"))
    above = merged[merged["c31_held"] > merged["c31_cal"]]
    lines.append(_seed_dependent_line(checks.per_step, units))
    lines.append(f"- In {len(above)} of {units} cases a held-out MoDiff residual rounds worse than every "
                 "calibration residual (c31 held-out > c31 calibration): only there can the unrolled (31) fail"
                 + (f"; the largest excess is {(above['c31_held'] / above['c31_cal']).max():.3g}x." if len(above) else "."))
    lines += ["", "**As printed (exponent T-k-1), both readings:**"]
    lines += [f"- {r}: {line(r, c)}" for r in READINGS for c in ("bound30_printed", "bound31_printed")]
    lines += ["", "**Theorem 4.3** (no c, so no in/out-of-sample distinction). With the scale the quantizer used, "
              "rounding to nearest without clipping keeps each error within half a step, so it holds by construction "
              "and checks the simulator:"]
    lines += [f"- {line('out-of-sample', c)}" for c in ("thm43_noec", "thm43_ec")]
    lines += ["", "As printed, s^2 d with s = (max - min) / (2^b - 1) of the values the quantizer took its range from "
              "(the paper's floor rounding; per tensor, each trajectory's error against its share of the batch "
              "tensor's bound, since the proof bounds every element). This is the claim judged:"]
    lines += [f"- {line('out-of-sample', c)}" for c in ("thm43_printed_noec", "thm43_printed_ec")]
    lines += ["", "The proof's bound for rounding to nearest, a quarter of that. The quantizers do not meet its "
              "premise of a quantizer mapping the data's [min, max] onto 2^b - 1 steps: the per-sample one widens its "
              "range to contain 0, the published per-tensor one is symmetric (absmax over 2^(b-1) - 1 steps), so this "
              "can fail, and a failure measures that difference, not an error in the theorem:"]
    lines += [f"- {line('out-of-sample', c)}" for c in ("thm43_own_noec", "thm43_own_ec")]
    lines += ["", _decay_paragraph(c_calibration)]
    return "\n".join(lines)


def _seed_dependent_line(per_step: pd.DataFrame, units: int) -> str:
    """The out-of-sample fail counts without the cases whose inputs do not depend on the seed: there every
    held-out trajectory repeats a calibration one, so their checks with c are in sample."""
    flags = per_step.groupby(KEYS, observed=True, sort=False)["seed_independent"].first()
    if not flags.any():
        return f"- Every one of the {units} cases has inputs that depend on the seed, so all are out of sample."
    part = per_step[(per_step["reading"] == "out-of-sample") & ~per_step["seed_independent"]]
    counts = []
    for check in ("bound30_unrolled", "bound31_unrolled", "bound30_printed", "bound31_printed"):
        rows = part[part["check"] == check]
        counts.append(f"`{check}` {_share(int(rows['fails'].sum()), int(rows['trajectories'].sum()))}")
    return (f"- {int(flags.sum())} of {units} cases have inputs that do not depend on the seed (the time "
            "embedding's layers, fed by t alone): their held-out trajectories repeat the calibration ones, so "
            "their checks with c are in sample although counted above. Without them, out of sample: "
            + "; ".join(counts) + ".")


def _decay_paragraph(c_table: pd.DataFrame) -> str:
    flagged = c_table[c_table["two_c31_ge_1"]]
    text = (f"**Decay assumption (2c < 1).** On the calibration trajectories 2 c31 >= 1 in {len(flagged)} of "
            f"{len(c_table)} cases and 2 c30 >= 1 in {int(c_table['two_c30_ge_1'].sum())}; c31 >= 1 in "
            f"{int(c_table['c31_ge_1'].sum())}.")
    if flagged.empty:
        return text + " Theorem 4.4's assumption holds for every layer and bit width here."
    counts = ", ".join(f"{q} A{b}: {n}" for (q, b), n in flagged.groupby(["quantizer", "bits"], observed=True).size().items()
                       if n)
    worst = flagged.loc[flagged["c31"].idxmax()]
    return text + (f" By quantizer and bits: {counts}. Largest: c31 = {worst['c31']:.3g} at `{worst['layer']}` "
                   f"({worst['quantizer']} A{worst['bits']}). There the assumption of Theorem 4.4 fails and the "
                   "unrolled (31), a sum of (2c)^(j+1) over differences j steps back, no longer decays: old "
                   "differences weigh as much as (2c = 1) or more than (2c > 1) recent ones, so the bound no longer "
                   "supports the paper's reading that past errors fade exponentially. It can still hold as an "
                   "inequality (unrolling the proof uses no c < 1/2; only the decay needs it), but it grows with the "
                   "number of steps.")
