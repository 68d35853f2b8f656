"""The fast path resolved in one place (`modiff.pipelines.execution`), and `CompiledNet`: one compiled graph per
structure, shared by every preset of an architecture and every sampling step, equal to eager."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import modiff as md
from modiff.pipelines.execution import (CompiledNet, ExecutionConfig, PaddedBatch, prepare_network, prepared_network,
                                        resolve_execution, resolve_precision)
from modiff.pipelines.generate import SampleConfig
from modiff.quant import presets, quantize, trajectory

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU: resolution is pure


def test_cuda_takes_the_fast_path_and_the_cpu_stays_eager() -> None:
    assert resolve_execution(CUDA) == ExecutionConfig(precision="bf16", compile=True, cuda_graphs=True)
    assert resolve_execution(torch.device("cuda:1")).cuda_graphs
    assert resolve_execution(CPU) == ExecutionConfig(precision="fp32", compile=False, cuda_graphs=False)
    assert resolve_precision("auto", CUDA) == "bf16" and resolve_precision("auto", CPU) == "fp32"


def test_explicit_choices_win() -> None:
    assert resolve_execution(CUDA, "fp32") == ExecutionConfig(precision="fp32", compile=True, cuda_graphs=True)
    assert resolve_execution(CUDA, compile=False, cuda_graphs=False) == ExecutionConfig("bf16", False, False)
    assert resolve_execution(CPU, "bf16", compile=True) == ExecutionConfig("bf16", True, False)
    assert resolve_execution(CPU, "tf32", cuda_graphs=False).precision == "tf32"
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, got cpu"):
        resolve_execution(CPU, cuda_graphs=True)
    with pytest.raises(ValueError, match="unknown precision 'fp16'; allowed: auto, fp32, tf32, bf16"):
        resolve_execution(CUDA, "fp16")
    with pytest.raises(ValueError, match="allowed: fp32, tf32, bf16"):
        ExecutionConfig(precision="auto")  # type: ignore[arg-type]  # a resolved config holds a real precision


def test_networks_called_with_keywords_default_to_no_cuda_graphs() -> None:
    """A diffusers network (called with timestep=, encoder_hidden_states=) is compiled on CUDA, never
    replayed as CUDA graphs (they take tensors by position); asking for them is refused."""
    assert resolve_execution(CUDA, keyword_net=True) == ExecutionConfig(precision="bf16", compile=True, cuda_graphs=False)
    assert resolve_execution(CUDA, keyword_net=True, cuda_graphs=False).compile
    with pytest.raises(ValueError, match="takes keywords: leave CUDA graphs off"):
        resolve_execution(CUDA, keyword_net=True, cuda_graphs=True)
    from modiff.models.diffusers.denoiser import DiffusersDenoiser

    assert DiffusersDenoiser.net_takes_keywords and not md.Denoiser.net_takes_keywords


class _KeywordNet(torch.nn.Module):
    """A network called the diffusers way: keywords in, a tuple out."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        assert not return_dict
        return (x * timestep.view(-1, 1),)


def test_compiled_and_padded_networks_pass_keyword_calls_through() -> None:
    x, t = torch.randn(3, 2), torch.arange(3.0)
    expected = _KeywordNet()(x, timestep=t, return_dict=False)[0]
    padded = PaddedBatch(CompiledNet(_KeywordNet(), backend="eager"), batch_size=8)
    out = padded(x, timestep=t, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], expected)  # not padded to 8 rows, not cut as a tensor


def test_sample_config_resolves_auto_precision_only() -> None:
    config = SampleConfig(steps=3)
    assert config.precision == "auto"
    assert config.resolved(CUDA).precision == "bf16" and config.resolved(CPU).precision == "fp32"
    assert SampleConfig(precision="tf32").resolved(CUDA).precision == "tf32"


