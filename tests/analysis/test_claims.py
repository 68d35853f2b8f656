"""Figure 1a step selection, intervals over samples, and the sentences that compare results with the paper."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import caching, claims, intervals
from analysis.intervals import Interval


# --- which steps a cached model refreshes (N = 2, 3, 5 over 20 steps, one warm-up step) -------------------

def test_refresh_and_skipped_steps_by_hand() -> None:
    assert caching.refresh_steps(20, 3) == (0, 3, 6, 9, 12, 15, 18)
    assert caching.skipped_steps(20, 5) == tuple(i for i in range(20) if i % 5)
    assert caching.refresh_steps(6, 4, warmup_steps=2) == (0, 1, 4)  # warm-up steps compute exactly


def test_steps_skipped_by_every_interval() -> None:
    """1..19 minus multiples of 2, 3 and 5: the last common skip is 19; at 100 steps index 99 is a refresh for
    N = 3, and the last common skip is 97."""
    assert caching.steps_skipped_by_all(20, [2, 3, 5]) == (1, 7, 11, 13, 17, 19)
    assert caching.steps_skipped_by_all(100, [2, 3, 5])[-1] == 97
    assert 99 in caching.refresh_steps(100, 3)
    assert caching.steps_skipped_by_all(4, [2, 3]) == (1,)
    assert caching.steps_skipped_by_all(6, [1]) == ()  # N = 1 never skips
    with pytest.raises(ValueError, match="at least one interval"):
        caching.steps_skipped_by_all(20, [])
    with pytest.raises(ValueError, match=">= 1"):
        caching.refresh_steps(20, 0)


def test_the_common_skip_step_needs_a_new_input() -> None:
    """quad at 100 steps ends with t = 0 four times (indices 96-99), and DDIM from t to t leaves x as it was: at
    97, N = 2 reuses its output of 96, computed on the same input, so the comparison moves to the last common
    skip whose input differs from every N's reused one; with distinct timesteps it is the last common skip."""
    import modiff as md

    quad = md.timesteps(100, "quad")
    assert list(quad[-4:]) == [0, 0, 0, 0] and quad[-5] != 0
    step = caching.last_informative_common_skip([2, 3, 5], quad)
    assert step is not None and step < 96 and step in caching.steps_skipped_by_all(100, [2, 3, 5])
    assert all(quad[max(r for r in caching.refresh_steps(100, n) if r < step)] != quad[step] for n in (2, 3, 5))
    later = [i for i in caching.steps_skipped_by_all(100, [2, 3, 5]) if i > step]
    assert later and all(any(quad[max(r for r in caching.refresh_steps(100, n) if r < i)] == quad[i]
                             for n in (2, 3, 5)) for i in later)
    assert caching.last_informative_common_skip([2, 3, 5], range(100, 0, -1)) == 97
    assert caching.last_informative_common_skip([2], [5, 5, 5, 5]) is None
    with pytest.raises(ValueError, match="2 timesteps for samples of 20 steps"):
        caching.caching_summary(_sawtooth(), timesteps=[1, 0])


def _sawtooth(steps: int = 20, intervals_: tuple[int, ...] = (2, 3, 5), samples: int = 4) -> pd.DataFrame:
    """Per-sample error 0 on refresh steps, (steps since refresh) * 0.1 * (1 + sample / 10) otherwise."""
    rows = []
    for n in intervals_:
        refresh = caching.refresh_steps(steps, n)
        for i in range(steps):
            since = i - max(r for r in refresh if r <= i)
            rows += [{"interval": n, "step": i, "t": np.nan, "sample": s, "rel_l2": 0.1 * since * (1 + s / 10)}
                     for s in range(samples)]
    return pd.DataFrame(rows)


def test_caching_summary_compares_at_the_common_skip_step() -> None:
    summary = caching.caching_summary(_sawtooth(), timesteps=range(20, 0, -1)).set_index(["interval", "comparison"])
    scale = np.mean([1 + s / 10 for s in range(4)])  # 1.15
    # step 19: N = 2 one step since its refresh at 18, N = 3 one since 18, N = 5 four since 15
    at = summary.xs("last step every N skips", level="comparison")
    assert at["steps"].tolist() == ["19"] * 3
    assert at["mean"].to_numpy() == pytest.approx([0.1 * scale, 0.1 * scale, 0.4 * scale])
    assert (at["ci95_low"] <= at["mean"]).all() and (at["mean"] <= at["ci95_high"]).all()
    # the last step itself is labelled: index 19 is a skip for all three here
    assert summary.loc[(3, "last step (skip for this N)"), "mean"] == pytest.approx(0.1 * scale)
    # mean over N = 2's skipped steps: every one is 1 step since a refresh
    assert summary.loc[(2, "mean over its skipped steps"), "mean"] == pytest.approx(0.1 * scale)
    assert summary.loc[(5, "mean over all steps"), "mean"] == pytest.approx(0.1 * scale * 40 / 20)


