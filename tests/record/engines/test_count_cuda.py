"""The CUDA C count kernel's host side: its shared-memory budget, its descriptor fields, and that NVRTC
compiles it (its counts are compared with the reference in tests/record/test_fused.py, on CUDA)."""
from __future__ import annotations

import re

import pytest
import torch

from modiff.record.engines.fused import cuda_count as count_cuda
from modiff.record.engines.fused.layout import DESCRIPTOR


def test_shared_memory_per_block_by_hand() -> None:
    # edges (bins + 1) and positions (bins + 2) per grid, one slot per outlier boundary, 4 bytes each
    assert count_cuda.shared_bytes(1024, 256, 2) == 4 * ((1025 + 257) + (1026 + 258) + 2)
    assert count_cuda.shared_bytes(0, 0, 3) == 12  # outliers only
    assert count_cuda.shared_bytes(8, 0, 0) == 4 * (9 + 10)
    assert count_cuda.fits((1024, 256), 2)
    assert not count_cuda.fits((4096, 4096), 0)  # 64 KB: over the 48 KB a block gets without opting in
    assert not count_cuda.fits((8, 8), count_cuda.MAX_LIMITS + 1)


def test_source_reads_the_descriptor_fields_where_the_engine_writes_them() -> None:
    defines = dict(re.findall(r"#define (\w+) (\d+)", count_cuda.source()))
    assert int(defines["NF"]) == len(DESCRIPTOR)
    for name in ("programs", "data", "n_new", "edges", "approx", "bounds", "partial_at"):
        assert int(defines[f"D_{name.upper()}"]) == DESCRIPTOR.index(name)


def test_no_kernel_off_cuda() -> None:
    assert count_cuda.count_kernel_for(torch.device("cpu")) is None


def test_nvrtc_compiles_the_source_for_hopper() -> None:
    """Without a GPU: the source is valid CUDA C for sm_90 (NVRTC from torch's CUDA libraries)."""
    utils = pytest.importorskip("torch.cuda._utils")
    try:
        utils._get_gpu_rtc_library()
    except Exception as error:  # no NVRTC on this machine
        pytest.skip(f"NVRTC not available: {error}")
    binary, name = utils._nvrtc_compile(count_cuda.source(), "count_shared", "90")
    assert name == "count_shared" and len(binary) > 1000
