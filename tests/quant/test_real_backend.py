"""The real backend's configuration, the FP8 e4m3 format of the simulator, and the fallback to the simulator.

These run on the CPU without Triton: the real layers then compute with the simulator's forward, which must give
the simulator's outputs bit for bit. The kernels themselves are tested in tests/quant/kernels/test_real_kernels.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import modiff as md
from modiff.quant import ActQuant, QuantConfig, QuantSpec, WeightQuant, presets, quantize, trajectory
from modiff.quant.api import layer_class
from modiff.quant.config import REAL_SUPPORT, recorded_backend
from modiff.quant.formats import FP8_MAX, fake_quantize_fp8, fp8_codes, fp8_scale, quantize_dynamic_fp8
from modiff.quant.layers import real as real_layers
from modiff.quant.kernels.real import pack_weight_int4
from modiff.quant.layers.real import RealModulatedLayer, RealQuantLayer
from modiff.quant.presets import preset_table

REAL = ["w8a8-int8-real", "w8a8-int8-modiff-real", "w8a8-fp8-real", "w8a8-fp8-modiff-real", "w4a8-int8-real",
        "w4a8-int8-modiff-real"]


@pytest.mark.parametrize("name", REAL)
def test_fallback_equals_the_simulator_bit_for_bit(tiny_denoiser: md.Denoiser, name: str) -> None:
    """Off CUDA the real layers run the simulator's forward: a whole trajectory equals the simulator's exactly."""
    assert not real_layers.use_real_kernels(torch.zeros(1))
    real, sim = quantize(tiny_denoiser, presets[name]), quantize(tiny_denoiser, presets[name].simulated())
    assert any(isinstance(m, (RealQuantLayer, RealModulatedLayer)) for m in real.modules())
    x_T, ts = md.noise(range(3), tiny_denoiser.sample_shape), md.timesteps(6)
    real_eps, sim_eps = [], []
    with trajectory(real):
        md.sample_ddim(real, x_T, ts, callback=lambda s: real_eps.append(s.eps))
    with trajectory(sim):
        md.sample_ddim(sim, x_T, ts, callback=lambda s: sim_eps.append(s.eps))
    for a, b in zip(real_eps, sim_eps):
        assert torch.equal(a, b)


def test_real_presets_and_their_simulated_references() -> None:
    for name, number_format, weight_bits in (("w8a8-int8", "int", 8), ("w8a8-fp8", "fp8_e4m3", 8),
                                             ("w4a8-int8", "int", 4)):
        for suffix, mode in (("", "direct"), ("-modiff", "modulated")):
            real, sim = presets[f"{name}{suffix}-real"], presets[f"{name}{suffix}"]
            assert (real.backend, sim.backend, real.mode, real.format) == ("real", "simulated", mode, number_format)
            assert (real.weight.spec.bits, real.weight.spec.scheme, real.activation.spec.bits) == (
                weight_bits, "symmetric", 8)
            assert real.simulated() == sim
    assert layer_class(presets["w8a8-int8-real"]) is RealQuantLayer
    assert layer_class(presets["w8a8-fp8-modiff-real"]) is RealModulatedLayer
    rows = {row["preset"]: row for row in preset_table()}
    assert rows["w8a8-fp8-modiff-real"]["backend"] == "real" and rows["w4a4"]["backend"] == "simulated"


def test_to_dict_records_the_backend_and_keeps_old_identities() -> None:
    """Configs recorded before the backend existed keep their dicts (run identities, calibration digests); a
    real one records it, and both read back."""
    old = presets["w4a4-modiff"].to_dict()
    assert not {"backend", "format", "state_dtype"} & set(old) and recorded_backend(old) == "simulated"
    real = presets["w8a8-fp8-modiff-real"].to_dict()
    assert (real["backend"], real["format"]) == ("real", "fp8_e4m3") and recorded_backend(real) == "real"
    assert QuantConfig.from_dict(real) == presets["w8a8-fp8-modiff-real"]
    assert recorded_backend(None) is None


def _real(**changes) -> QuantConfig:
    return dataclasses.replace(presets["w8a8-int8-modiff-real"], **changes)


@pytest.mark.parametrize("changes, named", [
    (dict(mode="cache", cache_interval=2), "mode='cache'"),
    (dict(compensation=False), "compensation=False"),
    (dict(weight=WeightQuant(QuantSpec(bits=6, scheme="symmetric", granularity="channel", channel_axis=0))),
     "weight=WeightQuant"),
    (dict(weight=WeightQuant(QuantSpec(bits=8, granularity="channel", channel_axis=0))), "weight=WeightQuant"),
    (dict(weight=WeightQuant(QuantSpec(bits=4, scheme="symmetric", granularity="tensor"))), "weight=WeightQuant"),
    (dict(weight=WeightQuant(QuantSpec(bits=4, scheme="symmetric", granularity="channel", channel_axis=0,
                                       rounding="floor"))), "weight=WeightQuant"),
    (dict(weight=None), "weight=None"),
    (dict(activation=ActQuant(QuantSpec(bits=8, granularity="sample"))), "activation=ActQuant"),
    (dict(activation=ActQuant(QuantSpec(bits=8, scheme="symmetric", granularity="channel"))), "activation=ActQuant"),
    (dict(activation=ActQuant(QuantSpec(bits=8, scheme="symmetric", granularity="sample"), dynamic=False)),
     "activation=ActQuant"),
    (dict(layer_types=("Conv1d", "Conv2d", "Linear")), "Conv1d"),
    (dict(split_shortcut=True), "split_shortcut=True"),
    (dict(quantize_attention=True), "quantize_attention=True"),
])
def test_real_refuses_what_no_kernel_computes(changes: dict, named: str) -> None:
    with pytest.raises(ValueError) as err:
        _real(**changes)
    assert REAL_SUPPORT in str(err.value) and named in str(err.value)


def test_fp8_refuses_other_specs_and_bad_values() -> None:
    with pytest.raises(ValueError, match="format 'fp8_e4m3' needs activations with bits=8, scheme='symmetric'"):
        dataclasses.replace(presets["w8a8-fp8"], activation=ActQuant(QuantSpec(bits=8, granularity="sample")))
    with pytest.raises(ValueError, match="format 'fp8_e4m3' takes min-max weight scales"):
        dataclasses.replace(presets["w8a8-fp8"], weight=dataclasses.replace(presets["w8a8-fp8"].weight, method="mse"))
    with pytest.raises(ValueError, match="backend must be one of simulated, real; got 'cuda'"):
        QuantConfig(backend="cuda")
    with pytest.raises(ValueError, match="state_dtype must be one of auto, float32, bfloat16"):
        QuantConfig(state_dtype="fp16")


def test_real_refuses_grouped_convolutions() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1, dilation=1 and numeric padding; got groups=2"):
        quantize(model, presets["w8a8-int8-real"])


def test_fp8_fake_quantizer_is_the_e4m3_cast() -> None:
    """Q(x) = s e4m3(x / s): every value of x / s on the e4m3 grid, the cast's round to nearest even, the
    per-sample absmax maps to 448, and the error is within the format's bound."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 0.0]).view(4, 1, 1, 1)
    spec = QuantSpec(bits=8, scheme="symmetric", granularity="sample")
    q = quantize_dynamic_fp8(x, spec)
    scale = fp8_scale(x.abs().amax(dim=(1, 2, 3), keepdim=True), x.abs().amax(dim=(1, 2, 3), keepdim=True))
    codes = fp8_codes(x, scale).float()
    assert torch.equal(q, codes * scale)
    assert torch.equal(codes, torch.clamp(x * scale.reciprocal(), -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float())
    assert torch.equal(codes.abs().amax(dim=(1, 2, 3))[:3], torch.full((3,), FP8_MAX))
    assert torch.equal(q[3], torch.zeros_like(q[3]))  # an all-zero sample: s = MIN_SCALE, Q = 0
    normal = (x / scale).abs() >= 2**-6
    err = (x - q).abs()
    assert torch.all(err[normal] <= 2**-4 * x.abs()[normal])
    assert torch.all(err[~normal] <= (scale * 2**-10).expand_as(x)[~normal])
    ties = torch.tensor([1.0625, 1.1875, 17.0, 232.0, 2**-10])  # halfway between e4m3 neighbours: to even
    assert torch.equal(fake_quantize_fp8(ties, torch.tensor(1.0)), torch.tensor([1.0, 1.25, 16.0, 224.0, 0.0]))


def test_fp8_simulated_layers_use_fp8_weights_and_residuals(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, presets["w8a8-fp8-modiff"])
    layer = next(m for m in qmodel.modules() if hasattr(m, "weight_q") and m.weight.ndim == 4)
    codes = fp8_codes(layer.weight, layer.weight_scale).float()
    assert torch.equal(layer.weight_q, codes * layer.weight_scale)
    assert torch.equal(codes.abs().flatten(1).amax(dim=1), torch.full((codes.shape[0],), FP8_MAX))
    with pytest.raises(ValueError, match="fp8_e4m3 weights: its values are not integer codes"):
        layer.weight_codes()


def test_state_dtype_sets_the_simulator_state(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, dataclasses.replace(presets["w8a8-int8-modiff"], state_dtype="bfloat16"))
    with trajectory(qmodel) as states:
        qmodel(md.noise(range(2), tiny_denoiser.sample_shape), torch.tensor([500, 500]))
        assert {s.a_hat.dtype for s in states} == {torch.bfloat16}


def test_loading_a_state_dict_packs_the_loaded_weights() -> None:
    """The kernels' packed codes follow a loaded weight_q, so both paths compute with one weight."""
    torch.manual_seed(0)
    source, target = (quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), presets["w8a8-int8-real"]) for _ in range(2))
    target[0].weight_scale.copy_(source[0].weight_scale)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target[0].weight_packed, source[0].weight_packed)