def test_last_step_label_says_refresh() -> None:
    summary = caching.caching_summary(_sawtooth(steps=19), timesteps=range(19, 0, -1))  # 18 refreshes N = 2 and 3
    labels = summary[summary["comparison"].str.startswith("last step (")].set_index("interval")["comparison"]
    assert labels.to_dict() == {2: "last step (refresh for this N)", 3: "last step (refresh for this N)",
                                5: "last step (skip for this N)"}


def test_each_interval_at_its_own_last_skip() -> None:
    """At 19 steps index 18 refreshes N = 2 and 3: their own last skip of a new input is 17 (one and two steps
    after their refreshes at 16 and 15), N = 5's is 18 (three after 15); under quad's repeated t = 0 at 100 steps
    it moves before the repeats, and the claim quotes it against the common step and the paper."""
    summary = caching.caching_summary(_sawtooth(steps=19), timesteps=range(19, 0, -1))
    own = summary[summary["comparison"] == "its last skip of a new input"].set_index("interval")
    scale = np.mean([1 + s / 10 for s in range(4)])
    assert own["steps"].to_dict() == {2: "17", 3: "17", 5: "18"}
    assert own["mean"].to_numpy() == pytest.approx([0.1 * scale, 0.2 * scale, 0.3 * scale])
    import modiff as md

    quad = md.timesteps(100, "quad")
    last = caching.last_informative_skip(2, quad)
    assert last is not None and last < 96 and quad[last] != quad[last - 1]
    assert caching.last_informative_skip(3, range(100, 0, -1)) == 98
    text = claims.caching_claim(summary, caching.growth_by_interval(_sawtooth(steps=19)), 19)
    assert "Each N at its own last skip of a new input: N = 2: step 17, " in text and "N = 5: step 18, " in text
    assert f"There N = 3 is 1x its value at the common step and {0.2 * scale / 0.4:.2g}x the paper's 0.4." in text
    at_20 = caching.caching_summary(_sawtooth(), timesteps=range(20, 0, -1))  # every N's own last skip is 19, common
    assert "own last skip" not in claims.caching_claim(at_20, caching.growth_by_interval(_sawtooth()), 20)


def test_growth_with_step() -> None:
    flat = caching.growth_with_step(_sawtooth(), 2)  # always one step since refresh: no growth
    assert flat.mean == pytest.approx(0.0, abs=1e-12)
    rising = _sawtooth().assign(rel_l2=lambda d: d["rel_l2"] * (1 + d["step"]))
    assert caching.growth_with_step(rising, 3).low > 0
    assert set(caching.growth_by_interval(_sawtooth(steps=3))) == {3, 5}  # N = 2 skips only step 1: one half
    with pytest.raises(ValueError, match="no rows for interval 7"):
        caching.growth_with_step(_sawtooth(), 7)


# --- intervals ------------------------------------------------------------------------------------------

def test_t_interval_matches_the_formula() -> None:
    values = np.array([1.0, 2.0, 4.0, 7.0])
    half = stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2
    got = intervals.mean_interval(values, method="t")
    assert (got.mean, got.low, got.high, got.n) == pytest.approx((3.5, 3.5 - half, 3.5 + half, 4))


def test_bootstrap_interval_is_reproducible_and_close_to_t() -> None:
    values = np.random.default_rng(1).normal(2.0, 1.0, size=200)
    a, b = intervals.mean_interval(values), intervals.mean_interval(values)
    assert a == b
    t = intervals.mean_interval(values, method="t")
    assert a.low == pytest.approx(t.low, abs=0.03) and a.high == pytest.approx(t.high, abs=0.03)
    assert intervals.mean_interval([0.5]) == Interval(0.5, 0.5, 0.5, 1)


