"""CUDA graphs of sampling steps (`modiff.pipelines.cuda_graphs`): replays equal plain calls, and what is never replayed.

The replay tests need CUDA. On CPU: the property replays rely on (the MoDiff state keeps its addresses after
warm-up), and that the wrapper passes every call through where it cannot record one.
"""
from __future__ import annotations

import pytest
import torch

import modiff as md
from modiff.pipelines.cuda_graphs import CUDAGraphed
from modiff.pipelines.generate import SampleConfig, generate, read_samples
from modiff.quant import presets, quantize, trajectory
from modiff.quant.kernels import modulate as fused
from modiff.quant.layers.trajectory import replay_signature, stateful_layers
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.calibrate import CalibrationConfig, calibrate
from modiff.quant.ptq.data import CalibDataConfig, collect_calib_data
from modiff.quant.ptq.lsq import ActCalibConfig
from modiff.quant.ptq.saved import load_quantized, save_quantized

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")


@pytest.mark.parametrize("preset", ["w4a4-modiff", "w4a4-modiff-noec", "cache2-noec"])
def test_state_keeps_its_addresses_after_warmup(tiny_denoiser: md.Denoiser, preset: str) -> None:
    """After the warm-up call every step updates a_hat and a_ref in place; the signature of a call names each
    layer's phase and those addresses, and is None where a call cannot be replayed."""
    qmodel = quantize(tiny_denoiser, presets[preset])
    layers = stateful_layers(qmodel)
    x_T, ts = md.noise(range(2), qmodel.sample_shape), md.timesteps(5)
    signatures = []

    def before_step(_module, _args) -> None:
        signatures.append(replay_signature(layers))

    assert replay_signature(layers) is None  # outside trajectory()
    with trajectory(qmodel):
        hook = qmodel.net.register_forward_pre_hook(before_step)  # after trajectory's own: phases are set
        md.sample_ddim(qmodel, x_T, ts)
        hook.remove()
    assert signatures[0] is None  # warm-up: the state is allocated
    addresses = {tuple(entry[1:] for entry in s) for s in signatures[1:]}
    assert len(addresses) == 1 and None not in signatures[1:]
    compensated = presets[preset].compensation
    assert all((a_hat == a_ref) == compensated for a_hat, a_ref in next(iter(addresses)))
    phases = [tuple(entry[0] for entry in s) for s in signatures[1:]]
    if presets[preset].mode == "cache":
        assert {p[0] for p in phases} == {"refresh", "skip"}


def test_passes_calls_through_where_it_cannot_record(tiny_denoiser: md.Denoiser, tmp_path) -> None:
    """On CPU every call runs plainly; attributes of the network read through the wrapper; bad settings fail."""
    graphed = CUDAGraphed(tiny_denoiser.net)
    x, t = torch.randn(2, *tiny_denoiser.sample_shape), torch.tensor([10, 20])
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(graphed(x, t), tiny_denoiser.net(x, t))
    assert graphed.graphs == 0
    assert graphed.sample_shape == tiny_denoiser.sample_shape
    with pytest.raises(AttributeError):
        graphed.no_such_attribute
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphed(tiny_denoiser.net, max_graphs=0)
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA"):
            generate(tiny_denoiser, [0], tmp_path / "run", cuda_graphs=True, device="cpu", progress=False)


def _sample(model: md.Denoiser, stateful: bool, trajectories: int = 2) -> list[torch.Tensor]:
    x_T, ts = md.noise(range(3), model.sample_shape).cuda(), md.timesteps(6)
    outs = []
    for _ in range(trajectories):
        with trajectory(model) if stateful else torch.no_grad():
            outs.append(md.sample_ddim(model, x_T, ts))
    return outs


def _graphed_pair(tiny_denoiser: md.Denoiser, preset: str, compile_net: bool = False):
    plain = (tiny_denoiser if preset == "fp" else quantize(tiny_denoiser, presets[preset])).cuda()
    graphed = quantize(tiny_denoiser, presets[preset]).cuda() if preset != "fp" else md.Denoiser(
        plain.net, plain.schedule, "tiny", {})
    if compile_net:
        graphed.net = torch.compile(graphed.net, dynamic=False)
    graphed.net = CUDAGraphed(graphed.net)
    return plain, graphed


@needs_cuda
@pytest.mark.parametrize("preset", ["fp", "w4a4-modiff", "w4a4-modiff-noec", "w4a4", "cache2"])
def test_replays_equal_plain_calls(tiny_denoiser: md.Denoiser, preset: str) -> None:
    """Two trajectories each: the graphed model follows the plain one bit for bit (the same kernels)."""
    plain, graphed = _graphed_pair(tiny_denoiser, preset)
    stateful = preset != "fp" and presets[preset].stateful
    for expected, got in zip(_sample(plain, stateful), _sample(graphed, stateful)):
        assert torch.equal(got, expected)
    assert graphed.net.graphs >= 1


