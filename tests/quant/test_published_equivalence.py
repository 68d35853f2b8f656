"""Every `published-*` layer computes what the published Q-Diffusion / MoDiff code computes, layer by layer.

The reference below is this test's own transcription of the published formulas, read in
`Xiuyu-Li/q-diffusion` and the MoDiff code (`qdiff/quant_layer.py`: `UniformAffineQuantizer.forward`,
`init_quantization_scale`, `QuantModule.forward`, `set_split`; `qdiff/quant_block.py`: `QuantResnetBlock`,
`QuantResBlock`; `ddim/models/diffusion.py` and `ldm/modules/diffusionmodules/openaimodel.py`: `forward`):

- activations (dynamic, per tensor, `--a_sym`): x_min = min(min x, 0), x_max = max(max x, 0) as Python
  floats, delta = max(-x_min, x_max) / (2^(b-1) - 1) in double, at least 1e-8, then cast to float32;
  Q(x) = delta * clamp(round(x / delta), -2^(b-1), 2^(b-1) - 1);
- weights (per output channel, `scale_method='max'`): min and max of each row (not widened to 0),
  delta = (max - min) / (2^b - 1), at least 1e-8, z = round(-min / delta),
  Q(w) = delta * (clamp(round(w / delta) + z, 0, 2^b - 1) - z);
- split layers: `act_quantizer` on the input channels [:split], `act_quantizer_0` on [split:], each with
  its own scale, concatenated; the weight's input channels likewise with `weight_quantizer` and
  `weight_quantizer_0`. `split` is the width of h in cat([h, skip]) and reaches only the shortcut conv
  (`nin_shortcut` of the DDIM up blocks at levels < 4, `skip_connection` of the LDM output ResBlocks);
- modulated (MoDiff `QuantModule.forward` with `modulate`): the first call keeps a_hat = a and outputs
  A(a) + b; later calls quantize r = a - a_hat (per half when split), a_hat += Q(r),
  o_hat += A(Q(r)) (no bias), and output o_hat.

Layers are compared teacher-forced: both get the same recorded inputs (a 3-4 bit network is chaotic, one
rounding tie would make whole-network trajectories diverge).

One arithmetic difference remains, by design: the published code computes round(x / delta), modiff
round(x * (1 / delta)) as PyTorch's fake-quantization kernels do (`modiff.quant.primitives.fake_quantize`).
The two differ only where x / delta lies within a float32 ulp of a half-integer. The per-layer test uses the
reciprocal in the reference, so that every code must agree; `test_division_moves_codes_only_at_ties`
measures what the literal division changes.
"""
from __future__ import annotations

import copy
import re
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modiff as md
from modiff.models.ddim_unet import DDIMUNet, DDIMUNetConfig, ResnetBlock
from modiff.models.ldm_unet import ResBlock, UNetModel
from modiff.quant import QuantConfig, presets, quantize, trajectory
from modiff.quant.api import quant_layers
from modiff.quant.layers.direct import QuantLayer

from conftest import TINY, tiny_net

PUBLISHED = [name for name in presets if name.startswith("published-") and not name.startswith("published-lsun-")]
PUBLISHED_LSUN = [name for name in presets if name.startswith("published-lsun-")]
STEPS, BATCH = 4, 3


def _bits(preset: str) -> tuple[int, int]:
    w, a = re.search(r"w(\d+)a(\d+)", preset).groups()
    return int(w), int(a)


# --------------------------------------------------------------------------------------------------
# The published formulas (transcribed)
# --------------------------------------------------------------------------------------------------


def _scaled(x: torch.Tensor, delta: torch.Tensor, divide: bool) -> torch.Tensor:
    return x / delta if divide else x * delta.reciprocal()


def published_act_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    """delta of the dynamic symmetric per-tensor activation quantizer of the published code."""
    x_min, x_max = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    delta = max(abs(x_min), x_max) / (2 ** (bits - 1) - 1)
    return torch.tensor(max(delta, 1e-8)).type_as(x)


