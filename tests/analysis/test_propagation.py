"""Single-layer simulators: identities, agreement with modiff's ModulatedLayer, operator norms, Theorem 4.3."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from analysis.propagation import (
    error_frame, explicit_matrix, iter_simulation, linear_operator, operator_norm, simulate, theorem43_bound,
    theorem43_own_range_bound,
)
from modiff.quant import ActQuant, QuantConfig, QuantSpec, WeightQuant, trajectory
from modiff.quant.layers.direct import QuantLayer
from modiff.quant.layers.modulated import ModulatedLayer
from modiff.quant.primitives import quantize_dynamic

A4 = QuantSpec(bits=4, granularity="sample")


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 5, 3, padding=1)


def _inputs(steps: int = 8, shape: tuple[int, ...] = (2, 3, 6, 6), seed: int = 1) -> list[torch.Tensor]:
    """A smooth random trajectory, as in sampling: consecutive inputs differ by small steps."""
    g = torch.Generator().manual_seed(seed)
    x, out = torch.randn(shape, generator=g), []
    for _ in range(steps):
        x = x + 0.1 * torch.randn(shape, generator=g)
        out.append(x.clone())
    return out


@pytest.mark.parametrize("method", ["direct", "modulated", "modiff", "cache"])
def test_output_is_operator_of_input_estimate(method: str) -> None:
    """o_hat_i = A(a_hat_i) + b at every step (the error-feedback identity for modiff)."""
    conv = _conv()
    op = linear_operator(conv).to(torch.float64)
    kw = {"cache_interval": 3} if method == "cache" else {}
    for rec in iter_simulation(_inputs(), conv, A4, method, **kw):
        torch.testing.assert_close(rec.estimate, op(rec.a_hat), rtol=1e-12, atol=1e-12)


def test_modiff_error_is_current_rounding_only() -> None:
    conv = _conv()
    op = linear_operator(conv).to(torch.float64)
    for rec in iter_simulation(_inputs(), conv, A4, "modiff"):
        if rec.residual is not None:
            expected = op(rec.residual - rec.quantized, with_bias=False)
            torch.testing.assert_close(rec.exact - rec.estimate, expected, rtol=1e-10, atol=1e-12)


def test_without_compensation_errors_random_walk() -> None:
    """Output error = A(sum over past steps of r_k - Q(r_k)), with r_k = a_k - a_{k-1}."""
    conv, xs = _conv(), _inputs(10)
    op = linear_operator(conv).to(torch.float64)
    total = torch.zeros_like(xs[0], dtype=torch.float64)
    for rec in iter_simulation(xs, conv, A4, "modulated"):
        if rec.residual is not None:
            torch.testing.assert_close(rec.residual, (xs[rec.step] - xs[rec.step - 1]).double())
            total += rec.residual - quantize_dynamic(rec.residual, A4)
        torch.testing.assert_close(rec.exact - rec.estimate, op(total, with_bias=False), rtol=1e-10, atol=1e-12)


def test_sixteen_bits_is_nearly_exact_and_cache_one_is_exact() -> None:
    conv, xs = _conv(), _inputs()
    frame = error_frame(xs, conv, QuantSpec(bits=16, granularity="sample"), "modiff")
    assert frame["rel_err"].max() < 1e-4
    assert error_frame(xs, conv, None, "cache", cache_interval=1)["rel_err"].max() < 1e-13
    assert error_frame(xs, conv, None, "modulated")["rel_err"].max() < 1e-13
    coarse = error_frame(xs, conv, A4, "modiff")
    assert coarse["rel_err"].iloc[1:].min() > 1e-4 and coarse["err"].iloc[0] == 0  # warm-up exact


def _modiff_layer(config: QuantConfig, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    layer = ModulatedLayer(_conv(), config, "layer")
    with trajectory(layer):
        return [layer(x) for x in xs]


@pytest.mark.parametrize("method,compensation,interval", [
    ("modiff", True, 0), ("modulated", False, 0), ("cache", True, 3), ("cache-noec", False, 3)])
def test_agrees_with_modiff_modulated_layer(method: str, compensation: bool, interval: int) -> None:
    xs = _inputs(9)
    mode = "cache" if interval else "modulated"
    config = QuantConfig(weight=None, activation=ActQuant(A4), mode=mode, compensation=compensation,
                         cache_interval=interval, warmup_steps=2)
    real = _modiff_layer(config, xs)
    kw = dict(cache_interval=interval, warmup_steps=2)
    for r, s in zip(real, simulate(xs, _conv(), A4, method, dtype=torch.float32, **kw)):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)
    for r, s in zip(real, simulate(xs, _conv(), A4, method, **kw)):  # float64: float32 rounding apart
        torch.testing.assert_close(s, r.double(), rtol=1e-4, atol=1e-4)


def test_quant_layer_operator_uses_quantized_weight() -> None:
    config = QuantConfig(weight=WeightQuant(QuantSpec(bits=4, granularity="channel", channel_axis=0)),
                         activation=None, mode="direct")
    layer = QuantLayer(_conv(), config, "layer")
    assert torch.equal(linear_operator(layer).weight, layer.weight_q)
    assert torch.equal(linear_operator(layer, weight="fp").weight, layer.weight)
    x = _inputs(1)[0]
    torch.testing.assert_close(linear_operator(layer)(x), layer(x))


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(2, 3, 3, padding=1), (4, 2, 5, 5)),
    (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), (1, 4, 6, 6)),
    (nn.Conv1d(3, 2, 2, dilation=2), (2, 3, 7)),
])
def test_operator_norm_of_conv_matches_explicit_matrix(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer.reset_parameters()
    matrix = explicit_matrix(linear_operator(layer), shape)
    x = torch.randn(shape[1:], dtype=torch.float64)
    torch.testing.assert_close(matrix @ x.flatten(), linear_operator(layer).to(torch.float64)(x[None], with_bias=False).flatten())
    expected = float(torch.linalg.matrix_norm(matrix, ord=2))
    assert operator_norm(layer, shape) == pytest.approx(expected, rel=1e-6)


def test_operator_norm_of_linear_is_top_singular_value() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(7, 4)
    assert operator_norm(lin) == pytest.approx(float(torch.linalg.svdvals(lin.weight.detach().double())[0]), rel=1e-12)
    with pytest.raises(ValueError, match="input_shape"):
        operator_norm(_conv())


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=2), QuantSpec(bits=3, rounding="floor"), QuantSpec(bits=4, granularity="sample"),
    QuantSpec(bits=4, scheme="symmetric", granularity="channel"), QuantSpec(bits=8, rounding="floor", granularity="token"),
    QuantSpec(bits=3, scheme="symmetric-published"),
])
def test_theorem43_holds_on_random_inputs(spec: QuantSpec) -> None:
    torch.manual_seed(2)
    xs = torch.distributions.StudentT(2.0).sample((6, 2, 3, 6, 6)) + torch.randn(6, 2, 3, 6, 6)  # heavy tails
    frame = error_frame(xs, _conv(), spec, "direct", warmup_steps=0)
    assert frame["thm43_holds"].all() and (frame["thm43_bound"] > 0).all()
    modiff = error_frame(xs, _conv(), spec, "modiff")
    assert modiff["thm43_holds"].iloc[1:].all()


def test_theorem43_in_the_datas_own_range_does_not_bound_a_range_widened_to_zero() -> None:
    """The README's caveat: Theorem 4.3 states its bound in x's own max - min, but the asymmetric quantizer
    widens the range to contain 0. For x uniform in [0.5, 1] at 3 bits per sample the step doubles, and the
    error, s^2 d / 12 on average, is 16/12 of the bound in x's own range, while the bound with the scale used
    holds."""
    x = 0.5 + 0.5 * torch.rand(1, 100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = QuantSpec(bits=3, granularity="sample")
    error = float((x - quantize_dynamic(x, spec)).square().sum())
    own_range = float((x.max() - x.min()) ** 2) * x.numel() / (4 * 7 ** 2)
    assert theorem43_own_range_bound(x, spec) == pytest.approx(own_range, rel=1e-12)
    assert error / own_range == pytest.approx(4 / 3, rel=0.01)
    assert error <= theorem43_bound(x, spec)


def test_theorem43_own_range_bound_by_hand() -> None:
    """Two samples with ranges [-1, 2] and [0, 7] at 3 bits (7 steps), 4 values each: per sample the steps are
    3/7 and 1, so the bound is 4 (9/49 + 1) / 4 rounding to nearest and 4 times that flooring; per tensor one
    range [-1, 7], step 8/7, over all 8 values. Where each range holds 0 it equals the bound with the quantizer's
    scale; shifted away from 0 the quantizer's ranges widen to it, the data's own do not."""
    x = torch.tensor([[-1.0, 0.0, 1.0, 2.0], [0.0, 7.0, 3.0, 1.0]], dtype=torch.float64)
    per_sample = QuantSpec(bits=3, granularity="sample")
    assert theorem43_own_range_bound(x, per_sample) == pytest.approx(9 / 49 + 1, rel=1e-12)
    assert theorem43_own_range_bound(x, QuantSpec(bits=3, granularity="sample", rounding="floor")) == pytest.approx(
        4 * (9 / 49 + 1), rel=1e-12)
    assert theorem43_own_range_bound(x, QuantSpec(bits=3, granularity="tensor")) == pytest.approx(
        8 * (8 / 7) ** 2 / 4, rel=1e-12)
    assert theorem43_own_range_bound(x, per_sample) == pytest.approx(theorem43_bound(x, per_sample), rel=1e-12)
    shifted = x + 10  # the data's range no longer holds 0: the quantizer's step widens, its own range's does not
    assert theorem43_own_range_bound(shifted, per_sample) == pytest.approx(9 / 49 + 1, rel=1e-12)
    assert theorem43_bound(shifted, per_sample) == pytest.approx((12 ** 2 + 17 ** 2) / 49, rel=1e-12)  # [0, 12], [0, 17]
    with pytest.raises(ValueError, match="at least 1 bit"):
        theorem43_own_range_bound(x, QuantSpec(bits=0, granularity="sample"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_theorem43_allows_float_rounding_where_the_error_equals_the_bound(dtype: torch.dtype) -> None:
    """Two values half a step off the grid (a 2-bit range of 3 steps whose zero point rounds at a tie): the
    error equals s^2 d / 4 exactly in exact arithmetic, and float32 rounding puts some margins a hair below 0;
    those must not count as failures (a slack of 64 ulps of the dtype)."""
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(400):
        s, k = float(torch.empty(1).uniform_(0.01, 10, generator=gen)), int(torch.randint(0, 3, (1,), generator=gen))
        lo = -(k + 0.5) * s
        steps.append(torch.tensor([[lo, lo + 3 * s]], dtype=torch.float64))
    identity = nn.Linear(2, 2, bias=False, dtype=torch.float64)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(2))
    frame = error_frame(torch.stack(steps), identity, QuantSpec(bits=2, granularity="tensor"), "direct",
                        warmup_steps=0, dtype=dtype)
    assert frame["thm43_holds"].all()
    eps = torch.finfo(dtype).eps
    assert (frame["thm43_margin"].abs() <= 16 * eps * frame["thm43_bound"]).all()  # error = bound, to rounding
    if dtype == torch.float32:
        assert (frame["thm43_margin"] < 0).any()  # the case the slack is for occurs


def test_empirical_c_is_nan_safe_and_skip_steps() -> None:
    xs = [torch.ones(1, 3, 4, 4)] * 4  # residuals are exactly 0 after the first step
    frame = error_frame(xs, _conv(), A4, "modiff")
    assert frame["c_t"].isna().all() and (frame["err"] == 0).all()
    cached = error_frame(_inputs(5), _conv(), A4, "cache", cache_interval=2)
    assert list(cached["refreshed"]) == [False, False, True, False, True]
    assert (cached.loc[[1, 3], "c_t"] == 1.0).all()  # skipped: Q(r) = 0
    assert frame["paper_t"].tolist() == [4, 3, 2, 1]


def test_bits_zero_and_callable_quantizers() -> None:
    xs = _inputs(4)
    skip = error_frame(xs, _conv(), QuantSpec(bits=0), "modiff")
    cache = error_frame(xs, _conv(), None, "cache", cache_interval=100)
    assert skip["err_sq"].tolist() == pytest.approx(cache["err_sq"].tolist(), rel=1e-12)
    half = error_frame(xs, _conv(), lambda x: 0.5 * x, "direct")
    assert half["c_t"].iloc[1:].tolist() == pytest.approx([0.25] * 3) and half["thm43_bound"].isna().all()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        simulate(_inputs(2), _conv(), A4, "fancy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_interval"):
        simulate(_inputs(2), _conv(), A4, "cache")
    with pytest.raises(ValueError, match="cache_interval only"):
        simulate(_inputs(2), _conv(), A4, "modiff", cache_interval=2)
    with pytest.raises(TypeError, match="expected nn.Linear"):
        linear_operator(nn.ReLU())
    with pytest.raises(TypeError, match="quantizer must be"):
        simulate(_inputs(2), _conv(), 4, "modiff")  # type: ignore[arg-type]
    assert math.isfinite(operator_norm(nn.Conv2d(1, 1, 1, bias=False), (1, 1, 2, 2)))
