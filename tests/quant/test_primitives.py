"""Numerics of modiff.quant.primitives, pinned against hand-computed values and PyTorch's kernels."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from modiff.quant.primitives import (
    MIN_SCALE,
    QuantSpec,
    fake_quantize,
    qparams_from_range,
    quant_error_bound,
    quantize_dynamic,
    reduce_dims,
    reduce_range,
    round_ste,
    weight_qparams,
)


def student_t(shape: tuple[int, ...], df: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded Student-t samples: Z / sqrt(chi2_df / df) from normals only."""
    z = torch.randn(shape, generator=gen)
    chi2 = torch.randn((df, *shape), generator=gen).square().sum(0)
    return z / (chi2 / df).sqrt()


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def dynamic_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return qparams_from_range(*reduce_range(x, spec), spec)


# --- specs -------------------------------------------------------------------------------------------


def test_grid_ends() -> None:
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (0, 15)
    assert (QuantSpec(bits=3, scheme="symmetric").qmin, QuantSpec(bits=3, scheme="symmetric").qmax) == (-3, 3)
    published = QuantSpec(bits=3, scheme="symmetric-published")
    assert (published.qmin, published.qmax) == (-4, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"bits": 1}, ValueError, ["0 (skip", "[2, 16]", "got 1"]),
        ({"bits": 17}, ValueError, ["[2, 16]", "got 17"]),
        ({"bits": 4.0}, TypeError, ["bits", "int"]),
        ({"bits": True}, TypeError, ["bits", "int"]),
        ({"scheme": "foo"}, ValueError, ["'asymmetric'", "'symmetric'", "'symmetric-published'", "'foo'"]),
        ({"rounding": "up"}, ValueError, ["'nearest'", "'floor'", "'up'"]),
        ({"granularity": "row"}, ValueError, ["'tensor'", "'sample'", "'channel'", "'token'", "'group'", "'row'"]),
        ({"granularity": "group"}, ValueError, ["group_size > 0", "got 0"]),
        ({"granularity": "channel", "group_size": 4}, ValueError, ["group_size=4", "'group'"]),
    ],
)
def test_invalid_specs_raise_naming_allowed_values(kwargs: dict, error: type, words: list[str]) -> None:
    with pytest.raises(error) as info:
        QuantSpec(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_group_size_must_divide_channels() -> None:
    spec = QuantSpec(bits=4, granularity="group", group_size=3)
    with pytest.raises(ValueError, match=r"4 channels .* not divisible by group_size=3"):
        quantize_dynamic(torch.randn(2, 4, 3, 3), spec)


def test_channel_axis_out_of_range() -> None:
    with pytest.raises(ValueError, match="channel_axis=3 is out of range for a 2-D tensor"):
        reduce_range(torch.randn(2, 3), QuantSpec(granularity="channel", channel_axis=3))


# --- hand-computed values ----------------------------------------------------------------------------


def test_asymmetric_2bit_hand_values_and_tie_rule() -> None:
    spec = QuantSpec(bits=2)
    x = t(-1.0, 0.0, 0.5, 2.0)
    scale, zero_point = dynamic_qparams(x, spec)
    assert scale.item() == 1.0 and zero_point.item() == 1.0  # s = 3 / 3, z = round(1 / 1)
    # ties are broken on x / s, before z is added (as PyTorch's kernels): round(0.5) = 0 (half to
    # even), code 0 + z = 1, so Q(0.5) = 0, not 1 (rounding 0.5 / s + z = 1.5 would give 1)
    assert torch.equal(quantize_dynamic(x, spec), t(-1.0, 0.0, 0.0, 2.0))
    # round(1.5) = 2 -> Q = 2; round(-1.5) = -2, code -1 clamped to 0 -> Q = -1; round(-0.5) = 0 -> 0
    assert torch.equal(fake_quantize(t(1.5, -1.5, -0.5, 0.4), scale, zero_point, spec), t(2.0, -1.0, 0.0, 0.0))


def test_asymmetric_range_widened_to_zero() -> None:
    # all-positive range [2, 5]: the published/PyTorch convention widens it to [0, 5]
    scale, zero_point = qparams_from_range(t(2.0), t(5.0), QuantSpec(bits=2))
    assert torch.allclose(scale, t(5.0 / 3)) and zero_point.item() == 0.0
    scale, zero_point = qparams_from_range(t(-6.0), t(-3.0), QuantSpec(bits=2))
    assert scale.item() == 2.0 and zero_point.item() == 3.0
    scale, zero_point = qparams_from_range(t(-1.75), t(1.25), QuantSpec(bits=2))
    assert scale.item() == 1.0 and zero_point.item() == 2.0  # z = round(1.75), not floor


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_qparams_match_torch_ao_observer(bits: int) -> None:
    from torch.ao.quantization import MinMaxObserver as TorchMinMax

    for seed in range(4):
        x = torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * 3 + 0.7
        ref = TorchMinMax(dtype=torch.quint8, quant_min=0, quant_max=2**bits - 1)
        ref(x)
        scale_ref, zero_point_ref = ref.calculate_qparams()
        scale, zero_point = qparams_from_range(x.min(), x.max(), QuantSpec(bits=bits))
        assert torch.equal(scale.reshape(1), scale_ref) and torch.equal(zero_point.reshape(1).int(), zero_point_ref)


def test_symmetric_3bit_restricted_vs_published_grid() -> None:
    x = t(-5.0, -3.6, -2.4, 0.4, 3.0, 3.7)
    for scheme in ("symmetric", "symmetric-published"):
        scale, zero_point = qparams_from_range(t(-2.0), t(3.0), QuantSpec(bits=3, scheme=scheme))
        assert scale.item() == 1.0 and zero_point.item() == 0.0  # absmax 3 / (2^2 - 1)
    one, zero = t(1.0), t(0.0)
    restricted = fake_quantize(x, one, zero, QuantSpec(bits=3, scheme="symmetric"))
    published = fake_quantize(x, one, zero, QuantSpec(bits=3, scheme="symmetric-published"))
    assert torch.equal(restricted, t(-3.0, -3.0, -2.0, 0.0, 3.0, 3.0))
    assert torch.equal(published, t(-4.0, -4.0, -2.0, 0.0, 3.0, 3.0))


def test_floor_vs_nearest() -> None:
    x = t(0.9, -0.1, 1.3, 2.25)
    scale, zero = t(0.5), t(0.0)
    nearest = fake_quantize(x, scale, zero, QuantSpec(bits=4, scheme="symmetric"))
    floor = fake_quantize(x, scale, zero, QuantSpec(bits=4, scheme="symmetric", rounding="floor"))
    assert torch.equal(nearest, t(1.0, 0.0, 1.5, 2.0))  # codes 1.8, -0.2, 2.6, 4.5 (tie -> 4)
    assert torch.equal(floor, t(0.5, -0.5, 1.0, 2.0))


# x[b, c, 0, w] = 8 b + 2 c + w - 8, values -8..7; symmetric 2-bit makes each scale equal its group's absmax.
HAND = torch.arange(16, dtype=torch.float32).reshape(2, 4, 1, 2) - 8


@pytest.mark.parametrize(
    ("granularity", "group_size", "expected"),
    [
        ("tensor", 0, torch.full((1, 1, 1, 1), 8.0)),
        ("sample", 0, t(8, 7).reshape(2, 1, 1, 1)),
        ("channel", 0, t(8, 6, 5, 7).reshape(1, 4, 1, 1)),
        ("token", 0, t(8, 7, 6, 7).reshape(2, 1, 1, 2)),
        ("group", 2, t(8, 8, 4, 4, 3, 3, 7, 7).reshape(2, 4, 1, 1)),
    ],
)
def test_granularity_scales_on_hand_tensor(granularity: str, group_size: int, expected: torch.Tensor) -> None:
    spec = QuantSpec(bits=2, scheme="symmetric", granularity=granularity, group_size=group_size)
    scale, zero_point = dynamic_qparams(HAND, spec)
    assert scale.shape == expected.shape
    assert torch.equal(scale, expected)
    assert torch.equal(zero_point, torch.zeros_like(expected))
    # 2-bit symmetric grid {-s, 0, s}: each group's absmax element is exact
    assert fake_quantize(HAND, scale, zero_point, spec).shape == HAND.shape


def test_reduce_dims() -> None:
    x = torch.zeros(2, 4, 3, 5)
    assert reduce_dims(x, QuantSpec(granularity="tensor")) == (0, 1, 2, 3)
    assert reduce_dims(x, QuantSpec(granularity="sample")) == (1, 2, 3)
    assert reduce_dims(x, QuantSpec(granularity="channel")) == (0, 2, 3)
    assert reduce_dims(x, QuantSpec(granularity="channel", channel_axis=0)) == (1, 2, 3)
    assert reduce_dims(x, QuantSpec(granularity="token")) == (1,)
    assert reduce_dims(torch.zeros(2, 7, 4), QuantSpec(granularity="token", channel_axis=-1)) == (2,)
    # group: dims of the grouped view (2, 2, 2, 3, 5): all but the sample and the group index
    assert reduce_dims(x, QuantSpec(granularity="group", group_size=2)) == (2, 3, 4)


def test_token_granularity_3d_and_2d() -> None:
    x = torch.tensor([[[1.0, -3.0], [0.5, 0.25]], [[2.0, 0.0], [-4.0, 1.0]]])  # (B=2, N=2, C=2)
    spec = QuantSpec(bits=2, scheme="symmetric", granularity="token", channel_axis=-1)
    scale, _ = dynamic_qparams(x, spec)
    assert torch.equal(scale, t(3.0, 0.5, 2.0, 4.0).reshape(2, 2, 1))
    scale, _ = dynamic_qparams(x[:, 0], QuantSpec(bits=2, scheme="symmetric", granularity="token"))
    assert torch.equal(scale, t(3.0, 2.0).reshape(2, 1))  # (B, C): one per sample


def test_weight_per_output_channel_minmax_by_hand() -> None:
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.1, 0.2, 0.3]])
    scale, zero_point = weight_qparams(w, QuantSpec(bits=8, granularity="channel", channel_axis=0))
    assert scale.shape == (2, 1)
    assert torch.allclose(scale, torch.tensor([[3.0 / 255], [0.3 / 255]]))
    assert torch.equal(zero_point, torch.tensor([[85.0], [0.0]]))  # round(1 / (3/255)) = 85; [0, 0.3]
    w4 = torch.randn(6, 3, 3, 3)
    scale, _ = weight_qparams(w4, QuantSpec(bits=4, granularity="channel", channel_axis=0))
    assert scale.shape == (6, 1, 1, 1)