def published_act(x: torch.Tensor, bits: int, divide: bool = False) -> torch.Tensor:
    """Dynamic symmetric per-tensor activation quantizer of the published code."""
    levels, delta = 2 ** (bits - 1) - 1, published_act_scale(x, bits)
    return torch.clamp(torch.round(_scaled(x, delta, divide)), -levels - 1, levels) * delta


def published_lsun_act(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic asymmetric per-tensor activation quantizer of the published LSUN commands (no ``--a_sym``,
    ``scale_method='max'``): delta = (max x - min x) / (2^b - 1) from Python floats, at least 1e-8, cast to
    x's dtype; z = round(-min(min x, 0) / delta) with the double delta; Q(x) = delta (clamp(round(x / delta) + z,
    0, 2^b - 1) - z). Returns (Q(x), delta)."""
    x_min = x.min().item()
    delta = max((x.max().item() - x_min) / (2**bits - 1), 1e-8)
    zero = round(-min(x_min, 0.0) / delta)
    scale = torch.tensor(delta).type_as(x)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale, scale


def published_weight(w: torch.Tensor, bits: int, divide: bool = False) -> torch.Tensor:
    """Per-output-channel min-max weight quantizer of the published code."""
    flat = w.reshape(w.shape[0], -1)
    shape = (-1,) + (1,) * (w.ndim - 1)
    w_min, w_max = flat.min(dim=1).values, flat.max(dim=1).values
    delta = (w_max - w_min) / (2**bits - 1)
    delta[delta < 1e-8] = 1e-8
    zero = torch.round(-w_min / delta)
    delta, zero = delta.view(shape), zero.view(shape)
    return (torch.clamp(torch.round(_scaled(w, delta, divide)) + zero, 0, 2**bits - 1) - zero) * delta


class PublishedLayer:
    """`QuantModule` of the published code for one Conv/Linear, with weight and activation quantization on
    (activation quantization off for 32-bit activations: the published weights-only runs)."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int, split: int, modulate: bool, divide: bool = False,
                 accumulate: bool = True):
        self.a_bits, self.split, self.modulate, self.divide, self.accumulate = a_bits, split, modulate, divide, accumulate
        w = layer.weight.detach()
        if split:
            self.weight = torch.cat([published_weight(w[:, :split], w_bits, divide),
                                     published_weight(w[:, split:], w_bits, divide)], 1)
        else:
            self.weight = published_weight(w, w_bits, divide)
        self.bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer, nn.Linear):
            self.op: Callable[..., torch.Tensor] = F.linear
        else:
            conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
            self.op = lambda x, w, b: conv(x, w, b, stride=layer.stride, padding=layer.padding,
                                           dilation=layer.dilation, groups=layer.groups)
        self.a_hat: Optional[torch.Tensor] = None
        self.o_hat: Optional[torch.Tensor] = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits >= 32:
            return x
        if not self.split:
            return published_act(x, self.a_bits, self.divide)
        s = self.split
        return torch.cat([published_act(x[:, :s, :, :], self.a_bits, self.divide),
                          published_act(x[:, s:, :, :], self.a_bits, self.divide)], 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.modulate:
            return self.op(self.quantize_input(x), self.weight, self.bias)
        if self.a_hat is None:  # first call: full-precision input, bias added once
            self.a_hat = x.clone()
            self.o_hat = self.op(x, self.weight, self.bias)
            return self.o_hat
        q = self.quantize_input(x - self.a_hat)
        self.a_hat = self.a_hat + q
        if not self.accumulate:  # the same value in exact arithmetic: o_hat = A(a_hat) + b, by linearity
            return self.op(self.a_hat, self.weight, self.bias)
        self.o_hat = self.o_hat + self.op(q, self.weight, None)
        return self.o_hat


class _Wrapped(nn.Module):
    def __init__(self, layer: PublishedLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def published_model(model: nn.Module, preset: str, splits: dict[str, int], accumulate: bool) -> nn.Module:
    """``model`` with every Conv/Linear replaced by its `PublishedLayer` (state from its first call on)."""
    w_bits, a_bits = _bits(preset)
    out = copy.deepcopy(model)
    for name, layer in list(out.named_modules()):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            parent, _, child = name.rpartition(".")
            ref = PublishedLayer(layer, w_bits, a_bits, splits.get(name, 0), presets[preset].stateful,
                                 accumulate=accumulate)
            setattr(out.get_submodule(parent), child, _Wrapped(ref))
    return out


# --------------------------------------------------------------------------------------------------
# The published split set, measured on the network's own forward
# --------------------------------------------------------------------------------------------------


def published_splits(net: nn.Module, run: Callable[[], object], prefix: str = "") -> dict[str, int]:
    """Shortcut conv -> width of h, as the published forward passes `split`: h is the output of the
    residual block run just before (attention and resampling keep the width). DDIM: up-path levels < 4;
    LDM: every output block. A block without a shortcut conv takes no split."""
    calls: list[tuple[str, nn.Module, int]] = []
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: calls.append((n, m, out.shape[1])))
             for n, m in net.named_modules() if isinstance(m, (ResnetBlock, ResBlock))]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    splits = {}
    for (_, _, h_width), (name, block, _) in zip(calls, calls[1:]):
        ddim = re.fullmatch(r"up\.(\d+)\.block\.\d+", name)
        if ddim and int(ddim.group(1)) < 4 and hasattr(block, "nin_shortcut"):
            splits[f"{prefix}{name}.nin_shortcut"] = h_width
        if re.fullmatch(r"output_blocks\.\d+\.0", name) and isinstance(block.skip_connection, nn.Conv2d):
            splits[f"{prefix}{name}.skip_connection"] = h_width
    return splits


