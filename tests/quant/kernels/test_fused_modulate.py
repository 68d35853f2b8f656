"""The Triton modulation step (`modiff.quant.kernels.modulate`) against the torch one (`modiff.quant.layers.modulated._modulate_dynamic`).

Without CUDA the kernels run on CPU tensors in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton), bit for bit like the torch step. The value tests run both
the two-kernel step and the one-pass kernel; the interpreter runs one program at a time, so there the one-pass
kernel gets one chunk per sample, and its barrier between a sample's chunks runs only on CUDA.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Optional

import pytest
import torch
from torch import nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytest.importorskip("triton")

from modiff.quant import presets, quantize, trajectory  # noqa: E402
from modiff.quant.layers import trajectory as modulated  # noqa: E402
from modiff.quant.kernels import modulate as fused  # noqa: E402
from modiff.quant.kernels import modulate_triton  # noqa: E402
from modiff.quant.kernels.modulate import (fused_modulate_supported, modulate_per_sample, one_pass_chunks,  # noqa: E402
                                one_pass_modulation, register_op, use_fused_modulate)
from modiff.quant.layers.direct import _split  # noqa: E402
from modiff.quant.layers.modulated import _modulate_dynamic  # noqa: E402
from modiff.quant.primitives import QuantSpec, qparams_from_range, reduce_range  # noqa: E402


def _state(x: torch.Tensor, noise: float, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x.cpu() + noise * torch.randn(x.shape, generator=gen)).to(DEVICE, dtype).contiguous(
        memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4
        else torch.contiguous_format)


def _torch_step(x: torch.Tensor, a_hat: torch.Tensor, a_ref: torch.Tensor, spec: QuantSpec, split,
                compensation: bool) -> torch.Tensor:
    """The new a_hat of the torch step, run on copies of the state."""
    new = a_hat.clone()
    _modulate_dynamic(x, new, new if compensation else a_ref.clone(), spec, split, compensation)
    return new


def _kernel_step(x: torch.Tensor, a_hat: torch.Tensor, a_ref, spec: QuantSpec, split) -> torch.Tensor:
    """The new a_hat of the kernels, run on a copy of a_hat (a_ref None: the copy itself)."""
    new = a_hat.clone()
    modulate_per_sample(x, new, a_ref, spec, split)
    return new


@pytest.fixture(params=["two kernels", "one pass"])
def kernels(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which modulation kernels the test runs; a spy checks that the one-pass kernel is the one launched."""
    one_pass = request.param == "one pass"
    launched = []
    wrap_triton = torch.library.wrap_triton
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: launched.append(kernel) or wrap_triton(kernel))
    with one_pass_modulation(one_pass):
        yield request.param
    assert launched and (modulate_triton.one_pass_kernel in launched) == one_pass


def _near_rounding_boundary(residual: torch.Tensor, spec: QuantSpec, split) -> torch.Tensor:
    """Where residual / scale lies within 1e-3 of a rounding boundary (a half step for round to nearest, a
    step for floor), or where a code saturates at the clamp: one ulp of the scale can move such values by
    one step."""
    near = []
    for r in _split(residual.float(), split):
        scale, zero = qparams_from_range(*reduce_range(r, spec), spec)
        scaled = r * scale.reciprocal()
        offset = scaled - scaled.floor()
        distance = (offset - 0.5).abs() if spec.rounding == "nearest" else torch.minimum(offset, 1 - offset)
        code = scaled.round() + zero
        near.append((distance < 1e-3) | (code <= spec.qmin + 1) | (code >= spec.qmax - 1))
    return torch.cat(near, dim=1)


def _assert_matches_torch(new: torch.Tensor, ref: torch.Tensor, residual: torch.Tensor, spec: QuantSpec,
                          split=None) -> None:
    """Bit for bit in the interpreter (the same float32 operations in the same order). On CUDA torch divides
    by a Python scalar through its reciprocal (the scale can differ in its last bit) and the kernel may fuse
    the final multiply-add (the sum can differ in its last bit, one bfloat16 ulp after the cast): values
    near a rounding boundary may then land one step away (seen on an H200), every other value agrees to
    an ulp of the output dtype."""
    if DEVICE.type == "cpu":
        torch.testing.assert_close(new, ref, rtol=0, atol=0, equal_nan=True)
        return
    assert torch.equal(new.isnan(), ref.isnan())
    ulp = torch.finfo(new.dtype).eps
    new, ref = new.float().nan_to_num(), ref.float().nan_to_num()
    finite = residual.nan_to_num(posinf=0, neginf=0)
    step = 2 * finite.abs().amax().item() / (2 ** (spec.bits - 1) - 1)
    error = (new - ref).abs()
    ulps = ulp * (ref.abs() + finite.abs() + step) + 1e-6  # an ulp of the largest term of a_hat + q
    near = _near_rounding_boundary(finite, spec, split)
    assert (error[~near] <= ulps[~near]).all(), "a value away from every rounding boundary differs"
    assert (error <= step + ulps).all(), "a value is more than one step away"


