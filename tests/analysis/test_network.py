"""Whole-network feature error over steps (Figures 1a and 3) on the tiny denoiser."""
from __future__ import annotations

import pytest
import torch

import modiff as md
from analysis.network import (
    caching_error_curves, caching_error_samples, capture_features, compensation_ablation,
    compensation_ablation_samples, compensation_table, curves_from_samples, feature_error_over_steps,
    last_step_intervals, relative_l2_samples, resolve_site,
)
from modiff.quant import ActQuant, QuantConfig, QuantSpec, quantize

STEPS = 5


@pytest.fixture
def setup(tiny_denoiser: md.Denoiser) -> tuple[md.Denoiser, torch.Tensor, tuple[int, ...]]:
    return tiny_denoiser, md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(STEPS)


def test_site_resolution_and_hook_removed(setup) -> None:
    model, x_T, ts = setup
    assert resolve_site(model, "net.mid") == "net.mid.block_2"
    assert resolve_site(model, "net.mid.attn_1") == "net.mid.attn_1"
    with pytest.raises(ValueError, match="no submodule"):
        resolve_site(model, "net.middle")
    feats = capture_features(model, x_T, ts)
    assert len(feats) == STEPS and feats[0].shape == (2, 64, 8, 8)
    assert not model.net.mid.block_2._forward_hooks


def test_exact_modulation_has_no_feature_error(setup) -> None:
    model, x_T, ts = setup
    qmodel = quantize(model, QuantConfig(weight=None, activation=None, mode="modulated"))
    df = feature_error_over_steps(model, qmodel, x_T, ts)
    assert list(df.columns) == ["step", "t", "rel_l2_mean", "rel_l2_std", "n_samples"]
    assert df["t"].tolist() == list(ts) and (df["n_samples"] == 2).all()
    assert df["rel_l2_mean"].max() < 1e-4


def test_quantized_model_follows_its_own_trajectory(setup) -> None:
    """The quantized model samples from x_T itself; feeding it the fp trajectory gives other features."""
    model, x_T, ts = setup
    config = QuantConfig(weight=None, activation=ActQuant(QuantSpec(bits=3, granularity="sample")), mode="modulated")
    qmodel = quantize(model, config)
    own = capture_features(qmodel, x_T, ts)
    fp_inputs: list[torch.Tensor] = []
    md.sample_ddim(model, x_T, ts, callback=lambda s: fp_inputs.append(s.x_t))
    forced: list[torch.Tensor] = []
    handle = qmodel.net.mid.block_2.register_forward_hook(lambda m, a, out: forced.append(out.detach().clone()))
    try:
        with md.trajectory(qmodel):
            for x, t in zip(fp_inputs, ts):
                qmodel(x, torch.full((2,), t))
    finally:
        handle.remove()
    torch.testing.assert_close(own[0], forced[0])  # same x_T: the first step agrees
    assert not torch.allclose(own[-1], forced[-1], atol=1e-5)


def test_caching_curves(setup) -> None:
    model, x_T, ts = setup
    df = caching_error_curves(model, intervals=(1, 2), x_T=x_T, timesteps=ts)
    assert sorted(df["interval"].unique()) == [1, 2] and len(df) == 2 * STEPS
    assert df.loc[df["interval"] == 1, "rel_l2_mean"].max() < 1e-4
    cached = df[df["interval"] == 2].set_index("step")["rel_l2_mean"]
    assert cached[0] < 1e-6 and cached[1] > 1e-3  # step 1 reuses step 0's outputs


def test_compensation_ablation(setup) -> None:
    model, x_T, ts = setup
    df = compensation_ablation(model, bits=(8, 3), x_T=x_T, timesteps=ts)
    assert len(df) == 2 * 2 * STEPS and set(df["compensation"]) == {True, False}
    first = df[df["step"] == 0]
    assert first["rel_l2_mean"].max() < 1e-6  # warm-up step: full-precision activations
    last = df[df["step"] == STEPS - 1].set_index(["bits", "compensation"])["rel_l2_mean"]
    assert last[(8, True)] < last[(3, True)]


def test_default_site_is_the_latent_middle_block() -> None:
    """On a CompVis latent UNet the default site is net.middle_block (its output: 64 channels at 2x2)."""
    from test_latent import _tiny_model

    model = _tiny_model()
    assert resolve_site(model) == "net.middle_block"
    feats = capture_features(model, md.noise(range(2), model.sample_shape), md.timesteps(4, "ldm"))
    assert len(feats) == 4 and feats[0].shape == (2, 64, 2, 2)


def test_per_sample_rows_average_to_the_curves(setup) -> None:
    """relative_l2_samples holds ||ref_b - est_b|| / ||ref_b|| per sample; the curves are their mean and std."""
    ref = [torch.tensor([[3.0, 4.0], [1.0, 0.0]])]
    est = [torch.tensor([[3.0, 4.0 + 5.0], [0.0, 0.0]])]
    rows = relative_l2_samples(ref, est, timesteps=[7])
    assert rows["rel_l2"].tolist() == pytest.approx([1.0, 1.0]) and rows["sample"].tolist() == [0, 1]
    model, x_T, ts = setup
    samples = caching_error_samples(model, intervals=(2,), x_T=x_T, timesteps=ts)
    assert len(samples) == 2 * STEPS
    pd_curves = curves_from_samples(samples, ["interval"])
    assert pd_curves.equals(caching_error_curves(model, intervals=(2,), x_T=x_T, timesteps=ts))


def test_table4_names_its_columns_and_gives_intervals(setup) -> None:
    model, x_T, ts = setup
    samples = compensation_ablation_samples(model, bits=(8, 3), x_T=x_T, timesteps=ts)
    table = compensation_table(samples)
    assert list(table.columns) == [
        "bits", "without error compensation", "without error compensation: ci95_low",
        "without error compensation: ci95_high", "with error compensation", "with error compensation: ci95_low",
        "with error compensation: ci95_high", "n_samples"]
    assert table["bits"].tolist() == [3, 8] and (table["n_samples"] == 2).all()
    last = compensation_ablation(model, bits=(3,), x_T=x_T, timesteps=ts)
    with_ec = last[(last.step == STEPS - 1) & last.compensation]["rel_l2_mean"].item()
    assert table.loc[0, "with error compensation"] == pytest.approx(with_ec)
    assert last_step_intervals(samples, 3)[True].mean == pytest.approx(with_ec)
    with pytest.raises(ValueError, match="no rows for 5 bits"):
        last_step_intervals(samples, 5)