def test_quant_error_bound_by_hand() -> None:
    x_min, x_max = t(-1.0), t(2.0)
    assert quant_error_bound(x_min, x_max, 4, QuantSpec(bits=2)).item() == 1.0  # s = 1: s^2 d / 4
    assert quant_error_bound(x_min, x_max, 4, QuantSpec(bits=2, rounding="floor")).item() == 4.0
    # two groups of 3 elements: (1^2 + 2^2) * 3 / 4
    bound = quant_error_bound(t(-1.0, -2.0), t(2.0, 4.0), 6, QuantSpec(bits=2, granularity="sample"))
    assert bound.item() == pytest.approx(15.0 / 4)
    assert quant_error_bound(t(-1.0), t(3.0), 5, QuantSpec(bits=0)).item() == 45.0  # Q = 0: absmax^2 d


# --- agreement with PyTorch ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 17))
def test_matches_torch_per_tensor(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 8, 16, 16, generator=gen) * 3 + 0.5
    for scheme in ("asymmetric", "symmetric-published"):
        spec = QuantSpec(bits=bits, scheme=scheme)
        scale, zero_point = dynamic_qparams(x, spec)
        ours = quantize_dynamic(x, spec)
        ref = torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()), zero_point.reshape(()).to(torch.int32), spec.qmin, spec.qmax
        )
        assert torch.equal(ours, ref), (scheme, (ours != ref).sum())
    # ties pinned too: values exactly on half steps, with and without a zero point
    halves = torch.arange(-20, 20, dtype=torch.float32) * 0.5
    for scheme, zero_point in (("symmetric-published", 0), ("asymmetric", 3)):
        spec = QuantSpec(bits=bits, scheme=scheme)
        ref = torch.fake_quantize_per_tensor_affine(halves, 1.0, zero_point, spec.qmin, spec.qmax)
        assert torch.equal(fake_quantize(halves, t(1.0), t(float(zero_point)), spec), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 12, 16])