def split_set(qmodel: nn.Module) -> dict[str, int]:
    return {name: layer.split for name, layer in quant_layers(qmodel).items() if layer.split is not None}


def test_ddim_split_set_is_the_published_one(tiny_denoiser: md.Denoiser) -> None:
    x, t = torch.randn(1, *tiny_denoiser.sample_shape), torch.tensor([500])
    expected = published_splits(tiny_denoiser.net, lambda: tiny_denoiser(x, t), prefix="net.")
    assert expected and all(name.endswith("nin_shortcut") for name in expected)
    assert len(expected) == len(tiny_denoiser.net.up) * (TINY.num_res_blocks + 1)
    for name in ("published-w4a3", "published-w8a8-modiff", "qdiff-w4a4", "qdiff-w8a4-modiff"):
        assert split_set(quantize(tiny_denoiser, presets[name])) == expected, name
    assert split_set(quantize(tiny_denoiser, presets["w4a3"])) == {}


def test_ddim_levels_from_4_are_not_split() -> None:
    """The published up path passes split only for `i_level < 4` (the six-level LSUN models)."""
    config = DDIMUNetConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), in_channels=1,
                            out_ch=1, image_size=32)
    net = DDIMUNet(config).eval()
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([10])
    expected = published_splits(net, lambda: net(x, t))
    assert {n.split(".")[1] for n in expected} == {"0", "1", "2", "3"}
    assert net.concat_splits() == expected


def test_ldm_split_set_is_the_published_one() -> None:
    """Where the published LDM forward passes ``split`` (when ``UNetModel.split`` is set: every output block's
    shortcut). The published LSUN commands leave it off (`published-lsun-*`); `published-*` turns it on on a
    latent model too, as the CIFAR-10 commands' ``--split`` does on the DDIM one."""
    net = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                    attention_resolutions=[2], channel_mult=[1, 2], num_heads=2).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([7])
    expected = published_splits(net, lambda: net(x, t))
    assert set(expected) == {f"output_blocks.{i}.0.skip_connection" for i in range(len(net.output_blocks))}
    qnet = quantize(net, QuantConfig(split_shortcut=True))
    assert split_set(qnet) == expected
    assert not any("in_layers" in name for name in split_set(qnet))


# --------------------------------------------------------------------------------------------------
# Layer by layer, teacher-forced
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded() -> tuple[md.Denoiser, dict[str, list[torch.Tensor]], dict[str, int]]:
    """The tiny DDIM UNet, every Conv/Linear input over a DDIM trajectory, and the published split set."""
    model = md.Denoiser(tiny_net(0), md.linear_schedule(), "tiny", {})
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].detach().clone()))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        md.sample_ddim(model, md.noise(range(BATCH), model.sample_shape), md.timesteps(STEPS))
    for h in hooks:
        h.remove()
    x, t = torch.randn(1, *model.sample_shape), torch.tensor([500])
    return model, inputs, published_splits(model.net, lambda: model(x, t), prefix="net.")