def test_prepare_network_on_the_cpu(tiny_denoiser: md.Denoiser) -> None:
    net = tiny_denoiser.net
    eager = prepare_network(tiny_denoiser, CPU, resolve_execution(CPU))
    assert eager.net is net and next(net.parameters()).is_contiguous()
    compiled = prepare_network(tiny_denoiser, CPU, ExecutionConfig(compile=True))
    assert isinstance(compiled.net, CompiledNet) and compiled.net.net is net
    assert compiled.net.sample_shape == net.sample_shape  # read through the wrapper
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        prepare_network(tiny_denoiser, CPU, ExecutionConfig(cuda_graphs=True))


def test_prepared_network_gives_the_network_back(tiny_denoiser: md.Denoiser) -> None:
    """A later quantize() or run must start from the plain network, never from a wrapper of an earlier run."""
    net = tiny_denoiser.net
    with pytest.raises(KeyError):
        with prepared_network(tiny_denoiser, CPU, ExecutionConfig(compile=True)) as runner:
            assert runner is tiny_denoiser and isinstance(runner.net, CompiledNet)
            raise KeyError("the run failed")
    assert tiny_denoiser.net is net


def _sample(model: md.Denoiser, steps: int = 5) -> torch.Tensor:
    x_T, ts = md.noise(range(2), model.sample_shape), md.timesteps(steps)
    with trajectory(model):
        return md.sample_ddim(model, x_T, ts)


@pytest.mark.slow
def test_presets_and_steps_share_one_graph_per_structure(tiny_denoiser: md.Denoiser) -> None:
    """Compiled under one preset, other bit widths (direct and MoDiff) and every sampling step reuse the
    graphs: one per structure (direct; modulated refresh; modulated without error compensation), the warm-up
    step runs eagerly, nothing breaks the graph, and every output equals eager fake quantization."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = CompileCounter()
    new_graphs = {}
    for preset in ("w8a8", "w4a4", "w8a3", "w8a8-modiff", "w4a4-modiff", "w8a2-modiff", "w4a6-modiff-noec",
                   "w8a4-modiff-noec"):
        qmodel = quantize(tiny_denoiser, presets[preset])
        eager = _sample(qmodel)
        before = backend.frame_count
        out = _sample(md.Denoiser(CompiledNet(qmodel.net, backend=backend), qmodel.schedule, "tiny", {}))
        new_graphs[preset] = backend.frame_count - before
        assert torch.equal(out, eager), preset
    assert new_graphs == {"w8a8": 1, "w4a4": 0, "w8a3": 0, "w8a8-modiff": 1, "w4a4-modiff": 0, "w8a2-modiff": 0,
                          "w4a6-modiff-noec": 1, "w8a4-modiff-noec": 0}
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.slow
def test_structures_past_dynamos_limit_still_compile(tiny_denoiser: md.Denoiser) -> None:
    """Past dynamo's recompile limit a plain torch.compile runs eagerly without a word; CompiledNet raises
    the limit for its calls, so every structure of the presets gets its graph."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        for wrap, expected in ((lambda net, b: torch.compile(net, backend=b, dynamic=False), 1),
                               (lambda net, b: CompiledNet(net, backend=b), 2)):
            torch._dynamo.reset()
            backend = CompileCounter()
            for preset in ("w8a8", "published-w8a8-modiff"):
                qmodel = quantize(tiny_denoiser, presets[preset])
                _sample(md.Denoiser(wrap(qmodel.net, backend), qmodel.schedule, "tiny", {}), steps=3)
            assert backend.frame_count == expected


def test_calls_outside_trajectory_raise_the_layers_error(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, presets["w8a8-modiff"])
    net = CompiledNet(qmodel.net, backend=CompileCounter())
    x = md.noise(range(1), tiny_denoiser.sample_shape)
    with pytest.raises(RuntimeError, match="inside `with modiff.trajectory"):
        net(x, torch.zeros(1, dtype=torch.long))
    assert net.compiled._orig_mod is qmodel.net