def test_matches_torch_per_channel(bits: int) -> None:
    gen = torch.Generator().manual_seed(100 + bits)
    w = torch.randn(8, 5, 3, 3, generator=gen) * torch.rand(8, 1, 1, 1, generator=gen) * 4 + 0.3
    a = torch.randn(3, 6, 7, 7, generator=gen) + torch.arange(6).reshape(1, 6, 1, 1)
    for x, axis in ((w, 0), (a, 1)):
        for scheme in ("asymmetric", "symmetric-published"):
            spec = QuantSpec(bits=bits, scheme=scheme, granularity="channel", channel_axis=axis)
            scale, zero_point = dynamic_qparams(x, spec)
            ref = torch.fake_quantize_per_channel_affine(
                x, scale.flatten(), zero_point.flatten().to(torch.int32), axis, spec.qmin, spec.qmax
            )
            assert torch.equal(fake_quantize(x, scale, zero_point, spec), ref)


def test_lsq_gradients_match_torch_learnable_fake_quant() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=gen) * 2
    spec = QuantSpec(bits=4)
    grads = []
    for fn in (
        lambda a, s, z: torch._fake_quantize_learnable_per_tensor_affine(a, s, z, 0, 15, 1.0),
        lambda a, s, z: fake_quantize(a, s, z, spec),
    ):
        xr, s, z = x.clone().requires_grad_(), t(0.2).requires_grad_(), t(5.0).requires_grad_()
        fn(xr, s, z).sum().backward()
        grads.append((xr.grad, s.grad, z.grad))
    (gx_ref, gs_ref, gz_ref), (gx, gs, gz) = grads
    assert torch.equal(gx, gx_ref)  # includes codes landing exactly on qmin/qmax (gradient 1)
    assert torch.allclose(gs, gs_ref, rtol=1e-5) and torch.allclose(gz, gz_ref, rtol=1e-5)


