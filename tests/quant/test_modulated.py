"""MoDiff layers: exactness, the error-feedback identity, the random walk without it, caching, resets."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import modiff as md
from modiff.quant import ActQuant, QuantConfig, QuantSpec, WeightQuant, presets, quantize, trajectory
from modiff.quant.layers.direct import QuantLayer
from modiff.quant.layers.modulated import ModulatedLayer, consumed
from modiff.quant.layers.trajectory import shared_input_pairs, state_bytes
from modiff.quant.primitives import quantize_dynamic
from modiff.models.ddim_unet import GroupNorm


def _single_layer(config: QuantConfig, kind: str = "conv") -> QuantLayer:
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv" else nn.Linear(6, 4)
    return (ModulatedLayer if config.stateful else QuantLayer)(layer, config, "layer")


def _inputs(steps: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """A smooth random trajectory: consecutive inputs differ by small steps, as in sampling."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    out = []
    for _ in range(steps):
        x = x + 0.1 * torch.randn(shape, generator=g)
        out.append(x.clone())
    return out


A4 = ActQuant(QuantSpec(bits=4, granularity="sample"))


@pytest.mark.parametrize("kind,shape", [("conv", (2, 3, 6, 6)), ("linear", (2, 6))])
def test_output_equals_accumulated_estimate(kind: str, shape: tuple[int, ...]) -> None:
    """The layer's output is the paper's accumulated o_hat: o_hat = A(a_0) + b at warm-up, then
    o_hat += A(Q(r_t)) with r_t = a_t - a_hat, a_hat += Q(r_t); and o_hat = A(a_hat) + b (error feedback)."""
    layer = _single_layer(QuantConfig(activation=A4, mode="modulated"), kind)
    xs = _inputs(12, shape)
    a_hat = xs[0].clone()
    o_hat = layer.op(a_hat, layer.weight_q, layer.bias)
    with trajectory(layer) as states:
        torch.testing.assert_close(layer(xs[0]), o_hat, rtol=0, atol=0)
        for x in xs[1:]:
            q = quantize_dynamic(x - a_hat, A4.spec)
            a_hat, o_hat = a_hat + q, o_hat + layer.op(q, layer.weight_q, None)
            out = layer(x)
            assert torch.equal(states[0].a_hat, a_hat)
            torch.testing.assert_close(out, o_hat, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, layer.op(a_hat, layer.weight_q, layer.bias), rtol=1e-5, atol=1e-5)


def test_state_follows_the_autocast_dtype() -> None:
    """Under autocast a_hat is kept in the dtype the operator consumes; error feedback absorbs its rounding:
    after each step |a_t - a_hat| <= step / 2 (asymmetric 4-bit: range / 15) + the bf16 rounding of a_hat."""
    layer = _single_layer(QuantConfig(weight=None, activation=A4, mode="modulated"))
    with trajectory(layer) as states, torch.autocast("cpu", dtype=torch.bfloat16):
        for x in _inputs(10, (2, 3, 6, 6)):
            previous = None if states[0].a_hat is None else states[0].a_hat.float()
            out = layer(x)
            assert states[0].a_hat.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
            if previous is not None:
                residual = (x - previous).flatten(1)
                step = (residual.amax(1) - residual.amin(1)) / 15
                error = (x - states[0].a_hat.float()).flatten(1).abs().amax(1)
                assert torch.all(error <= step / 2 + 2**-8 * x.flatten(1).abs().amax(1))


def test_residual_is_formed_against_the_input_the_operator_consumes() -> None:
    """Under autocast the operator consumes bf16(a_t), so the residual is bf16(a_t) - a_hat and one step gives
    a_hat = bf16(a_hat + Q(bf16(a_t) - a_hat)), Q and the sum in float32 (not the float32 a_t's residual)."""
    layer = _single_layer(QuantConfig(weight=None, activation=A4, mode="modulated"))
    xs = _inputs(4, (2, 3, 6, 6))
    with trajectory(layer) as states, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(xs[0])
        for x in xs[1:]:
            previous = states[0].a_hat.float()
            layer(x)
            residual = x.to(torch.bfloat16).float() - previous
            assert torch.equal(states[0].a_hat, (previous + quantize_dynamic(residual, A4.spec)).to(torch.bfloat16))