@needs_cuda
@pytest.mark.parametrize("kernels", [True, False])
def test_compiled_modiff_replays_equal_plain_calls(tiny_denoiser: md.Denoiser, kernels: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled network, with the Triton modulation step (in place) or the torch one, under bf16 autocast."""
    monkeypatch.setattr(fused, "_KERNELS", kernels)
    plain, graphed = _graphed_pair(tiny_denoiser, "w4a4-modiff", compile_net=True)
    plain.net = torch.compile(plain.net, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = _sample(plain, True), _sample(graphed, True)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
    assert graphed.net.graphs >= 1


@needs_cuda
def test_hooks_and_warmup_run_plainly(tiny_denoiser: md.Denoiser) -> None:
    """A hook anywhere in the network (a recorder's, say) keeps every call plain, so it sees every call;
    per-step resets make every call a warm-up call, which allocates state and is never recorded."""
    plain, graphed = _graphed_pair(tiny_denoiser, "w4a4-modiff")
    calls = []
    hook = next(iter(stateful_layers(graphed))).register_forward_hook(lambda *_: calls.append(1))
    assert torch.equal(_sample(graphed, True, 1)[0], _sample(plain, True, 1)[0])
    assert len(calls) == len(md.timesteps(6)) and graphed.net.graphs == 0
    hook.remove()
    x_T, ts = md.noise(range(3), plain.sample_shape).cuda(), md.timesteps(6)
    with trajectory(graphed, reset="per_step"):
        md.sample_ddim(graphed, x_T, ts)
    assert graphed.net.graphs == 0


@needs_cuda
def test_least_recently_used_graph_is_dropped(tiny_denoiser: md.Denoiser) -> None:
    """With room for one graph, calls of two batch sizes take turns: each new kind of call runs plainly once,
    is then recorded over the other's graph, and every output still equals the plain network's."""
    net = tiny_denoiser.net.cuda()
    graphed = CUDAGraphed(net, max_graphs=1)
    inputs = [(torch.randn(b, *tiny_denoiser.sample_shape, device="cuda"), torch.full((b,), 10, device="cuda"))
              for b in (2, 3)]
    with torch.no_grad():
        for x, t in inputs * 3:
            assert torch.equal(graphed(x, t), net(x, t))
            assert graphed.graphs <= 1
        assert graphed.graphs == 1


# Every kind of quantized model: direct, modulated (MoDiff), cache (0-bit skips), and calibrated static models
# saved by `modiff calibrate` and loaded back on the CPU, as `modiff sample --quantized RUN` loads them.
KINDS = ["w4a4", "w4a4-modiff", "cache2", "loaded:qdiff-w4a4", "loaded:qdiff-w4a4-modiff"]
FAST = CalibrationConfig(AdaRoundConfig(iters=4, batch_size=4, log_every=2), ActCalibConfig(iters=4, batch_size=4, log_every=2))


def _builder(tiny_denoiser: md.Denoiser, kind: str, folder):
    """A function that makes the model of ``kind`` afresh on the CPU (calibrated and saved once, on the CPU)."""
    if not kind.startswith("loaded:"):
        return lambda: quantize(tiny_denoiser, presets[kind])
    preset = kind.split(":")[1]
    data = collect_calib_data(tiny_denoiser, CalibDataConfig(steps=6, calib_steps=2, samples_per_step=4))
    save_quantized(calibrate(tiny_denoiser, presets[preset], data, FAST, progress=False)[0], folder)
    return lambda: load_quantized(tiny_denoiser, folder)


@needs_cuda
@pytest.mark.parametrize("kind, compile_net", [*((kind, False) for kind in KINDS),
                                               *((kind, True) for kind in KINDS if kind.startswith("loaded:"))])
def test_every_kind_of_quantized_model_is_captured(tiny_denoiser: md.Denoiser, tmp_path, kind: str,
                                                   compile_net: bool) -> None:
    """Made on the CPU, moved to the GPU, then sampled twice with graphs: graphs are recorded and the samples
    equal the plain model's bit for bit; the loaded calibrated models also compiled (the compiled modulated
    model: `test_compiled_modiff_replays_equal_plain_calls`). A loaded calibrated model used to move its
    activation scales to the GPU on its first call, inside what was being recorded."""
    build = _builder(tiny_denoiser, kind, tmp_path / "saved")
    plain, graphed = build().cuda(), build().cuda()
    if compile_net:
        plain.net = torch.compile(plain.net, dynamic=False)
        graphed.net = torch.compile(graphed.net, dynamic=False)
    graphed.net = CUDAGraphed(graphed.net)
    for expected, got in zip(_sample(plain, True), _sample(graphed, True)):
        assert torch.equal(got, expected)
    assert graphed.net.graphs >= 1


@needs_cuda
def test_sample_a_loaded_calibrated_model_with_cuda_graphs(tiny_denoiser: md.Denoiser, tmp_path) -> None:
    """The path of `modiff sample --quantized RUN --cuda-graphs`: generate() with graphs writes the images
    that it writes without them."""
    build = _builder(tiny_denoiser, "loaded:qdiff-w4a4-modiff", tmp_path / "saved")
    runs = {}
    for cuda_graphs in (False, True):
        out = tmp_path / f"graphs-{cuda_graphs}"
        generate(build(), range(6), out, SampleConfig(steps=6), batch_size=3, device="cuda", prepare=trajectory,
                 cuda_graphs=cuda_graphs, progress=False)
        runs[cuda_graphs] = read_samples(out / "samples", range(6))
    assert (runs[True] == runs[False]).all()


def test_hook_check_sees_hooks_added_after_wrapping(tiny_denoiser: md.Denoiser) -> None:
    """The check walks the modules listed at wrapping (no CUDA needed): a forward or pre-forward hook added
    later on any of them, or a global one, is seen; removing it makes calls recordable again."""
    graphed = CUDAGraphed(tiny_denoiser.net)
    deep = list(tiny_denoiser.net.modules())[-1]
    assert not graphed._has_hooks()
    for register in (deep.register_forward_hook, deep.register_forward_pre_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *_: None)
        assert graphed._has_hooks()
        handle.remove()
        assert not graphed._has_hooks()