# --- STE --------------------------------------------------------------------------------------------


def test_ste_gradient_wrt_x_and_lsq_wrt_scale() -> None:
    spec = QuantSpec(bits=3, scheme="symmetric")  # grid [-3, 3] with s = 0.5: range [-1.5, 1.5]
    x = t(-2.0, -1.5, -0.3, 0.0, 0.26, 1.5, 1.74, 1.76, 3.0).requires_grad_()
    scale = t(0.5).requires_grad_()
    fake_quantize(x, scale, t(0.0), spec).sum().backward()
    inside = t(0, 1, 1, 1, 1, 1, 1, 0, 0)  # code round(x / s) within [-3, 3]; 1.74 -> 3, 1.76 -> 4
    assert torch.allclose(x.grad, inside, atol=1e-6)
    # LSQ: round(v) - v inside, qmin or qmax outside (v = x / s)
    v = x.detach() / 0.5
    expected = torch.where(inside.bool(), torch.round(v) - v, torch.clamp(torch.round(v), -3, 3)).sum()
    assert scale.grad is not None and torch.isfinite(scale.grad).all()
    assert torch.allclose(scale.grad, expected, atol=1e-5)


def test_round_ste() -> None:
    x = t(0.4, 0.5, 1.5, -2.5).requires_grad_()
    y = round_ste(x)
    assert torch.equal(y.detach(), t(0.0, 0.0, 2.0, -2.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


# --- edge cases -------------------------------------------------------------------------------------


def test_16_bits_is_nearly_exact_and_0_bits_is_zero() -> None:
    x = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    for granularity in ("tensor", "sample", "channel"):
        q = quantize_dynamic(x, QuantSpec(bits=16, granularity=granularity))
        assert ((q - x).norm() / x.norm()).item() < 1e-4
    zero = QuantSpec(bits=0)
    assert torch.equal(quantize_dynamic(x, zero), torch.zeros_like(x))
    assert torch.equal(fake_quantize(x, t(0.1), t(3.0), zero), torch.zeros_like(x))


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "symmetric-published"])
@pytest.mark.parametrize("granularity", ["tensor", "sample", "channel"])
def test_constant_zero_and_exact_zeros(scheme: str, granularity: str) -> None:
    for bits in (2, 4, 8, 16):
        spec = QuantSpec(bits=bits, scheme=scheme, granularity=granularity)
        zeros = torch.zeros(2, 3, 4)
        assert torch.equal(quantize_dynamic(zeros, spec), zeros)
        const = torch.full((2, 3, 4), -2.5)
        q = quantize_dynamic(const, spec)
        assert torch.isfinite(q).all() and torch.allclose(q, const, rtol=0.5)
        mixed = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(bits))
        mixed[:, :, ::2] = 0.0
        assert (quantize_dynamic(mixed, spec)[:, :, ::2] == 0).all()  # Q(0) = 0 exactly
    scale, _ = qparams_from_range(t(0.0), t(0.0), QuantSpec(bits=8, scheme=scheme))
    assert scale.item() == pytest.approx(MIN_SCALE)