@pytest.mark.parametrize("block", [37, 200, 1 << 22])
def test_bootstrap_draws_in_blocks_are_one_draw_of_every_resample(monkeypatch, block: int) -> None:
    """The percentile interval is that of the means of ``rng.integers(0, n, (resamples, n))`` drawn at once, however
    many rows a block holds (a block of 37 values holds no whole row: one row at a time)."""
    values = np.random.default_rng(2).normal(size=50)
    means = values[np.random.default_rng(0).integers(0, 50, size=(1000, 50))].mean(axis=1)
    monkeypatch.setattr(intervals, "_DRAW_BLOCK", block)
    got = intervals.mean_interval(values, resamples=1000)
    assert (got.low, got.high) == tuple(np.quantile(means, [0.5 - 0.95 / 2, 0.5 + 0.95 / 2]))


def test_interval_failures() -> None:
    with pytest.raises(ValueError, match="finite"):
        intervals.mean_interval([1.0, math.nan])
    with pytest.raises(ValueError, match="level"):
        intervals.mean_interval([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="method"):
        intervals.mean_interval([1.0, 2.0], method="normal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one value per sample"):
        intervals.paired_difference([1.0, 2.0], [1.0])


def test_paired_difference_separates_what_overlapping_intervals_do_not() -> None:
    """Two settings share a large seed-to-seed spread; their difference is small but constant."""
    base = np.random.default_rng(0).uniform(0.1, 1.0, size=16)
    a, b = base, base + 0.02
    assert intervals.mean_interval(a).overlaps(intervals.mean_interval(b))
    diff = intervals.paired_difference(b, a)
    assert diff.mean == pytest.approx(0.02) and diff.excludes(0.0)


def test_samples_to_separate_by_hand() -> None:
    """mean 1, sd 2: (1.96 * 2 / 1)^2 = 15.4 -> 16."""
    d = np.array([3.0, -1.0, 3.0, -1.0])  # mean 1, sd (ddof 1) 2.309
    assert intervals.samples_to_separate(d) == math.ceil((stats.norm.ppf(0.975) * d.std(ddof=1)) ** 2)
    assert intervals.samples_to_separate([1.0, -1.0]) == math.inf


def test_paired_table_and_summarize() -> None:
    per_seed = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "k": [1, 1, 1, 2, 2, 2],
                             "v": [0.5, 0.7, 0.9, 0.4, 0.6, 0.8]})
    paired = intervals.paired_table(per_seed, "k", "v", baseline=1)
    assert paired.loc[0, "mean_difference"] == pytest.approx(-0.1) and bool(paired.loc[0, "separated"])
    summary = intervals.summarize(per_seed, ["k"], "v")
    assert summary["mean"].to_numpy() == pytest.approx([0.7, 0.6]) and summary["n"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="baseline 9"):
        intervals.paired_table(per_seed, "k", "v", baseline=9)
    with pytest.raises(ValueError, match=r"columns \['w'\]"):
        intervals.summarize(per_seed, ["k"], "w")


# --- sentences: both branches ---------------------------------------------------------------------------

def _summary(at: dict[int, float], overall: dict[int, tuple[float, float, float]]) -> pd.DataFrame:
    rows = [{"interval": n, "comparison": "last step every N skips", "steps": "97", "mean": v, "ci95_low": v - 0.01,
             "ci95_high": v + 0.01, "n_samples": 16} for n, v in at.items()]
    rows += [{"interval": n, "comparison": "mean over all steps", "steps": "100 steps", "mean": m, "ci95_low": lo,
              "ci95_high": hi, "n_samples": 16} for n, (m, lo, hi) in overall.items()]
    return pd.DataFrame(rows)


def test_caching_claim_agrees() -> None:
    summary = _summary({2: 0.3, 3: 0.41, 5: 0.6}, {2: (0.2, 0.19, 0.21), 3: (0.3, 0.29, 0.31), 5: (0.5, 0.4, 0.6)})
    growth = {n: Interval(0.1, 0.05, 0.15, 16) for n in (2, 3, 5)}
    text = claims.caching_claim(summary, growth, steps=100)
    assert "N = 3: 0.41 [0.4, 0.42]" in text and "this agrees" in text
    assert "Growth with N holds" in text and "holds for N = 2, 3, 5" in text and "hypothesis" not in text
    assert "this agrees (within 25%)." in text
    assert "this agrees (within 25%), although at 20 steps, not 100." in claims.caching_claim(summary, growth, steps=20)


