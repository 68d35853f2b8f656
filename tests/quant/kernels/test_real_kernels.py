"""The real W8A8 and W4A8 kernels (`modiff.quant.kernels.real`) against the simulator of the same numerics.

Without CUDA they run on CPU tensors in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports Triton), with the real layers forced onto the kernels; with CUDA they run on tensor cores.
Skipped where Triton is missing (CI). The reference is the simulator in float64 on the CPU: exact for the
representable inputs below, so "equal" means equal to the exact result.

- Representable inputs: residuals s_a q and weights s_w q with power-of-two scales and codes on the format's grid
  (each sample's and channel's absmax on the grid's end, so the scales come out exactly), small enough that every
  sum is exact in float32: the kernels must give the exact result (INT8 and W4A8 everywhere; FP8 in the
  interpreter, and on CUDA to the precision of Hopper's FP8 accumulation, which is not full float32). The formats:
  "int8" and "fp8" (W8A8), "w4a8" (4-bit symmetric weights, INT8 activations).
- Other inputs: within the format's rounding bound (a code at most one grid step from the simulator's) plus
  float32 accumulation.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

from modiff.pipelines.execution import float32_precision  # noqa: E402
from modiff.quant import QuantSpec, WeightQuant, presets, quantize, trajectory  # noqa: E402
from modiff.quant.formats import FP8_MAX, fp8_codes  # noqa: E402
from modiff.quant.kernels import real as kernels  # noqa: E402
from modiff.quant.kernels.real_triton import round_e4m3  # noqa: E402
from modiff.quant.layers import real as real_layers  # noqa: E402
import triton.language as tl  # noqa: E402

LEVELS = {"int8": 127.0, "fp8": FP8_MAX, "int4": 7.0}  # the grid's end of each operand format
PRESETS = {"int8": "w8a8-int8", "fp8": "w8a8-fp8", "w4a8": "w4a8-int8"}
FORMATS = list(PRESETS)


def _operands(fmt: str) -> tuple[str, str]:
    """(weight format, activation format) of a kernel format."""
    return ("int4", "int8") if fmt == "w4a8" else (fmt, fmt)


def _preset(fmt: str, modulated: bool) -> str:
    return f"{PRESETS[fmt]}{'-modiff' if modulated else ''}-real"
E4M3_SMALL = torch.tensor([v for v in range(-16, 17)], dtype=torch.float32)  # integers e4m3 holds exactly


@pytest.fixture(autouse=True)
def kernels_on_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real layers take the kernels on this device (on the CPU: the Triton interpreter)."""
    monkeypatch.setattr(real_layers, "use_real_kernels", lambda x: True)


def _grid_codes(shape: tuple[int, ...], fmt: str, gen: torch.Generator) -> torch.Tensor:
    """Codes on the format's grid with the grid's end (127 or 448) once per row of dim 0, so that a per-sample or
    per-channel absmax scale comes out as exactly the power of two the caller multiplies by."""
    if fmt in ("int8", "int4"):
        end = int(LEVELS[fmt])
        codes = torch.randint(-end, end + 1, shape, generator=gen).float()
    else:
        codes = E4M3_SMALL[torch.randint(0, len(E4M3_SMALL), shape, generator=gen)]
    flat = codes.reshape(shape[0], -1)
    flat[:, torch.randint(0, flat.shape[1], (1,), generator=gen)] = LEVELS[fmt] * (1 - 2 * (flat[:, :1] < 0).float())
    return flat.reshape(shape)


def _layer(kind: str, fmt: str, gen: torch.Generator) -> nn.Module:
    """A one-layer model of ``kind`` with weights on the weight grid of kernel format ``fmt``."""
    c_in, c_out = 5, 7
    layers = {"conv3x3": nn.Conv2d(c_in, c_out, 3, padding=1), "conv3x3-s2": nn.Conv2d(c_in, c_out, 3, 2, 1),
              "conv3x3-s2-p0": nn.Conv2d(3, 17, 3, 2, 0), "conv1x1": nn.Conv2d(6, 9, 1),
              "linear": nn.Linear(20, 12), "linear-tokens": nn.Linear(20, 12)}
    layer = layers[kind]
    with torch.no_grad():
        layer.weight.copy_(_grid_codes(tuple(layer.weight.shape), _operands(fmt)[0], gen) * 2.0**-5)
        layer.bias.copy_(torch.randint(-8, 9, layer.bias.shape, generator=gen) * 2.0**-4)
    return nn.Sequential(layer)