def test_low_precision_input_keeps_dtype() -> None:
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    q = quantize_dynamic(x, QuantSpec(bits=8, granularity="sample"))
    assert q.dtype == torch.bfloat16 and torch.isfinite(q.float()).all()


def test_per_sample_result_does_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 3, 6, 6, generator=gen)
    other = batch.clone()
    other[1:] = other[1:] * 50 + 7  # the rest of the batch changes, sample 0 does not
    per_sample = QuantSpec(bits=4, granularity="sample")
    assert torch.equal(quantize_dynamic(batch, per_sample)[0], quantize_dynamic(other, per_sample)[0])
    per_tensor = QuantSpec(bits=4, granularity="tensor")
    assert not torch.equal(quantize_dynamic(batch, per_tensor)[0], quantize_dynamic(other, per_tensor)[0])


def test_samples_per_scale_quantizes_as_separate_batches() -> None:
    """Runs of g consecutive samples share a scale: a batch of 10 with g = 4 quantizes as the batches 4, 4
    and 2 (the last run shorter), scales by hand for a tiny case, and the Theorem 4.3 bound per sample."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 3, 4, 4, generator=gen) * torch.arange(1, 11.0).view(10, 1, 1, 1)
    grouped = QuantSpec(bits=4, scheme="symmetric-published", granularity="tensor", samples_per_scale=4)
    whole = QuantSpec(bits=4, scheme="symmetric-published", granularity="tensor")
    alone = torch.cat([quantize_dynamic(x[i:i + 4], whole) for i in range(0, 10, 4)])
    assert torch.equal(quantize_dynamic(x, grouped), alone)
    x_min, x_max = reduce_range(t(1, -2, 3, -8, 5).view(5, 1), replace(grouped, samples_per_scale=2))
    assert x_min.flatten().tolist() == [-2, -2, -8, -8, 5] and x_max.flatten().tolist() == [1, 1, 3, 3, 5]
    assert torch.equal(quantize_dynamic(x[:3], grouped), quantize_dynamic(x[:3], whole))  # fewer than g: one run
    err = (x - quantize_dynamic(x, grouped)).square().sum()
    assert err <= quant_error_bound(*reduce_range(x, grouped), x.numel(), grouped)


@pytest.mark.parametrize("kwargs", [dict(granularity="sample", samples_per_scale=4),
                                    dict(granularity="tensor", samples_per_scale=-1)])
def test_samples_per_scale_needs_tensor_granularity(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="samples_per_scale=.* needs granularity 'tensor'"):
        QuantSpec(bits=4, **kwargs)


# --- Theorem 4.3 ------------------------------------------------------------------------------------


def _inputs(bits: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(bits)
    shape = (4, 3, 6, 6)
    normal = torch.randn(shape, generator=gen)
    student = student_t(shape, 2, gen)
    cauchy = torch.empty(shape).cauchy_(generator=gen).clamp(-1e4, 1e4)
    levels = 2**bits - 1  # asymmetric range [0, levels] gives s = 1: every value below is on a half step
    halves = (torch.arange(4 * 3 * 36) % levels + 0.5).reshape(shape)
    halves[:, 0, 0, 0], halves[:, 0, 0, 1] = 0.0, float(levels)
    below_integers = halves + 0.499  # worst case for floor: error just below s
    outlier = normal * 0.01
    outlier[1, 2, 3, 4] = 1000.0
    return {
        "normal": normal,
        "student-t": student,
        "cauchy": cauchy,
        "half-steps": halves,
        "below-integers": below_integers,
        "constant": torch.full(shape, 0.7),
        "zeros": torch.zeros(shape),
        "outlier": outlier,
    }


@pytest.mark.parametrize("bits", range(2, 9))
def test_theorem_4_3_bound_holds(bits: int) -> None:
    for name, x in _inputs(bits).items():
        for scheme in ("asymmetric", "symmetric", "symmetric-published"):
            for rounding in ("nearest", "floor"):
                for granularity in ("tensor", "sample"):
                    spec = QuantSpec(bits=bits, scheme=scheme, rounding=rounding, granularity=granularity)
                    x_min, x_max = reduce_range(x, spec)
                    err = (x.double() - quantize_dynamic(x, spec).double()).square().sum()
                    bound = quant_error_bound(x_min, x_max, x.numel(), spec).double()
                    # float32 rounding only: equality cases (half steps) may exceed by an ulp or so
                    assert err <= bound * (1 + 1e-5) + 1e-30, (name, scheme, rounding, granularity, err, bound)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_theorem_4_3_bound_is_tight_on_half_steps(bits: int) -> None:
    x = _inputs(bits)["half-steps"]
    spec = QuantSpec(bits=bits)
    err = (x - quantize_dynamic(x, spec)).square().sum()
    bound = quant_error_bound(*reduce_range(x, spec), x.numel(), spec)
    assert err >= 0.5 * bound  # nearly every element sits exactly s / 2 from the grid


# --- weight MSE search --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric-published"])
def test_weight_mse_not_worse_than_minmax_per_channel(scheme: str) -> None:
    gen = torch.Generator().manual_seed(5)
    w = student_t((16, 8, 3, 3), 3, gen) * torch.rand(16, 1, 1, 1, generator=gen)
    spec = QuantSpec(bits=4, scheme=scheme, granularity="channel", channel_axis=0)

    def per_channel_error(method: str) -> torch.Tensor:
        scale, zero_point = weight_qparams(w, spec, method=method)
        return (w - fake_quantize(w, scale, zero_point, spec)).square().flatten(1).sum(1)

    minmax, mse = per_channel_error("minmax"), per_channel_error("mse")
    assert (mse <= minmax * (1 + 1e-6)).all()
    assert (mse < minmax * 0.95).any()  # heavy tails: clipping helps on some channels
    s_minmax, _ = weight_qparams(w, spec, method="minmax")
    s_mse, _ = weight_qparams(w, spec, method="mse")
    assert (s_mse <= s_minmax * (1 + 1e-6)).all()


def test_weight_mse_group_granularity_keeps_groups_consistent() -> None:
    w = student_t((4, 8), 2, torch.Generator().manual_seed(6))
    spec = QuantSpec(bits=3, granularity="group", group_size=4, channel_axis=1)
    scale, _ = weight_qparams(w, spec, method="mse")
    assert scale.shape == (4, 8)
    assert torch.equal(scale[:, :4], scale[:, :1].expand(4, 4)) and torch.equal(scale[:, 4:], scale[:, 4:5].expand(4, 4))


def test_weight_method_validated() -> None:
    with pytest.raises(ValueError, match=r"method must be one of \('minmax', 'mse'\), got 'l1'"):
        weight_qparams(torch.randn(2, 3), QuantSpec(granularity="channel", channel_axis=0), method="l1")  # type: ignore[arg-type]