@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric", "symmetric-published"])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("compensation", [True, False])
def test_equals_the_torch_step(kernels: str, scheme: str, rounding: str, split, compensation: bool) -> None:
    """Every scheme and rounding, with and without a split shortcut and error compensation (a_ref is a_hat,
    or the previous exact input), in both memory formats."""
    spec = QuantSpec(bits=4, granularity="sample", scheme=scheme, rounding=rounding)
    gen = torch.Generator().manual_seed(1)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 8, 5, 7, generator=gen).to(DEVICE).contiguous(memory_format=memory_format)
        a_hat = _state(x, 0.3, 2)
        a_ref = a_hat if compensation else _state(x, 0.1, 3)
        ref = _torch_step(x, a_hat, a_ref, spec, split, compensation)
        new = _kernel_step(x, a_hat, None if compensation else a_ref, spec, split)
        _assert_matches_torch(new, ref, x.float() - a_ref.float(), spec, split)


@pytest.mark.parametrize("shape", [(2, 4100, 3), (3, 5), (2, 64, 300, 40)])
def test_chunks_and_dtypes(kernels: str, shape: tuple[int, ...]) -> None:
    """Samples of one, several and over 256 chunks (the chunk then grows), float32 input and float32 state,
    8 bits, with ties between candidates of rounding (values on half steps)."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randint(-40, 40, shape, generator=gen) / 8.0).to(DEVICE)
    a_hat = torch.zeros(shape, device=DEVICE)
    spec = QuantSpec(bits=8, granularity="sample", scheme="symmetric")
    ref = _torch_step(x, a_hat, a_hat, spec, None, True)
    _assert_matches_torch(_kernel_step(x, a_hat, None, spec, None), ref, x, spec)
    _assert_matches_torch(_kernel_step(x, a_hat, a_hat.clone(), spec, None), ref, x, spec)  # a_ref apart, equal


@pytest.mark.parametrize("n, max_chunks, expected", [
    (12300, 264, (4096, 4)),  # the two kernels' chunking where the limit does not bind
    (768000, 264, (4096, 188)),
    (2_000_000, 264, (7813, 256)),  # at most 256 chunks, as the two kernels
    (768000, 40, (19200, 40)),  # a small GPU: 2 programs per SM of 20
    (768000, 1, (768000, 1)),  # the interpreter: one chunk
    (100, 1, (4096, 1)),
])
def test_one_pass_chunks_fit_the_device(n: int, max_chunks: int, expected: tuple[int, int]) -> None:
    chunk, chunks = one_pass_chunks(n, max_chunks)
    assert (chunk, chunks) == expected and chunks <= max_chunks and chunk * chunks >= n > chunk * (chunks - 1)


def test_nan_and_infinite_inputs_propagate_like_torch(kernels: str) -> None:
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x[0, 1, 2] = float("nan")
    x[1, 0, 0] = float("inf")
    a_hat = torch.zeros_like(x)
    spec = QuantSpec(bits=4, granularity="sample")
    ref = _torch_step(x, a_hat, a_hat, spec, None, True)
    new = _kernel_step(x, a_hat, None, spec, None)
    _assert_matches_torch(new, ref, x, spec)
    assert new[0].isnan().all() and not new[2].isnan().any()  # a sample's NaN stays in that sample


def test_kernels_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers take the kernels for CUDA tensors (unless switched off, as the benchmarks do), never for CPU
    tensors outside these interpreter tests."""
    assert not use_fused_modulate(torch.zeros(4096, 3))
    if DEVICE.type == "cuda":
        assert use_fused_modulate(torch.zeros(2, 3, device=DEVICE))
        monkeypatch.setattr(fused, "_KERNELS", False)
        assert not use_fused_modulate(torch.zeros(2, 3, device=DEVICE))