def test_consumed_input_is_x_itself_without_autocast() -> None:
    x = torch.randn(2, 3)
    assert consumed(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert consumed(x).dtype == torch.bfloat16 and torch.equal(consumed(x), x.to(torch.bfloat16))


def test_error_equals_current_residual_rounding_only() -> None:
    """With compensation the output error is A(r_t - Q(r_t)) of the current residual alone."""
    layer = _single_layer(QuantConfig(weight=None, activation=A4, mode="modulated"))
    xs = _inputs(8, (2, 3, 6, 6))
    with trajectory(layer) as states:
        layer(xs[0])
        for x in xs[1:]:
            residual = x - states[0].a_hat
            out = layer(x)
            rounding = residual - quantize_dynamic(residual, A4.spec)
            exact = layer.op(x, layer.weight, layer.bias)
            torch.testing.assert_close(exact - out, layer.op(rounding, layer.weight, None), rtol=1e-4, atol=1e-5)


def test_without_compensation_errors_add_up() -> None:
    """Without compensation the output error is A(sum of all past residual rounding errors)."""
    layer = _single_layer(QuantConfig(weight=None, activation=A4, mode="modulated", compensation=False))
    xs = _inputs(10, (2, 3, 6, 6))
    total_rounding = torch.zeros_like(xs[0])
    with trajectory(layer):
        layer(xs[0])
        for prev, x in zip(xs, xs[1:]):
            residual = x - prev
            total_rounding += residual - quantize_dynamic(residual, A4.spec)
            out = layer(x)
            exact = layer.op(x, layer.weight, layer.bias)
            torch.testing.assert_close(exact - out, layer.op(total_rounding, layer.weight, None), rtol=1e-4, atol=1e-4)


def test_modiff_16_bits_matches_fp_every_step(tiny_denoiser: md.Denoiser) -> None:
    """A 16-bit MoDiff model follows the fp trajectory at every step (weights in fp)."""
    config = QuantConfig(weight=None, activation=ActQuant(QuantSpec(bits=16, granularity="sample")), mode="modulated")
    qmodel = quantize(tiny_denoiser, config)
    x_T, ts = md.noise(range(3), tiny_denoiser.sample_shape), md.timesteps(10)
    fp_steps, q_steps = [], []
    md.sample_ddim(tiny_denoiser, x_T, ts, callback=lambda s: fp_steps.append(s.eps))
    with trajectory(qmodel):
        md.sample_ddim(qmodel, x_T, ts, callback=lambda s: q_steps.append(s.eps))
    for fp, q in zip(fp_steps, q_steps):
        torch.testing.assert_close(q, fp, rtol=1e-3, atol=2e-3)


def test_exact_modulation_equals_fp(tiny_denoiser: md.Denoiser) -> None:
    """MoDiff with exact arithmetic (no quantizer) equals the fp model up to float rounding."""
    qmodel = quantize(tiny_denoiser, QuantConfig(weight=None, activation=None, mode="modulated"))
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(8)
    with trajectory(qmodel):
        out = md.sample_ddim(qmodel, x_T, ts)
    torch.testing.assert_close(out, md.sample_ddim(tiny_denoiser, x_T, ts), rtol=1e-4, atol=1e-4)


def test_per_step_reset_equals_weight_only(tiny_denoiser: md.Denoiser) -> None:
    """The published per-step reset makes MoDiff exactly weight-only quantization (bit for bit)."""
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(6)
    qmodel = quantize(tiny_denoiser, presets["w4a4-modiff"])
    with trajectory(qmodel, reset="per_step"):
        modulated = md.sample_ddim(qmodel, x_T, ts)
    weight_only = md.sample_ddim(quantize(tiny_denoiser, presets["w4a32"]), x_T, ts)
    assert torch.equal(modulated, weight_only)
    with trajectory(qmodel):
        assert not torch.equal(md.sample_ddim(qmodel, x_T, ts), weight_only)


def test_outside_trajectory_raises_and_state_is_cleared(tiny_denoiser: md.Denoiser) -> None:
    """A modulated model refuses calls outside trajectory(); state is dropped even after an exception."""
    qmodel = quantize(tiny_denoiser, presets["w8a8-modiff"])
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    with pytest.raises(RuntimeError, match="trajectory"):
        qmodel(x, t)
    with pytest.raises(ZeroDivisionError):
        with trajectory(qmodel) as states:
            qmodel(x, t)
            assert states[0].a_hat is not None
            raise ZeroDivisionError
    assert all(s.a_hat is None and s.calls == 0 and s.phase == "inactive" for s in states)
    assert all(m.state.phase == "inactive" for m in qmodel.modules() if isinstance(m, ModulatedLayer))
    with pytest.raises(RuntimeError, match="trajectory"):
        qmodel(x, t)


def test_nested_trajectory_and_batch_change_refused(tiny_denoiser: md.Denoiser) -> None:
    """Nesting trajectory() and changing the batch inside one trajectory are clear errors."""
    qmodel = quantize(tiny_denoiser, presets["w8a8-modiff"])
    with trajectory(qmodel):
        with pytest.raises(RuntimeError, match="already active"):
            with trajectory(qmodel):
                pass
        qmodel(torch.randn(2, 1, 16, 16), torch.tensor([5, 5]))
        with pytest.raises(RuntimeError, match="batch"):
            qmodel(torch.randn(3, 1, 16, 16), torch.tensor([4, 4, 4]))


def test_calling_a_submodule_inside_trajectory_raises(tiny_denoiser: md.Denoiser) -> None:
    """Steps are counted per call of the model given to trajectory(); bypassing it is refused, not miscounted."""
    qmodel = quantize(tiny_denoiser, presets["w8a8-modiff"])
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    with trajectory(qmodel):
        with pytest.raises(RuntimeError, match="ran twice in one step"):
            qmodel.net(x, t)
        qmodel(x, t)
        with pytest.raises(RuntimeError, match="ran twice in one step"):
            qmodel.net(x, t)


def test_trajectory_does_nothing_on_stateless_models(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, presets["w8a8"])
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    outside = qmodel(x, t)
    with trajectory(qmodel) as states, trajectory(tiny_denoiser) as fp_states:
        assert states == [] and fp_states == []
        assert not qmodel._forward_pre_hooks and "_modiff_hooks" not in qmodel.__dict__
        torch.testing.assert_close(qmodel(x, t), outside, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reset must be one of"):
        with trajectory(qmodel, reset="never"):  # type: ignore[arg-type]
            pass


def test_cache_reuses_and_refreshes() -> None:
    """Cache every 3 steps: skipped steps return the previous output; with compensation a refresh is
    exact (the skipped residual is carried), without it the skipped residuals are lost."""
    xs = _inputs(7, (2, 3, 6, 6))
    outs = {}
    for ec in (True, False):
        layer = _single_layer(QuantConfig(weight=None, activation=None, mode="cache", cache_interval=3, compensation=ec))
        with trajectory(layer):
            outs[ec] = [layer(x) for x in xs]
    exact = [_single_layer(QuantConfig(weight=None, activation=None, mode="fp"))(x) for x in xs]
    for step in (1, 2, 4, 5):
        assert torch.equal(outs[True][step], outs[True][step - 1])
    for step in (0, 3, 6):
        torch.testing.assert_close(outs[True][step], exact[step], rtol=1e-5, atol=1e-5)
    assert (outs[False][3] - exact[3]).abs().max() > 1e-2


def test_cache_interval_one_is_exact(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, QuantConfig(weight=None, activation=None, mode="cache", cache_interval=1))
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(5)
    with trajectory(qmodel):
        out = md.sample_ddim(qmodel, x_T, ts)
    torch.testing.assert_close(out, md.sample_ddim(tiny_denoiser, x_T, ts), rtol=1e-4, atol=1e-4)


def test_warmup_steps_run_in_full_precision() -> None:
    """The first k calls use exact activations (with quantized weights); bias enters once."""
    config = QuantConfig(weight=WeightQuant(QuantSpec(bits=4, granularity="channel", channel_axis=0)),
                         activation=A4, mode="modulated", warmup_steps=3)
    layer = _single_layer(config)
    xs = _inputs(4, (2, 3, 6, 6))
    with trajectory(layer):
        for x in xs[:3]:
            torch.testing.assert_close(layer(x), layer.op(x, layer.weight_q, layer.bias))
        assert not torch.allclose(layer(xs[3]), layer.op(xs[3], layer.weight_q, layer.bias), atol=1e-6)


@pytest.mark.parametrize("preset", ["w4a4-modiff", "cache5"])
@pytest.mark.slow
def test_compiled_modulated_model_has_one_graph_per_phase(tiny_denoiser: md.Denoiser, preset: str) -> None:
    """torch.compile traces modulated layers whole (no graph breaks, no per-step recompiles) and matches eager."""
    qmodel = quantize(tiny_denoiser, presets[preset])
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(7)
    with trajectory(qmodel):
        eager = md.sample_ddim(qmodel, x_T, ts)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    qmodel.net = torch.compile(qmodel.net, backend="eager", dynamic=False)
    for _ in range(2):
        with trajectory(qmodel):
            assert torch.equal(md.sample_ddim(qmodel, x_T, ts), eager)
    assert not counters["graph_break"]
    phases = {"w4a4-modiff": 2, "cache5": 3}[preset]  # warm-up and refresh; cache adds the skip step
    assert counters["stats"]["unique_graphs"] == phases


def _attention_layers(qmodel: md.Denoiser) -> list[nn.Module]:
    """q, k, v of the model's first attention block."""
    block = next(m for m in qmodel.modules() if getattr(m, "shared_input", None))
    return [block.q, block.k, block.v]


@pytest.mark.parametrize("preset", ["w4a4-modiff", "w8a4-modiff", "cache5"])
def test_attention_inputs_share_one_state_and_change_nothing(tiny_denoiser: md.Denoiser, preset: str) -> None:
    """q, k and v read one tensor: under a dynamic quantizer k and v read q's a_hat instead of repeating its
    update, with the same samples bit for bit and two input-sized tensors less of state."""
    qmodel = quantize(tiny_denoiser, presets[preset])
    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(6)
    outputs, sizes = {}, {}
    for share in (True, False):
        with trajectory(qmodel, share_inputs=share) as states:
            outputs[share] = md.sample_ddim(qmodel, x_T, ts)
            sizes[share] = state_bytes(states)
            q, k, v = _attention_layers(qmodel)
            assert (k.state.a_hat is q.state.a_hat and v.state.a_hat is q.state.a_hat) == share
            input_bytes = q.state.a_hat.numel() * q.state.a_hat.element_size()
    assert torch.equal(outputs[True], outputs[False])
    blocks = [m for m in qmodel.modules() if getattr(m, "shared_input", None)]
    assert len(blocks) > 1 and sizes[False] - sizes[True] >= 2 * input_bytes
    assert all(m.state.shared_with is None for m in qmodel.modules() if isinstance(m, ModulatedLayer))


@pytest.mark.parametrize("share", [True, False])
def test_attention_projections_as_one_matmul_change_nothing(tiny_denoiser: md.Denoiser, share: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On the fast path an attention block's modulated q, k and v hand their operands to one matmul where they
    share one a_hat (`linear_operands`), and to three convolutions where they do not: in float64 (where no
    rounding tie of the 4-bit residuals can flip between the two) every step's output equals that of the
    layers' own forwards, which did not run."""
    qmodel = quantize(tiny_denoiser, presets["w8a4-modiff"]).double()
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, *tiny_denoiser.sample_shape, generator=generator, dtype=torch.float64)
              for _ in range(4)]

    def steps() -> list[torch.Tensor]:
        with torch.no_grad(), trajectory(qmodel, share_inputs=share):
            return [qmodel(x, torch.full((2,), t)) for x, t in zip(inputs, (900, 800, 700, 600))]

    expected = steps()
    qkv = {layer.name for block in qmodel.modules() if getattr(block, "shared_input", None)
           for layer in (block.q, block.k, block.v)}
    calls: list[str] = []
    monkeypatch.setattr(ModulatedLayer, "forward", lambda self, x: self.op(*self.linear_operands(x))
                        if self.name not in qkv else calls.append(self.name))
    monkeypatch.setattr("modiff.models.ddim_unet.fast_path_input", lambda x: True)
    monkeypatch.setattr(GroupNorm, "forward", nn.GroupNorm.forward)  # the reference's statistics
    got = steps()
    assert not calls
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def test_only_pointwise_simulated_layers_are_multiplied_from_their_operands(tiny_denoiser: md.Denoiser) -> None:
    """`pointwise_projections` computes a modulated layer's product itself only for a 1x1, stride-1, unpadded
    convolution with a bias; the real backend (its forward multiplies the residual's codes) is always called."""
    from modiff.models.ddim_unet import _exposes_operands

    config = QuantConfig(activation=A4, mode="modulated")
    assert _exposes_operands(ModulatedLayer(nn.Conv2d(8, 8, 1), config, "pointwise"))
    for conv in (nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, padding=1),
                 nn.Conv2d(8, 8, 1, bias=False)):
        assert not _exposes_operands(ModulatedLayer(conv, config, "other"))
    real = quantize(tiny_denoiser, presets["w8a8-int8-modiff-real"])
    q, k, v = _attention_layers(real)
    assert type(q).__name__ == "RealModulatedLayer" and not any(_exposes_operands(m) for m in (q, k, v))