def test_padded_batch_fills_the_last_batch_with_its_own_rows(tiny_denoiser: md.Denoiser) -> None:
    """A last batch of 2 runs as the 5 rows 0, 1, 1, 1, 1 over a whole MoDiff trajectory (the state holds 5);
    one call gives what the 2 rows get alone, up to the float rounding of kernels that depend on the batch
    size, also under the published per-tensor quantizers (repeats of the last row join its run of samples
    and add no value to its range, even where runs of 2 samples share a scale)."""
    from modiff.pipelines.execution import PaddedBatch

    x_T, ts = md.noise(range(2), tiny_denoiser.sample_shape), md.timesteps(4)
    qmodel = quantize(tiny_denoiser, presets["published-w8a4-modiff"])
    padded = md.Denoiser(PaddedBatch(qmodel.net, 5), qmodel.schedule, "tiny", {})
    with trajectory(padded) as states:
        out = md.sample_ddim(padded, x_T, ts)
        assert states[0].a_hat.shape[0] == 5
    with trajectory(qmodel):
        filled = md.sample_ddim(qmodel, x_T[[0, 1, 1, 1, 1]], ts)
    assert torch.equal(out, filled[:2])
    t = torch.full((2,), 500)
    for preset in ("fp", "published-w8a8"):
        net = quantize(tiny_denoiser, presets[preset]).net
        torch.testing.assert_close(PaddedBatch(net, 5)(x_T, t), net(x_T, t), rtol=1e-5, atol=1e-5)
        assert PaddedBatch(net, 2)(x_T, t).shape == x_T.shape  # a full batch passes through
    published = presets["published-w8a4"]
    runs_of_two = replace(published, activation=replace(published.activation,
                                                        spec=replace(published.activation.spec, samples_per_scale=2)))
    net, x, t = quantize(tiny_denoiser, runs_of_two).net, md.noise(range(3), tiny_denoiser.sample_shape), torch.full((3,), 500)
    torch.testing.assert_close(PaddedBatch(net, 6)(x, t), net(x, t), rtol=1e-5, atol=1e-5)  # runs (0, 1), (2)
    assert padded.net.sample_shape == tiny_denoiser.sample_shape
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PaddedBatch(qmodel.net, 0)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: inductor, the Triton step and CUDA graphs")
def test_fast_path_on_cuda_shares_graphs_between_bit_widths(tiny_denoiser: md.Denoiser) -> None:
    """Inductor on CUDA, bf16 autocast: w4a4-modiff reuses w8a8-modiff's graph (the Triton step reads the
    bit width from memory) and stays close to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("inductor")
    x_T, ts = md.noise(range(3), tiny_denoiser.sample_shape).cuda(), md.timesteps(6)
    for preset, new_graphs in (("w8a8-modiff", 1), ("w4a4-modiff", 0)):
        qmodel = quantize(tiny_denoiser, presets[preset]).cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16), trajectory(qmodel):
            eager = md.sample_ddim(qmodel, x_T, ts)
        before = backend.frame_count
        compiled = md.Denoiser(CompiledNet(qmodel.net, backend=backend), qmodel.schedule, "tiny", {})
        with torch.autocast("cuda", dtype=torch.bfloat16), trajectory(compiled):
            out = md.sample_ddim(compiled, x_T, ts)
        assert backend.frame_count - before == new_graphs, preset
        assert ((out - eager).abs().mean() / eager.abs().mean()) < 0.05, preset


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generate_takes_the_fast_path_on_cuda_and_opts_out(tmp_path, tame_denoiser: md.Denoiser) -> None:
    import json

    from modiff.pipelines.generate import generate

    net = tame_denoiser.net
    for name, kwargs, expected in (("fast", {}, ("bf16", True, True)),
                                   ("plain", dict(compile=False, cuda_graphs=False), ("fp32", False, False))):
        config = SampleConfig(steps=4, precision="auto" if name == "fast" else "fp32")
        out = generate(tame_denoiser, range(5), tmp_path / name, config, batch_size=4, device="cuda", progress=False,
                       **kwargs)
        manifest = json.loads((out / "manifest.json").read_text())
        found = (manifest["identity"]["sample"]["precision"], manifest["identity"]["execution"]["compile"],
                 manifest["sessions"][0]["cuda_graphs"])
        assert found == expected and len(list((out / "samples").glob("*.png"))) == 5
        assert tame_denoiser.net is net  # given back