def test_real_takes_4_bit_weights_of_any_grid_in_int_only() -> None:
    """W4A8: any 4-bit per-channel grid (the kernel subtracts a per-channel zero point) and AdaRound codes; in
    format 'fp8_e4m3' the weights are e4m3 values, which have 8 bits."""
    for scheme in ("symmetric", "asymmetric", "symmetric-published"):
        for codes in ("nearest", "adaround"):
            weights = WeightQuant(QuantSpec(bits=4, scheme=scheme, granularity="channel", channel_axis=0), codes=codes)
            assert _real(weight=weights).weight.spec.bits == 4
    with pytest.raises(ValueError, match="format 'fp8_e4m3' needs weights with bits=8"):
        dataclasses.replace(presets["w8a8-fp8-modiff-real"], weight=presets["w4a8-int8-real"].weight)


def test_4_bit_weights_pack_two_per_byte_tap_by_tap() -> None:
    """Hand-packed: a Conv2d weight of 2 output channels, 3 input channels (odd: one zero nibble of padding per
    tap) and 1x2 taps with symmetric codes in [-7, 7] (nibble q + 7, offset z + 7), and a Linear weight with
    asymmetric codes in [0, 15] (nibble q, offset z)."""
    codes = torch.tensor([[[[-7, 7]], [[0, 1]], [[2, -3]]],
                          [[[7, 7]], [[-7, -7]], [[0, 0]]]], dtype=torch.float32)  # (2, 3, 1, 2)
    packed, offset = pack_weight_int4(codes, torch.zeros(2, 1, 1, 1), qmin=-7)
    # tap 0 reads channels (-7, 0, 2) + 7 = (0, 7, 9) -> bytes 0 | 7 << 4, 9 | pad; tap 1: (14, 8, 4) -> 14 | 8 << 4, 4
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0 | 7 << 4, 9, 14 | 8 << 4, 4],
                                                              [14 | 0 << 4, 7, 14 | 0 << 4, 7]]
    assert offset.dtype == torch.int32 and offset.tolist() == [7, 7]
    linear, zero_point = torch.tensor([[15.0, 0.0, 3.0, 12.0]]), torch.tensor([[5.0]])
    packed, offset = pack_weight_int4(linear, zero_point, qmin=0)
    assert packed.tolist() == [[15 | 0 << 4, 3 | 12 << 4]] and offset.tolist() == [5]