@pytest.mark.parametrize("preset", PUBLISHED)
def test_every_layer_gives_the_published_output(recorded, preset: str) -> None:
    """Direct and modulated (state carried over the steps), split or not: on the recorded inputs every weight,
    every quantized input (direct) and every input estimate a_hat (modulated) equals the published one
    exactly, and the output equals it up to float32 summation order."""
    model, inputs, splits = recorded
    config = presets[preset]
    w_bits, a_bits = _bits(preset)
    qmodel = quantize(model, config)
    layers = quant_layers(qmodel)
    assert set(layers) == set(inputs) and split_set(qmodel) == splits
    worst: dict[str, float] = {}
    for name, ours in layers.items():
        ref = PublishedLayer(model.get_submodule(name), w_bits, a_bits, splits.get(name, 0), config.stateful)
        torch.testing.assert_close(ours.weight_q, ref.weight, rtol=0, atol=0)
        with trajectory(ours) if config.stateful else torch.no_grad(), torch.no_grad():
            for step, x in enumerate(inputs[name]):
                out, expected = ours(x), ref(x)
                if config.stateful:  # the carried input estimate is the same tensor
                    torch.testing.assert_close(ours.state.a_hat, ref.a_hat, rtol=0, atol=0)
                elif config.activation is not None:
                    torch.testing.assert_close(ours.act(x), ref.quantize_input(x), rtol=0, atol=0)
                err = ((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
                assert err < 1e-5, f"{name} step {step}: relative max difference {err:.2e}"
                kind = "split" if name in splits else type(model.get_submodule(name)).__name__
                worst[kind] = max(worst.get(kind, 0.0), err)
    assert set(worst) == {"split", "Conv2d", "Linear"}


def test_the_old_split_set_is_not_the_published_model(recorded) -> None:
    """Failure path: splitting conv1 as well (the pre-fix set) changes conv1's output well beyond rounding."""
    model, inputs, splits = recorded
    name = next(n for n in splits).replace("nin_shortcut", "conv1")
    layer = model.get_submodule(name)
    ours = PublishedLayer(layer, 4, 3, 0, modulate=False)
    wrong = PublishedLayer(layer, 4, 3, splits[name.replace("conv1", "nin_shortcut")], modulate=False)
    x = inputs[name][0]
    assert ((ours(x) - wrong(x)).norm() / ours(x).norm()).item() > 0.05


@pytest.mark.parametrize("bits", [3, 8])
def test_division_moves_codes_only_at_ties(recorded, bits: int) -> None:
    """The literal published division against modiff's reciprocal multiply, on every recorded input of every
    layer: at most 1 code in 10^4 differs, by one step, and only where x / delta is a half-integer to
    float32 precision (the two roundings of one real number straddle it)."""
    _, inputs, splits = recorded
    flips = total = 0
    for name, xs in inputs.items():
        s = splits.get(name, 0)
        for x in xs:
            for part in ([x[:, :s], x[:, s:]] if s else [x]):
                delta = published_act_scale(part, bits)
                moved = published_act(part, bits, divide=True) != published_act(part, bits)
                steps = (published_act(part, bits, divide=True) - published_act(part, bits))[moved] / delta
                ratio = (part / delta)[moved].double()
                assert torch.allclose(steps.abs(), torch.ones_like(steps)), name
                assert ((ratio - ratio.floor() - 0.5).abs() <= 4 * 2.0**-24 * ratio.abs()).all(), name
                flips, total = flips + int(moved.sum()), total + part.numel()
    assert flips <= 1e-4 * total, (flips, total)


@pytest.mark.parametrize("preset, accumulate", [("published-w4a3", True), ("published-w8a4", True),
                                                ("published-w4a3-modiff", False), ("published-w4a4-modiff", False)])
def test_network_teacher_forced_on_the_published_trajectory(recorded, preset: str, accumulate: bool) -> None:
    """The whole quantized network, fed the published model's own trajectory x_t, returns its eps bit for bit.

    Modulated: against the reference that outputs A(a_hat) + b. With the published accumulation
    o_hat += A(Q(r)) the two differ by float32 rounding (~1e-6 per layer), which a 3-4 bit modulated
    network amplifies as it amplifies any 1e-7 perturbation of x_t (measured, not asserted here).
    """
    model, _, splits = recorded
    ref = published_model(model, preset, splits, accumulate)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hook = ref.register_forward_hook(lambda m, args, out: calls.append((args[0], args[1], out)))
    with torch.no_grad():
        md.sample_ddim(ref, md.noise(range(BATCH), model.sample_shape), md.timesteps(2 * STEPS))
    hook.remove()
    qmodel = quantize(model, presets[preset])
    with trajectory(qmodel) if qmodel.quant_config.stateful else torch.no_grad(), torch.no_grad():
        for x, t, eps in calls:
            torch.testing.assert_close(qmodel(x, t), eps, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# The published LSUN numerics (`published-lsun-*`)
# --------------------------------------------------------------------------------------------------


def test_lsun_presets_are_the_published_ldm_commands() -> None:
    """Asymmetric per-tensor activations over runs of 8 samples, no split shortcut, the weights of wXaY."""
    assert len(PUBLISHED_LSUN) == 2 * 2 * 5
    for name in PUBLISHED_LSUN:
        config, (w, a) = presets[name], _bits(name)
        spec = config.activation.spec
        assert (spec.scheme, spec.granularity, spec.samples_per_scale, spec.bits) == ("asymmetric", "tensor", 8, a)
        assert config.activation.dynamic and not config.split_shortcut
        assert config.weight == presets[f"w{w}a{a}"].weight
        assert config.mode == ("modulated" if name.endswith("-modiff") else "direct")


@pytest.mark.parametrize("preset", ["published-lsun-w8a4", "published-lsun-w4a3-modiff"])
def test_lsun_layers_quantize_as_the_published_ldm_code(recorded, preset: str) -> None:
    """Teacher-forced on every recorded input (direct) or every residual a_t - a_hat of its own state
    (modulated), each layer's activation quantizer gives the published LSUN quantizer's values: the scale
    within one float32 rounding (the published code subtracts the range ends in double), so codes may move
    by one step where x / delta sits within that rounding of a half-integer; at most 1 in 10^4 does."""
    model, inputs, _ = recorded
    config = presets[preset]
    _, a_bits = _bits(preset)
    qmodel = quantize(model, config)
    assert split_set(qmodel) == {}
    moved = total = 0
    for name, ours in quant_layers(qmodel).items():
        with trajectory(ours) if config.stateful else torch.no_grad(), torch.no_grad():
            for step, x in enumerate(inputs[name]):
                seen = x - ours.state.a_hat if config.stateful and step > 0 else x
                if config.stateful and step == 0:
                    ours(x)  # the full-precision first step sets a_hat
                    continue
                expected, delta = published_lsun_act(seen, a_bits)
                got = ours.act(seen)
                steps = ((got - expected) / delta).abs()
                assert (steps <= 1 + 1e-3).all(), f"{name} step {step}: a code moved by more than one step"
                moved, total = moved + int((steps > 0.5).sum()), total + seen.numel()
                if config.stateful:
                    ours(x)
    assert total > 0 and moved <= 1e-4 * total, (moved, total)


def test_lsun_scale_spans_eight_samples() -> None:
    """A batch of 16 quantizes as two batches of 8, each with the published scale of its own 8 samples."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 5, 5)
    x[8:] *= 10
    act = QuantLayer(nn.Conv2d(4, 4, 1), presets["published-lsun-w8a4"], "c").act
    with torch.no_grad():
        got = act(x)
    for half in (slice(0, 8), slice(8, 16)):
        expected, delta = published_lsun_act(x[half], 4)
        assert ((got[half] - expected).abs() / delta).max() <= 1 + 1e-3
        assert ((got[half] - expected).abs() > 0.5 * delta).float().mean() <= 1e-3
