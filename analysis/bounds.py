"""Theorems 4.3 and 4.4 of the MoDiff paper, checked on one layer's recorded inputs.

Indexing (as in `analysis.propagation`): inputs in sampling order, sampling index i = 0..n-1 (column
``step``); the paper's steps run t = T..1 with a_T the first, full-precision (warm-up) input, so T = n
and t = T - i (column ``paper_t``). The paper's k runs over t..T-1; k = T - j maps to the sampling
index j = T - k, which runs over 1..i, and the paper's difference a_k - a_{k+1} is a_j - a_{j-1}.

=================  ===================================================================================
``d_j``            ||a_j - a_{j-1}||^2, exact input differences (column ``diff_sq``; NaN at j = 0)
``||A||``          spectral norm of the layer's linear map (`operator_norm`)
``c``              max_i c_i, the empirical relative rounding error over the quantized steps of the
                   simulation the bound is about (``c30``: without compensation, ``c31``: with it);
                   the theorem assumes c < 1/2 (columns/attrs ``c30_below_half``, ``c31_below_half``)
``bound30_*``      (30), no compensation, vs ``err_sq_noec`` (standard modulation)
``bound31_*``      (31), with compensation, vs ``err_sq_ec`` (MoDiff)
=================  ===================================================================================

The four bounds at sampling index i (paper step t = T - i), sums over j = 1..i (k = t..T-1):

- (30) printed:   sum_j 2^(j-1) c ||A||^2 d_j          (paper exponent T - k - 1 = j - 1)
- (30) unrolled:  sum_j 2^(i-j+1) c ||A||^2 d_j        (proof exponent k - t + 1 = i - j + 1)
- (31) printed:   sum_j (2c)^(j-1) ||A||^2 d_j
- (31) unrolled:  sum_j (2c)^(i-j+1) ||A||^2 d_j

The unrolled forms follow from ||x + y||^2 <= 2||x||^2 + 2||y||^2 applied once per step, starting from
an exact first step; with c = max_i c_i they hold on any data (warm-up steps beyond the first only add
slack). Theorem 4.3: ||r - Q(r)||^2 <= s^2 d (floor) or s^2 d / 4 (nearest), per quantized residual.
A check holds where margin = bound - actual >= -1e-12 max(bound, actual) (float rounding slack).
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.propagation import Inputs, LinearOperator, Quantizer, error_frame, operator_norm

__all__ = ["BOUNDS", "Form", "bound_summary", "bound_table", "input_differences", "theorem44_bounds", "theorem44_weights"]

BOUNDS: tuple[str, ...] = ("bound30_printed", "bound30_unrolled", "bound31_printed", "bound31_unrolled")
_PER_METHOD = (
    "warmup", "err_sq", "rel_err", "residual_sq", "rounding_sq", "c_t", "thm43_bound", "thm43_margin", "thm43_holds"
)
_METHODS = {"direct": "direct", "noec": "modulated", "ec": "modiff"}
_RTOL = 1e-12


def input_differences(inputs: Inputs) -> np.ndarray:
    """d_i = ||a_i - a_{i-1}||^2 in float64 for i >= 1; d_0 = NaN."""
    out, previous = [], None
    for a in inputs:
        a = torch.as_tensor(a).detach().to(torch.float64)
        out.append(math.nan if previous is None else float((a - previous).square().sum()))
        previous = a
    return np.asarray(out, dtype=np.float64)


Form = Literal["bound30_printed", "bound30_unrolled", "bound31_printed", "bound31_unrolled"]


def theorem44_weights(n: int, form: Form, c: float) -> np.ndarray:
    """(n, n) weights W with bound_i = ||A||^2 sum_j W[i, j] d_j for the Theorem 4.4 ``form`` (module
    docstring): W[i, j] = 0 unless 1 <= j <= i; c enters as the factor c (30) or the base 2c (31)."""
    if form not in BOUNDS:
        raise ValueError(f"form must be one of {BOUNDS}, got {form!r}")
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")  # (n, n)
    exponent = (j - 1 if form.endswith("printed") else i - j + 1).astype(np.float64)
    base, factor = (2.0, float(c)) if form.startswith("bound30") else (2.0 * float(c), 1.0)
    with np.errstate(over="ignore"):  # 2^j overflows to inf for j > 1023: the bound is then inf
        return np.where((j >= 1) & (j <= i), factor * np.power(base, np.maximum(exponent, 0.0)), 0.0)


def theorem44_bounds(diff_sq: np.ndarray, c30: float, c31: float, op_norm: float) -> pd.DataFrame:
    """The four Theorem 4.4 bounds (module docstring) for every sampling index i, one column each."""
    d = np.nan_to_num(np.asarray(diff_sq, dtype=np.float64), nan=0.0)  # (n,)
    columns = {}
    for form in BOUNDS:
        weights = theorem44_weights(d.size, form, c30 if form.startswith("bound30") else c31)
        with np.errstate(invalid="ignore"):  # inf weight times d_j = 0 (a zero difference) adds nothing
            columns[form] = np.where(d[None, :] > 0, weights * d[None, :], 0.0).sum(axis=1) * op_norm**2
    return pd.DataFrame(columns)


def _max_c(frame: pd.DataFrame) -> float:
    c = frame.loc[frame["refreshed"], "c_t"].to_numpy(dtype=np.float64)
    return float(np.nanmax(c)) if np.isfinite(c).any() else 0.0


def _holds(margin: pd.Series, bound: pd.Series, actual: pd.Series) -> pd.Series:
    slack = _RTOL * np.maximum(bound.abs(), actual.abs())
    return margin >= -slack


def bound_table(
    inputs: Inputs, layer: Union[nn.Module, LinearOperator], quantizer: Quantizer, *,
    warmup_steps: int = 1, c: Optional[float] = None, op_norm: Optional[float] = None,
    timesteps: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """One row per step: the simulated errors of direct (``_direct``, no warm-up), standard modulation
    (``_noec``) and MoDiff (``_ec``) with their warm-up flags, c_t and Theorem 4.3 columns,
    ``diff_sq``, ``c30``/``c31``, ``op_norm``, the four Theorem 4.4 bounds and for each
    ``margin_<bound>`` and ``holds_<bound>``.

    ``inputs`` must be re-iterable (a tensor or a sequence). ``c`` overrides both empirical c's;
    ``op_norm`` overrides the estimate. Scalars are also in ``table.attrs``.
    """
    frames = {}
    for name, method in _METHODS.items():
        warmup = 0 if name == "direct" else warmup_steps  # direct PTQ, the baseline, has no warm-up
        frames[name] = error_frame(inputs, layer, quantizer, method, warmup_steps=warmup, timesteps=timesteps,
                                   dtype=dtype)
    table = frames["ec"][["step", "paper_t", "t"]].copy()
    for name, frame in frames.items():
        for col in _PER_METHOD:
            table[f"{col}_{name}"] = frame[col].to_numpy()
    table["diff_sq"] = input_differences(inputs)
    c30 = _max_c(frames["noec"]) if c is None else float(c)
    c31 = _max_c(frames["ec"]) if c is None else float(c)
    if op_norm is None:
        op_norm = operator_norm(layer, input_shape=tuple(torch.as_tensor(inputs[0]).shape))
    table["c30"], table["c31"], table["op_norm"] = c30, c31, float(op_norm)
    bounds = theorem44_bounds(table["diff_sq"].to_numpy(), c30, c31, float(op_norm))
    for name in BOUNDS:
        actual = table["err_sq_noec" if name.startswith("bound30") else "err_sq_ec"]
        table[name] = bounds[name].to_numpy()
        table[f"margin_{name}"] = table[name] - actual
        table[f"holds_{name}"] = _holds(table[f"margin_{name}"], table[name], actual)
    table.attrs.update(c30=c30, c31=c31, op_norm=float(op_norm),
                       c30_below_half=c30 < 0.5, c31_below_half=c31 < 0.5)
    return table


def _summary_row(check: str, margin: pd.Series, holds: pd.Series, table: pd.DataFrame, c: float,
                 bound_col: str, warmup_col: str) -> dict:
    valid = margin.notna() & ~table[warmup_col].astype(bool)
    fails = table.loc[valid & ~holds.astype(bool), "step"].tolist()
    m = margin[valid]
    bound = table.loc[m.index, bound_col]
    rel = (m / bound)[bound > 0]
    return {
        "check": check, "c": c, "c_below_half": (c < 0.5) if not math.isnan(c) else None,
        "steps": int(valid.sum()), "n_fail": len(fails), "holds": not fails,
        "min_margin": float(m.min()) if len(m) else math.nan,
        "min_margin_step": int(table.loc[m.idxmin(), "step"]) if len(m) else -1,
        "min_rel_margin": float(rel.min()) if len(rel) else math.nan,
        "fail_steps": fails, "fail_paper_t": [len(table) - s for s in fails],
    }


def bound_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per check (Theorem 4.3 per method, the four Theorem 4.4 bounds): c used, whether
    c < 1/2, number of steps checked (warm-up steps excluded) and failing, holds everywhere, min margin
    and its step, min relative margin (margin / bound over steps with bound > 0; < 0 where it fails),
    and the failing steps (sampling index and paper t)."""
    rows = []
    for name in _METHODS:
        margin = table[f"thm43_margin_{name}"].astype(float)
        rows.append(_summary_row(f"thm43_{name}", margin, table[f"thm43_holds_{name}"], table, math.nan,
                                 f"thm43_bound_{name}", f"warmup_{name}"))
    for name in BOUNDS:
        c = float(table["c30" if name.startswith("bound30") else "c31"].iloc[0])
        warmup = "warmup_noec" if name.startswith("bound30") else "warmup_ec"
        rows.append(_summary_row(name, table[f"margin_{name}"], table[f"holds_{name}"], table, c, name, warmup))
    return pd.DataFrame(rows)
