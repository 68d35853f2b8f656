"""benchmarks/bench_group_norm.py compares two formulations of one function: they agree, on the CPU, with
and without the time-embedding add, and on a channels_last input whose groups are strided in memory."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_group_norm = pytest.importorskip("bench_group_norm")


@pytest.mark.parametrize("with_time_add", [False, True])
def test_per_channel_sums_equal_group_norm(with_time_add: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (3.0 + torch.randn(4, 64, 8, 8, generator=generator)).bfloat16().to(memory_format=torch.channels_last)
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    temb = torch.randn(4, 64, generator=generator) if with_time_add else None
    reference = bench_group_norm.aten_group_norm_swish(x, weight, bias, temb).float()
    candidate = bench_group_norm.channel_sum_group_norm_swish(x, weight, bias, temb).float()
    # both round a float32 result to bf16: at most one bf16 step apart where a value sits near a rounding boundary
    assert torch.allclose(candidate, reference, rtol=2 ** -7, atol=1e-5)
    assert (candidate == reference).float().mean() > 0.95


def test_kernel_benchmarks_refuse_to_run_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared arguments of the kernel micro-benchmarks: --batch and --out parsed, and a plain exit
    message (not a traceback) on a machine without CUDA."""
    profiling = pytest.importorskip("profiling")
    monkeypatch.setattr(sys, "argv", ["bench_group_norm.py", "--batch", "8", "--out", "x.json"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = profiling.cuda_kernel_args("doc", "bench_group_norm.py", batch=1024)
    assert (args.batch, args.out) == (8, "x.json")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="bench_group_norm.py needs CUDA"):
        profiling.cuda_kernel_args("doc", "bench_group_norm.py", batch=1024)


def test_group_norm_cases_are_the_models() -> None:
    """The cases come from one call of the model: every GroupNorm once, a ResBlock's second one marked as
    following the time-embedding add, keyed by its input's channels and resolution."""
    cases = bench_group_norm.group_norm_cases("fmnist-ddim")
    denoiser = bench_group_norm.load_model("fmnist-ddim")
    norms = [name for name, module in denoiser.net.named_modules() if isinstance(module, torch.nn.GroupNorm)]
    assert sum(cases.values()) == len(norms) == 51
    assert sum(calls for (_, _, after_add), calls in cases.items() if after_add) == sum(
        name.endswith("norm2") for name in norms)
    assert cases[(64, 32, True)] == 5 and cases[(128, 4, False)] == 5