def test_what_is_supported_and_errors() -> None:
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    sample = QuantSpec(bits=4, granularity="sample")
    assert fused_modulate_supported(x, x, x, sample)
    assert not fused_modulate_supported(x, x, x, QuantSpec(bits=4, granularity="tensor"))
    assert not fused_modulate_supported(x, x, x, QuantSpec(bits=0, granularity="sample"))
    assert not fused_modulate_supported(x, x, x, None)
    other_layout = x.contiguous(memory_format=torch.channels_last)
    assert not fused_modulate_supported(x, other_layout, x, sample)
    assert not fused_modulate_supported(x[:, :, :, :2], x[:, :, :, :2], x[:, :, :, :2], sample)  # not dense
    with pytest.raises(ValueError, match="per-sample dynamic"):
        modulate_per_sample(x, x, x, QuantSpec(bits=4, granularity="tensor"), None)
    with pytest.raises(ValueError, match="split must be in"):
        modulate_per_sample(x, x, x, sample, 4)


def test_trajectory_registers_the_op_before_any_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled graph only reads the registered op, so trajectory() registers it eagerly on entry (for
    per-sample dynamic quantizers), before the model runs. A spy stands in for the registration: the op
    itself can be registered once per process."""
    calls = []
    monkeypatch.setattr(modulated, "register_op", lambda: calls.append(1))
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with trajectory(quantize(model, presets["published-w4a4-modiff"])):  # per-tensor ranges: torch step
        assert not calls
    with trajectory(quantize(model, presets["w8a8-modiff"])):
        assert calls
    register_op()
    assert fused._OP is not None


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA: the layers take the Triton step on CUDA only")
def test_modulated_layers_take_it_on_cuda() -> None:
    """A w4a4-modiff network on CUDA against the same network on the CPU (the torch step), step by step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
    qmodels = {d: quantize(model, presets["w4a4-modiff"]).to(d) for d in ("cpu", "cuda")}
    xs = [torch.randn(2, 3, 8, 8) * (1 + s / 4) for s in range(4)]
    outs = {}
    for d, qmodel in qmodels.items():
        with trajectory(qmodel), torch.no_grad():
            outs[d] = [qmodel(x.to(d)).cpu() for x in xs]
    for cpu, cuda in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=0.05, atol=0.05)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA: compiled networks launch the Triton step on CUDA only")
@pytest.mark.parametrize("bf16, tolerance", [(False, 0.01), (True, 0.05)])
@pytest.mark.parametrize("one_pass", [False, True])
def test_compiled_network_equals_eager(tiny_denoiser, bf16: bool, tolerance: float, one_pass: bool) -> None:
    """The tiny UNet (split shortcuts included) under w8a8-modiff, compiled against eager on CUDA in
    channels_last, in float32 and under bf16 autocast as in bench_quant.py: inductor keeps the strides the
    kernels were traced with. The two round differently (fused multiply-adds; bf16 casts inductor skips),
    which can move a code by one step: 8 bits keep that small, a wrong layout or split would not be.
    With the one-pass kernel, the compiled graph also allocates and fills its barrier's buffers (the choice is
    an argument of the op, so the compile caches cannot hand the other parametrization's graph back)."""
    torch._dynamo.reset()
    with one_pass_modulation(one_pass):
        _compiled_against_eager(tiny_denoiser, bf16, tolerance)


def _compiled_against_eager(tiny_denoiser, bf16: bool, tolerance: float) -> None:
    config = dataclasses.replace(presets["w8a8-modiff"], split_shortcut=True)
    qmodel = quantize(tiny_denoiser, config).cuda().to(memory_format=torch.channels_last)
    assert any(getattr(m, "split", None) for m in qmodel.modules())
    compiled = quantize(tiny_denoiser, config).cuda().to(memory_format=torch.channels_last)
    compiled.net = torch.compile(compiled.net, dynamic=False)
    x = torch.randn(4, *qmodel.sample_shape, generator=torch.Generator().manual_seed(6)).cuda()
    outs = []
    for model in (qmodel, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), trajectory(model), torch.no_grad():
            outs.append([model(x * (1 - s / 8), torch.full((4,), 900 - 100 * s, device="cuda")).float()
                         for s in range(4)])
    for eager, fast in zip(*outs):
        assert ((fast - eager).norm() / eager.norm()).item() < tolerance


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA: compiled networks launch the Triton step on CUDA only")
def test_compiled_shared_attention_state_equals_one_state_per_layer(tiny_denoiser, monkeypatch) -> None:
    """Under inductor and bf16 autocast, k and v read the a_hat that q's Triton step updated in place earlier
    in the same graph: the graph must order that write before their reads. Same samples as one state per layer.
    Both sides take the three convolutions: shared, the fast path would multiply the one a_hat in one matmul
    (`pointwise_projections`), whose bf16 rounding differs from the convolutions' and, through the 4-bit
    residuals, moves the samples by more than this tolerance (on the H200: 0.9%); the float64 test of that path
    is in tests/quant/test_modulated.py, and the compiled-against-eager test above runs it."""
    monkeypatch.setattr("modiff.models.ddim_unet._exposes_operands", lambda module: False)
    outs = {}
    for share in (True, False):
        torch._dynamo.reset()
        model = quantize(tiny_denoiser, presets["w8a4-modiff"]).cuda().to(memory_format=torch.channels_last)
        model.net = torch.compile(model.net, dynamic=False)
        x = torch.randn(4, *model.sample_shape, generator=torch.Generator().manual_seed(6)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16), trajectory(model, share_inputs=share), torch.no_grad():
            outs[share] = [model(x * (1 - s / 8), torch.full((4,), 900 - 100 * s, device="cuda")).float()
                           for s in range(4)]
    for shared, separate in zip(outs[True], outs[False]):
        assert ((shared - separate).norm() / separate.norm()).item() < 1e-3