def test_caching_claim_disagrees() -> None:
    summary = _summary({2: 0.1, 3: 0.12, 5: 0.09}, {2: (0.2, 0.1, 0.3), 3: (0.25, 0.15, 0.35), 5: (0.1, 0.05, 0.15)})
    growth = {2: Interval(0.1, 0.05, 0.15, 16), 3: Interval(0.0, -0.1, 0.1, 16), 5: Interval(-0.2, -0.3, -0.1, 16)}
    text = claims.caching_claim(summary, growth, steps=20, model="fmnist-ldm")
    assert "here it is 0.12, below the paper's" in text and "20 steps instead of 100" in text
    assert "(`fmnist-ldm` on Fashion-MNIST, where the paper has CIFAR-10's DDIM UNet" in text
    assert "Not explained by a measurement here; a hypothesis, untested" in text
    assert "change less" in text and "Growth with N does not hold" in text
    assert ("holds for N = 2; the opposite (the error falls with the step, unlike the paper) for N = 5; "
            "not shown for N = 3") in text
    with pytest.raises(ValueError, match="no common skip step for N = 4"):
        claims.caching_claim(summary, growth, steps=20, paper_interval=4)


def test_lossless_claim_both_branches() -> None:
    same = claims.lossless_claim("W8A3 MoDiff", Interval(4.2, 4.0, 4.4, 1024), Interval(4.25, 4.1, 4.4, 1024))
    assert "This agrees" in same and "intervals" in same and "not lossless" not in same
    worse = claims.lossless_claim("W8A3 MoDiff", 3.8, 1.26)
    assert "classifier FID 3.8 against 1.26" in worse and "not lossless" in worse and "resets the MoDiff state" in worse
    assert "This agrees: no difference beyond 5%" in claims.lossless_claim("x", 1.27, 1.26)


def test_compensation_claim_both_branches() -> None:
    small = claims.compensation_claim(3, Interval(0.05, 0.04, 0.06, 16), 0.9, steps=100)
    assert small.endswith("This agrees.") and "0.05 [0.04, 0.06]" in small
    large = claims.compensation_claim(3, Interval(0.66, 0.6, 0.7, 16), Interval(1.65, 1.5, 1.8, 16), steps=100)
    assert "does not stay small, although compensation lowers it" in large
    assert "(1) each model samples its own trajectory" in large and "(3) the published" in large


def test_memory_claim_both_branches() -> None:
    def accounting(mb: list[float]) -> pd.DataFrame:
        names = ["a_hat and o_hat, fp32", "a_hat only, fp32", "a_hat only, bf16", "a_hat and o_hat as 3-bit codes"]
        return pd.DataFrame({"model": "m", "preset": "w8a3-modiff", "accounting": names, "layers": 113, "mb_per_image": mb})

    ours = accounting([22.3, 12.8, 6.4, 2.1])
    text = claims.memory_claim(ours, accounting([44.6, 25.6, 12.8, 3.9]))
    assert "44.6 MB for a UNet of the CIFAR-10" in text and "disagrees, by 11.2x" in text
    assert "Only a_hat and o_hat as 3-bit codes would fit" in text
    none_fit = claims.memory_claim(ours, accounting([44.6, 25.6, 12.8, 4.2]))
    assert "None of them fits" in none_fit and "4.2 MB is 4.01 MiB" not in none_fit
    as_mib = claims.memory_claim(ours, accounting([44.6, 25.6, 12.8, 4.184]))  # 4.184e6 B = 3.990 MiB
    assert "None of them fits" in as_mib
    assert as_mib.endswith("a_hat and o_hat as 3-bit codes would: 4.18 MB is 3.99 MiB.")
    assert claims.memory_claim(ours, accounting([3.5, 2, 1, 0.5])).endswith("This agrees.")