def test_4_bit_packing_refuses_codes_off_the_grid() -> None:
    with pytest.raises(ValueError, match=r"codes must be integers in \[-7, 8\]; got values in \[-7.0, 9.0\]"):
        pack_weight_int4(torch.tensor([[-7.0, 9.0]]), torch.zeros(1, 1), qmin=-7)
    with pytest.raises(ValueError, match="must be integers"):
        pack_weight_int4(torch.tensor([[0.5, 1.0]]), torch.zeros(1, 1), qmin=0)


def test_real_4_bit_layers_pack_their_codes(tiny_denoiser: md.Denoiser) -> None:
    """Every layer of a W4A8 model holds its weight codes nibble-packed, and unpacking gives weight_codes() - z."""
    qmodel = quantize(tiny_denoiser, presets["w4a8-int8-modiff-real"])
    layers = [m for m in qmodel.modules() if isinstance(m, RealModulatedLayer)]
    assert layers
    for layer in layers:
        codes = layer.weight_codes()
        matrix = codes.permute(0, 2, 3, 1) if codes.ndim == 4 else codes
        taps, c = matrix[0].numel() // matrix.shape[-1], matrix.shape[-1]
        nibbles = torch.stack([layer.weight_packed & 15, layer.weight_packed >> 4], dim=-1)
        nibbles = nibbles.reshape(len(codes), taps, -1)
        unpacked = nibbles[..., :c].float() - layer.weight_offset_n.view(-1, 1, 1).float()
        assert torch.equal(unpacked, (matrix - layer.weight_zero_point.view(-1, *[1] * (matrix.ndim - 1))).reshape(
            len(codes), taps, c))