@torch.library.custom_op("modiff_test::modulate_spy", mutates_args=("a_hat",))
def _modulate_spy(x: torch.Tensor, a_hat: torch.Tensor, a_ref: Optional[torch.Tensor], levels: torch.Tensor,
                  qmin: torch.Tensor, qmax: torch.Tensor, scheme: str, floor: bool, split: int, one_pass: bool,
                  source: str) -> None:
    """Stands in for the modulation op where Dynamo traces a launch on the CPU (the interpreter needs real data)."""


@_modulate_spy.register_fake
def _(*args) -> None:
    return None


def test_the_kernel_choice_and_the_code_are_arguments_of_the_compiled_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's graphs, and the keys of its caches on disk, see an op's arguments, not what its body reads or
    launches: the one-pass choice and the code's digest are arguments, and changing either compiles again (before,
    a warm cache replayed the two kernels under `one_pass_modulation`). Dynamo traces the launch with a spy op in
    place of the Triton one."""
    monkeypatch.setattr(fused, "_OP", _modulate_spy)
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs) -> object:
        graphs.append([node.args[-2:] for node in gm.graph.nodes
                       if node.target is torch.ops.modiff_test.modulate_spy.default])
        return gm.forward

    spec = QuantSpec(bits=4, granularity="sample")
    torch._dynamo.reset()
    step = torch.compile(lambda x, a_hat: fused.launch_modulate(x, a_hat, None, spec, None), backend=backend,
                         dynamic=False)
    x = torch.randn(2, 4, 8, 8)
    for one_pass, source in ((False, "code"), (True, "code"), (False, "code"), (False, "edited code")):
        monkeypatch.setattr(fused, "_SOURCE", source)
        with one_pass_modulation(one_pass):
            step(x, torch.zeros_like(x))
    torch._dynamo.reset()
    assert graphs == [[(False, "code")], [(True, "code")], [(False, "edited code")]]  # the third call reuses the first


def test_the_code_digest_covers_the_op_and_its_kernels() -> None:
    """The digest the op takes is of modulate.py and modulate_triton.py, so an edit of either reaches the caches."""
    import hashlib
    from pathlib import Path

    from modiff.quant.kernels import source_digest

    register_op()
    folder = Path(fused.__file__).parent
    expected = hashlib.sha256((folder / "modulate.py").read_bytes() + (folder / "modulate_triton.py").read_bytes())
    assert fused._SOURCE == source_digest("modulate", "modulate_triton") == expected.hexdigest()[:16]
    assert source_digest("modulate") != source_digest("modulate", "modulate_triton")


def test_inductor_can_copy_the_kernels(tmp_path) -> None:
    """A compiled graph imports a copy of each kernel's source with the module constants it reads, written
    out by repr: every constant must survive that (an enum constexpr once did not, failing every compile on
    CUDA). Checked on the JIT functions, in a process without the interpreter."""
    script = (
        "import importlib.util, pathlib, sys\n"
        "from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as copy\n"
        "from modiff.quant.kernels import modulate_triton as kernels\n"
        "assert 'ROUNDER = ' in copy(kernels.update_kernel)\n"
        "for kernel in (kernels.ranges_kernel, kernels.update_kernel, kernels.one_pass_kernel):\n"
        "    path = pathlib.Path(sys.argv[1]) / f'copied_{kernel.__name__}.py'\n"
        "    path.write_text('import triton\\nimport triton.language as tl\\n' + copy(kernel))\n"
        "    spec = importlib.util.spec_from_file_location(path.stem, path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