def test_warmup_claim() -> None:
    paired = pd.DataFrame([{"warmup_steps": 2, "baseline": 1, "mean_difference": -0.01, "ci95_low": -0.02,
                            "ci95_high": -0.005, "n": 64, "separated": True, "samples_to_separate": 20.0},
                           {"warmup_steps": 4, "baseline": 1, "mean_difference": 0.002, "ci95_low": -0.01,
                            "ci95_high": 0.014, "n": 64, "separated": False, "samples_to_separate": 900.0}])
    text = claims.warmup_claim(paired)
    assert "2 steps vs 1: -0.01 [-0.02, -0.005] (lower)" in text
    assert "4 steps vs 1: 0.002 [-0.01, 0.014] (no difference resolved; about 900 seeds would resolve this effect). The paper" in text
    beyond = pd.DataFrame([{"warmup_steps": 8, "baseline": 4, "mean_difference": -0.003, "ci95_low": -0.004,
                            "ci95_high": -0.002, "n": 64, "separated": True, "samples_to_separate": 10.0}])
    summary = pd.DataFrame({"warmup_steps": [1, 2, 4, 8], "mean": [0.05, 0.04, 0.04, 0.037]})
    text = claims.warmup_claim(pd.concat([paired, beyond]), summary)
    assert "; 8 steps vs 4: -0.003 [-0.004, -0.002] (lower), 7.5% of the error with 4 steps. The paper:" in text
    assert "(lower), 7.5%" not in claims.warmup_claim(paired, summary)


def _ratios(medians: list[float], mins: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"layer": [f"net.l{i}" for i in range(len(medians))], "overall": 1.5, "min_per_step": mins,
                         "median_per_step": medians})


def test_range_claim_branches() -> None:
    agrees = claims.range_claim(_ratios([12.0, 15.0], [2.0, 3.0]), samples=128)
    assert "over 128 trajectories: `net.l0` median 12, smallest 2" in agrees and "this agrees for every layer" in agrees
    partly = claims.range_claim(_ratios([12.0, 8.0], [2.0, 1.5]), samples=12)
    assert "holds for 1 of 2 layers here (median over steps), though the differences are narrower" in partly
    wider = claims.range_claim(_ratios([3.0, 8.0], [0.8, 1.5]), samples=12)
    assert "holds for 0 of 2 layers" in wider and "as wide as the activations or wider" in wider
    assert "the ratio is 1.5 to 1.5" in wider and "Within each trajectory" not in wider
    with_intervals = _ratios([12.0, 15.0], [2.0, 3.0]).assign(per_trajectory_median=[9.0, 11.0],
                                                              per_trajectory_ci95_low=[8.5, 10.0],
                                                              per_trajectory_ci95_high=[9.5, 12.0], trajectories=128)
    assert ("median per-step ratio averages, over trajectories with its 95% interval: `net.l0` 9 [8.5, 9.5]; "
            "`net.l1` 11 [10, 12].") in claims.range_claim(with_intervals, samples=128)
    pooled = with_intervals.assign(median_per_step_ci95_low=[11.0, 14.0], median_per_step_ci95_high=[13.0, 16.5])
    assert "`net.l0` median 12 [11, 13], smallest 2; `net.l1` median 15 [14, 16.5]" in claims.range_claim(pooled, 128)
    assert "left out" not in claims.range_claim(pooled.assign(repeated_t_steps_left_out=0), 128)
    assert "4 steps that repeat the previous step's timestep are left out" in \
        claims.range_claim(pooled.assign(repeated_t_steps_left_out=4), 128)


def test_sampler_claim_counts_samplers_where_modiff_is_closer() -> None:
    paired = pd.DataFrame([{"preset": "w8a4-modiff", "baseline": "w8a4", "mean_difference": d, "ci95_low": lo,
                            "ci95_high": hi, "n": 64, "separated": sep, "samples_to_separate": 3.0, "sampler": s,
                            "steps": 20}
                           for d, lo, hi, sep, s in ((-0.4, -0.5, -0.3, True, "ddim"), (0.01, -0.02, 0.04, False, "ddpm"))])
    text = claims.sampler_claim(paired)
    assert "`w8a4-modiff` minus `w8a4` (paired over 64 seeds, 95% interval)" in text
    assert "ddim 20 steps: -0.4 [-0.5, -0.3] (lower with MoDiff)" in text
    assert "ddpm 20 steps: 0.01 [-0.02, 0.04] (no difference resolved)" in text
    assert text.endswith("closer to full precision with 1 of 2 samplers.")
    assert "The paper: Tables 5 and 15-18 run MoDiff with DDPM, DPM-Solver and 20-step DDIM (the paper's brief gives " \
        "no values)." in text  # the brief states which samplers the paper ran, not an outcome