def test_static_quantizers_keep_one_state_per_layer(tiny_denoiser: md.Denoiser) -> None:
    """Ranges learned per layer make each layer's state its own: nothing is shared, and neither while observing."""
    config = QuantConfig(activation=ActQuant(QuantSpec(bits=4), dynamic=False), mode="modulated")
    qmodel = quantize(tiny_denoiser, config)
    q, k, v = _attention_layers(qmodel)
    assert q.input_state_key() is None and not shared_input_pairs(qmodel)
    dynamic = quantize(tiny_denoiser, presets["w4a4-modiff"])
    q, k, v = _attention_layers(dynamic)
    pairs = [(f.name, l.name) for f, l in shared_input_pairs(dynamic)]
    assert pairs[:2] == [(k.name, q.name), (v.name, q.name)] and len(pairs) % 2 == 0
    q.act.observing = True
    assert [(f.name, l.name) for f, l in shared_input_pairs(dynamic)][0] == (v.name, k.name)


def test_a_follower_called_before_its_leader_raises(tiny_denoiser: md.Denoiser) -> None:
    """The sharing relies on the declared call order; a module that breaks it gets an error, not k's input as q's."""
    qmodel = quantize(tiny_denoiser, presets["w4a4-modiff"])
    attention = next(m for m in qmodel.modules() if getattr(m, "shared_input", None))
    attention.shared_input = ("k", "q", "v")  # declares k first, but forward still calls q first
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    with trajectory(qmodel):
        with pytest.raises(RuntimeError, match="has not run in this step"):
            qmodel(x, t)