def _input_shape(kind: str, batch: int = 3) -> tuple[int, ...]:
    return {"conv3x3": (batch, 5, 7, 9), "conv3x3-s2": (batch, 5, 9, 8), "conv3x3-s2-p0": (batch, 3, 9, 9),
            "conv1x1": (batch, 6, 5, 5), "linear": (batch, 20), "linear-tokens": (batch, 4, 20)}[kind]


def _on_device(x: torch.Tensor) -> torch.Tensor:
    x = x.to(DEVICE)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _models(model: nn.Module, preset: str) -> tuple[nn.Module, nn.Module]:
    """(real layers on DEVICE, the simulator of the same config in float64 on the CPU)."""
    real = quantize(model, presets[preset]).to(DEVICE)
    return real, quantize(model, presets[preset].simulated()).double()


KINDS = ["conv3x3", "conv3x3-s2", "conv3x3-s2-p0", "conv1x1", "linear", "linear-tokens"]


def _assert_exact(out: torch.Tensor, ref: torch.Tensor, fmt: str) -> None:
    if fmt == "fp8" and CUDA:  # Hopper's FP8 MMA accumulates below float32 precision (not verified on a CPU)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=2**-11, atol=0)
    else:
        assert torch.equal(out.double().cpu(), ref), (out.double().cpu() - ref).abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_direct_is_exact_on_representable_inputs(kind: str, fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    real, sim = _models(_layer(kind, fmt, gen), _preset(fmt, modulated=False))
    x = _grid_codes(_input_shape(kind), _operands(fmt)[1], gen) * 2.0**-3
    with float32_precision("fp32"):
        out = real(_on_device(x))
    assert out.shape == sim(x.double()).shape and out.dtype == torch.float32
    _assert_exact(out, sim(x.double()), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_modulated_is_exact_on_representable_residuals(kind: str, fmt: str) -> None:
    """Warm-up on a representable input, then steps whose residuals r_t = a_t - a_hat are representable: a_hat
    follows a_t exactly and o_hat accumulates the exact outputs, step by step (the bias once, at warm-up)."""
    gen = torch.Generator().manual_seed(1)
    real, sim = _models(_layer(kind, fmt, gen), _preset(fmt, modulated=True))
    shape = _input_shape(kind)
    x = torch.randint(-16, 17, shape, generator=gen) * 2.0**-2
    with trajectory(real) as states, trajectory(sim), float32_precision("fp32"):
        for step in range(4):
            if step:
                x = x + _grid_codes(shape, _operands(fmt)[1], gen) * 2.0**-(3 + step)
            _assert_exact(real(_on_device(x)), sim(x.double()), fmt)
            assert torch.equal(states[0].a_hat.double().cpu(), x.double())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tiling", kernels.CANDIDATE_TILINGS, ids=str)
def test_every_candidate_tiling_is_exact(tiling: tuple[int, ...], fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A measured tilings table may name any candidate: each gives the exact result, direct and modulated (the
    interpreter checks the tile arithmetic; only CUDA checks warps and stages)."""
    gen = torch.Generator().manual_seed(2)
    layer = _layer("conv3x3", fmt, gen)
    monkeypatch.setattr(kernels, "tiling_key", lambda *shape: "every GEMM")
    monkeypatch.setattr(kernels, "measured_tilings", lambda: {"every GEMM": tiling})
    assert kernels.gemm_blocks(1, layer[0].out_channels, layer[0].in_channels, 9, fmt == "fp8", fmt == "w4a8") == dict(
        zip(kernels.TILING_KEYS, tiling))
    direct, direct_sim = _models(layer, _preset(fmt, modulated=False))
    modiff, modiff_sim = _models(layer, _preset(fmt, modulated=True))
    x = _grid_codes(_input_shape("conv3x3"), _operands(fmt)[1], gen) * 2.0**-3
    with float32_precision("fp32"):
        _assert_exact(direct(_on_device(x)), direct_sim(x.double()), fmt)
        with trajectory(modiff), trajectory(modiff_sim):
            for step in range(2):
                x = x + step * _grid_codes(x.shape, _operands(fmt)[1], gen) * 2.0**-5
                _assert_exact(modiff(_on_device(x)), modiff_sim(x.double()), fmt)


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric-published"])
@pytest.mark.parametrize("kind", ["conv3x3", "conv3x3-s2-p0", "linear-tokens"])
def test_4_bit_weights_on_every_grid_are_exact(kind: str, scheme: str) -> None:
    """W4A8 on the other 4-bit grids: asymmetric (codes 0..15, an integer zero point z per channel) and the
    published symmetric one (-8..7), with the codes set as AdaRound sets them: the kernel multiplies q - z exactly,
    direct and over MoDiff steps. Odd channel counts (5, 3) leave a padding nibble in each tap."""
    gen = torch.Generator().manual_seed(4)
    spec = QuantSpec(bits=4, scheme=scheme, granularity="channel", channel_axis=0)
    layer = _layer(kind, "w4a8", gen)
    shape = layer[0].weight.shape
    codes = torch.randint(spec.qmin, spec.qmax + 1, shape, generator=gen).float()
    grid_shape = (shape[0], *[1] * (len(shape) - 1))
    zero_point = torch.randint(0, 16, grid_shape, generator=gen).float() if scheme == "asymmetric" else \
        torch.zeros(grid_shape)
    scale = 2.0 ** -torch.randint(4, 7, grid_shape, generator=gen).float()
    models = []
    for modulated in (False, True):
        config = dataclasses.replace(presets[_preset("w4a8", modulated)], weight=WeightQuant(spec))
        real, sim = quantize(layer, config), quantize(layer, config.simulated())
        for model in (real, sim):
            model[0].set_weight_codes(codes, scale, zero_point)
        models.append((real.to(DEVICE), sim.double()))
    (direct, direct_sim), (modiff, modiff_sim) = models
    assert torch.equal(direct[0].weight_codes().cpu(), codes)
    x = _grid_codes(_input_shape(kind), "int8", gen) * 2.0**-3
    with float32_precision("fp32"):
        _assert_exact(direct(_on_device(x)), direct_sim(x.double()), "w4a8")
        with trajectory(modiff), trajectory(modiff_sim):
            for step in range(3):
                x = x + step * _grid_codes(x.shape, "int8", gen) * 2.0**-(4 + step)
                _assert_exact(modiff(_on_device(x)), modiff_sim(x.double()), "w4a8")


def _rounding_bound(layer: nn.Module, x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per output element: one grid step of every input code (s_a for INT8, the e4m3 step at the value for FP8)
    through |W_q|, plus float32 accumulation over the K terms, all in float64."""
    fmt = _operands(fmt)[1]
    codes_scale = x.abs().flatten(1).amax(dim=1).clamp(min=1e-12) / LEVELS[fmt]
    scale = codes_scale.view(-1, *[1] * (x.ndim - 1))
    if fmt == "int8":
        step = scale.expand_as(x)
    else:
        step = torch.maximum(fp8_codes(x, scale).double().abs() * 2.0**-3, 2.0**-9 * torch.ones_like(x)) * scale
    weight = layer.weight_q.double().abs()
    k = weight[0].numel()
    return layer.op(step, weight, None) + (k + 3) * 2.0**-23 * layer.op(x.abs() + step, weight, None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_direct_within_the_rounding_bound(kind: str, fmt: str) -> None:
    gen = torch.Generator().manual_seed(2)
    model = _layer(kind, fmt, gen)
    with torch.no_grad():
        model[0].weight.normal_(generator=gen)
    real, sim = _models(model, _preset(fmt, modulated=False))
    x = torch.randn(_input_shape(kind), generator=gen, dtype=torch.float64) * 3
    with float32_precision("fp32"):
        out = real(_on_device(x.float())).double().cpu()
    ref = sim(x.float().double())
    bound = _rounding_bound(sim[0], x.float().double(), fmt)
    assert torch.all((out - ref).abs() <= bound), ((out - ref).abs() / bound).max()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_codes_and_scales_equal_the_simulators(fmt: str) -> None:
    """The quantize step alone: per-sample scales and codes exactly as the simulator's quantizer computes them
    (the same float32 operations), and a_hat += s q to float32 rounding (a fused multiply-add on CUDA)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 7, generator=gen) * torch.tensor([1e-3, 1.0, 50.0]).view(3, 1, 1, 1)
    a_hat = x + 0.1 * torch.randn(x.shape, generator=gen)
    hat = _on_device(a_hat)
    codes, scales = kernels._codes(_on_device(x), hat, fmt == "fp8")
    r = x - a_hat
    expect_scale = torch.clamp(r.abs().amax(dim=(1, 2, 3)) / torch.tensor(LEVELS[fmt]), min=1e-12)
    assert torch.equal(scales.cpu(), expect_scale)
    s = expect_scale.view(3, 1, 1, 1)
    if fmt == "int8":
        expect = torch.clamp(torch.round(r * s.reciprocal()), -127, 127)
        got = codes.cpu().float()
    else:
        expect = fp8_codes(r, s).float()
        got = codes.cpu().view(torch.float8_e4m3fn).float()
    assert torch.equal(got, expect)
    # On CUDA a_hat + q s is one fused multiply-add: it differs from torch's two roundings by at most one rounding
    # of each operand's size (under cancellation the result is small and the relative difference large).
    step = expect * s
    assert torch.all((hat.cpu() - (a_hat + step)).abs() <= 2**-22 * (a_hat.abs() + step.abs()))


@triton.jit
def _apply_round_e4m3(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, round_e4m3(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_e4m3_rounding_is_the_torch_cast() -> None:
    """The kernels' float32 rounding to e4m3 (`round_e4m3`) against torch's float8_e4m3fn cast: every e4m3 value,
    every midpoint between neighbours (ties to even), values just off them, subnormals, zeros and the ends."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    values = torch.cat([grid, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(-1e9)),
                        torch.tensor([0.0, -0.0, 2.0**-10, 3 * 2.0**-11, FP8_MAX, -FP8_MAX])])
    x = values.to(DEVICE)
    out = torch.empty_like(x)
    _apply_round_e4m3[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    assert torch.equal(out.cpu(), values.to(torch.float8_e4m3fn).float())


def _eps_trajectory(model, x_T: torch.Tensor, ts) -> list[torch.Tensor]:
    import modiff as md

    eps = []
    with trajectory(model), float32_precision("fp32"):
        md.sample_ddim(model, x_T, ts, callback=lambda s: eps.append(s.eps))
    return eps


def _relative_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((x - y).norm() / y.norm()) for x, y in zip(a, b)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_modiff_trajectory_of_a_tiny_unet_follows_the_simulator(tiny_denoiser, fmt: str) -> None:
    """A whole MoDiff trajectory (float32, float32 state): the real model's eps against the simulator's of the same
    config, per step. They differ by float32 rounding (summation order, channels_last convolutions at warm-up),
    which moves codes by one step here and there; an 8-bit random UNet amplifies that: a perturbation of x_T by
    1e-6 (relative) moves the simulator's own eps by about 1e-2. The real kernels must stay within a few times
    that sensitivity."""
    import modiff as md

    config = dataclasses.replace(presets[_preset(fmt, modulated=True)], state_dtype="float32")
    real = quantize(tiny_denoiser, config).to(DEVICE)
    sim = quantize(tiny_denoiser, config.simulated()).to(DEVICE)
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape).to(DEVICE), md.timesteps(4)
    reference = _eps_trajectory(sim, x_T, ts)
    errors = _relative_errors(_eps_trajectory(real, x_T, ts), reference)
    sensitivity = _relative_errors(_eps_trajectory(sim, x_T * (1 + 1e-6), ts), reference)
    assert errors[0] < 1e-5 and max(errors) <= 3 * max(sensitivity) + 1e-4, (errors, sensitivity)