def test_sampler_fid_claim_reads_the_verdicts_per_sampler() -> None:
    def row(preset: str, sampler: str, fid: float, vs_fp: str, vs_direct: str) -> dict:
        return {"sampler": sampler, "steps": 20, "preset": preset, "n": 64, "fid_classifier": fid,
                "fid_ci95_low": fid - 0.5, "fid_ci95_high": fid + 0.5, "vs_fp": vs_fp, "modiff_vs_direct": vs_direct}

    scores = pd.DataFrame([row("fp", "ddim", 2.0, "", ""), row("w8a4", "ddim", 9.0, "worse: +7 [+6, +8]", ""),
                           row("w8a4-modiff", "ddim", 2.1, "no difference: +0.1 [-0.2, +0.4]", "better: -6.9 [-7.9, -5.9]"),
                           row("w8a4-modiff", "ddpm", 5.0, "worse: +3 [+2, +4]", "no difference: +0.1 [-1, +1.2]")])
    text = claims.sampler_fid_claim(scores)
    assert "of `w8a4-modiff` per sampler, paired over 64 seeds" in text
    assert ("ddim 20 steps: FID 2.1 [1.6, 2.6], against direct better: -6.9 [-7.9, -5.9], against fp no difference: "
            "+0.1 [-0.2, +0.4]") in text
    assert text.endswith("lower than direct quantization's with 1 of 2 samplers, and within 10% of the same sampler's "
                         "fp FID (paired 95% interval, the index's reading of near) with 0 of 2; inconclusive (no "
                         "difference, but an interval wider than that): ddim 20 steps; not near, so unlike full "
                         "precision: ddpm 20 steps.")  # fp's 2.0: near is within +-0.2; ddpm has no fp row here
    assert claims.sampler_fid_claim(scores[scores.preset != "w8a4-modiff"]).startswith("No MoDiff preset")
    assert claims.sampler_fid_claim(scores, left_out=[("ddpm", 100)]).endswith(
        "ddpm 20 steps. Not measured here (no run or summary at this N yet): ddpm 100 steps.")
    close = scores.assign(vs_fp=scores.vs_fp.replace("no difference: +0.1 [-0.2, +0.4]", "worse: +0.1 [+0.05, +0.15]"))
    assert "with 1 of 2; not near, so unlike full precision: ddpm 20 steps." in claims.sampler_fid_claim(close)


def test_audit_claim_reads_each_check() -> None:
    def audit(per_step: float, alone: float) -> pd.DataFrame:
        return pd.DataFrame({"check": ["per-step reset vs weight-only (max |difference|)",
                                       "per-trajectory reset vs weight-only (max |difference|)",
                                       "sample 0: alone vs in a batch of 4 (max |difference|, per-tensor scales)"],
                             "value": [per_step, 0.47, alone]})

    published = claims.audit_claim(audit(0.0, 0.035))
    assert "equal weight-only quantization bit for bit" in published and "differ by up to 0.47" in published
    assert "depends on the batch it was sampled in" in published
    other = claims.audit_claim(audit(0.2, 0.0))
    assert "differ from weight-only quantization by up to 0.2" in other and "no batch dependence" in other


def test_layer_sensitivity_finding_names_the_group_that_breaks_w4() -> None:
    from analysis import layer_sensitivity

    table = pd.DataFrame({"preset": "w4a32", "layers": ["all layers", "net.conv_out only", "net.conv_in only",
                                                        "all but net.conv_in and net.conv_out"],
                          "rel_l2_pixels": [1.7, 1.9, 0.05, 0.14], "ci95_low": [1.6, 1.8, 0.04, 0.1],
                          "ci95_high": [1.8, 2.0, 0.06, 0.2], "n": 128})
    text = layer_sensitivity.finding(table)
    assert text.startswith("- `w4a32`: relative L2 to fp 1.7 [1.6, 1.8] with every layer quantized; net.conv_out only")
    assert text.endswith("(n = 128 seeds). The largest error comes from net.conv_out only, as large as with every "
                         "layer: that group alone accounts for the whole error.")
    smaller = table.assign(ci95_high=[1.8, 1.5, 0.06, 0.2], rel_l2_pixels=[1.7, 1.4, 0.05, 0.14])
    assert layer_sensitivity.finding(smaller).endswith("The largest error comes from net.conv_out only.")


def test_findings_are_saved_beside_the_tables(tmp_path) -> None:
    from analysis import tables

    path = tables.save_finding("Found **this**.\n\n", "fig1a_caching", tmp_path)
    assert path == tmp_path / "tables" / "fig1a_caching_finding.md" and path.read_text() == "Found **this**.\n"
    with pytest.raises(ValueError, match="finding 'x' is empty"):
        tables.save_finding("  ", "x", tmp_path)
