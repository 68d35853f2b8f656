"""The real W8A8 backend on CUDA: the kernels as registered ops inside torch.compile and CUDA graphs, and a whole
MoDiff trajectory on the fast path (bf16 autocast, channels_last, compiled, CUDA graphs) against the simulator.

CUDA only (skipped elsewhere); the kernels' numerics are tested in test_real_kernels.py, which also runs on CUDA.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the real backend's kernels need CUDA")
pytest.importorskip("triton")

import modiff as md  # noqa: E402
from modiff.pipelines.cuda_graphs import CUDAGraphed  # noqa: E402
from modiff.pipelines.execution import ExecutionConfig, precision_context, prepared_network  # noqa: E402
from modiff.quant import presets, quantize, trajectory  # noqa: E402
from modiff.quant.layers.real import RealModulatedLayer  # noqa: E402

DEVICE = torch.device("cuda")


class _ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(5, 16, 3, padding=1)
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # no reduction between the layers: compiled = eager inputs
        return self.proj(self.conv(x).permute(0, 2, 3, 1))


class _Holder(nn.Module):
    """The model trajectory() hooks (as a Denoiser), around the network that is compiled (as CompiledNet)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("preset", ["w8a8-int8-real", "w8a8-fp8-real", "w8a8-int8-modiff-real", "w8a8-fp8-modiff-real",
                                    "w4a8-int8-real", "w4a8-int8-modiff-real"])
def test_compiled_graph_launches_the_registered_ops(preset: str) -> None:
    """fullgraph=True: the layers trace into one graph (no graph break at the kernels), whose outputs equal the
    eager layers' bit for bit (the same kernels on the same codes), in direct mode and over MoDiff steps."""
    torch.manual_seed(0)
    model = _ConvLinear()
    eager, held = (_Holder(quantize(model, presets[preset])).to(DEVICE) for _ in range(2))
    plain = held.net
    compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    xs = [torch.randn(3, 5, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    with trajectory(eager), trajectory(held):
        for step, x in enumerate(xs):
            held.net = plain if step == 0 else compiled  # the warm-up eagerly, as CompiledNet runs it
            assert torch.equal(held(x), eager(x))
    assert hasattr(torch.ops.modiff, "real_direct") and hasattr(torch.ops.modiff, "real_modulated")


def _fast_eps(model: md.Denoiser, x_T: torch.Tensor, ts, graphs: bool = True) -> tuple[list[torch.Tensor], int]:
    """eps per step on the fast path (bf16 autocast, channels_last, CompiledNet, CUDA graphs) and the graphs kept."""
    eps = []
    with prepared_network(model, DEVICE, ExecutionConfig(precision="bf16", compile=True, cuda_graphs=graphs)) as runner:
        with trajectory(runner), precision_context("bf16", DEVICE):
            md.sample_ddim(runner, x_T, ts, callback=lambda s: eps.append(s.eps.float()))
        graphs_kept = runner.net.graphs if isinstance(runner.net, CUDAGraphed) else 0
    return eps, graphs_kept


@pytest.mark.parametrize("fmt", ["int8"])  # FP8 takes the same path; one compilation pair keeps the GPU job short
def test_fast_path_modiff_trajectory_follows_the_simulator(tiny_denoiser: md.Denoiser, fmt: str) -> None:
    """A whole MoDiff trajectory of a tiny UNet on the fast path, real vs simulated (same config, same fast path):
    the steps replay as CUDA graphs, and the relative error of eps per step stays within a few times the
    simulator's own sensitivity to bf16 rounding (x_T perturbed by 2^-9, relative)."""
    x_T, ts = md.noise(range(4), tiny_denoiser.sample_shape).to(DEVICE), md.timesteps(8)
    real_eps, graphs = _fast_eps(quantize(tiny_denoiser, presets[f"w8a8-{fmt}-modiff-real"]), x_T, ts)
    sim = quantize(tiny_denoiser, presets[f"w8a8-{fmt}-modiff"])
    sim_eps, _ = _fast_eps(sim, x_T, ts)
    perturbed, _ = _fast_eps(sim, x_T * (1 + 2**-9), ts)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(real_eps, sim_eps)]
    sensitivity = [float((a - b).norm() / b.norm()) for a, b in zip(perturbed, sim_eps)]
    assert graphs >= 1
    assert all(torch.isfinite(e).all() for e in real_eps)
    assert max(errors) <= 3 * max(sensitivity) + 2e-2, (errors, sensitivity)


def test_modiff_warmup_starts_o_hat_in_float32(tiny_denoiser: md.Denoiser) -> None:
    """Under bf16 autocast the warm-up's o_hat is A_q(a) + b in float32: later steps only add exact integer
    products to it, so a start rounded to bf16 would stay in every output of the trajectory."""
    qmodel = quantize(tiny_denoiser, presets["w8a8-int8-modiff-real"]).to(DEVICE)
    layer = next(m for m in qmodel.modules() if isinstance(m, RealModulatedLayer) and m.weight.ndim == 4)
    x, t = torch.randn(2, *qmodel.sample_shape, device=DEVICE), torch.full((2,), 500, device=DEVICE)
    inputs = []
    hook = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().float()))
    with trajectory(qmodel), precision_context("bf16", DEVICE):
        qmodel(x, t)
        o_hat = layer.state.o_hat.clone()
    hook.remove()
    with precision_context("fp32", DEVICE):  # IEEE float32, as inside bf16's context (TF32 off)
        exact = layer.op(inputs[0], layer.weight_q.float(), layer.bias.float())
    torch.testing.assert_close(o_hat, exact, rtol=1e-5, atol=1e-5)
