"""How the real GEMM picks its tiling: a measured table per shape and row scale, the heuristic otherwise."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pytest
import torch

from modiff.quant.kernels import real


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a tilings file where the kernels read it; the kept table is dropped before each read and restored after."""
    path = tmp_path / "gemm_tilings.json"
    monkeypatch.setattr(real, "TILINGS_FILE", path)
    monkeypatch.setattr(real, "_TABLE", None)

    def write(tilings: dict) -> None:
        path.write_text(json.dumps({"measured": {"device": "test"}, "tilings": tilings}))
        monkeypatch.setattr(real, "_TABLE", None)

    return write


def test_without_a_table_every_shape_takes_the_heuristic(table) -> None:
    assert real.measured_tilings() == {}
    assert real.gemm_blocks(1 << 20, 128, 128, 9, False) == real.heuristic_blocks(1 << 20, 128, 128)
    assert real.heuristic_blocks(1 << 20, 128, 128) == dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    assert real.heuristic_blocks(100, 32, 16) == dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)


def test_the_key_names_format_taps_channels_and_rows_to_the_power_of_two_below() -> None:
    assert real.tiling_key(False, 9, 64, 128, 512 * 32 * 32) == "int8 taps9 c64 n128 m2^19"
    assert real.tiling_key(True, 1, 256, 256, 512 * 8 * 8 + 100) == "fp8 taps1 c256 n256 m2^15"
    assert real.tiling_key(True, 1, 256, 256, 2**16 - 1) == "fp8 taps1 c256 n256 m2^15"


def test_a_measured_tiling_serves_its_shape_format_and_row_scale_only(table) -> None:
    tiling = real.CANDIDATE_TILINGS[1]
    rows = 512 * 16 * 16  # batch 512, 16x16 maps
    table({real.tiling_key(False, 9, 128, 128, rows): list(tiling)})
    chosen = dict(zip(real.TILING_KEYS, tiling))
    assert real.gemm_blocks(rows, 128, 128, 9, False) == chosen
    assert real.gemm_blocks(2 * rows - 1, 128, 128, 9, False) == chosen
    for m in (rows // 4, 2 * rows):  # 8x8 maps, or batch 1024: another scale, the heuristic
        assert real.gemm_blocks(m, 128, 128, 9, False) == real.heuristic_blocks(m, 128, 128)
    for other in ((128, 128, 9, True), (128, 128, 1, False), (256, 128, 9, False)):  # FP8, 1x1, other channels
        n, c, taps, fp8 = other
        assert real.gemm_blocks(rows, n, c, taps, fp8) == real.heuristic_blocks(rows, n, c)


def test_the_shipped_table_names_only_value_tested_tilings_by_well_formed_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(real, "_TABLE", None)
    shipped = real.measured_tilings()  # raises if the committed file is not a table or names an untested tiling
    assert shipped, "modiff/quant/kernels/gemm_tilings.json is committed with the H200's and the H100's measurements"
    key = re.compile(r"(int8|fp8|w4a8) taps\d+ c\d+ n\d+ m2\^\d+")
    assert all(key.fullmatch(name) and tiling in real.CANDIDATE_TILINGS for name, tiling in shipped.items())
    runs = json.loads(real.TILINGS_FILE.read_text())["measured_layers"]
    assert {name.split()[0] for name in shipped} <= {run["format"] for run in runs}  # each format's run is recorded


def test_a_table_naming_an_untested_tiling_is_refused(table) -> None:
    table({real.tiling_key(True, 9, 64, 64, 1 << 20): [32, 32, 32, 2, 2]})
    with pytest.raises(ValueError, match="outside CANDIDATE_TILINGS"):
        real.gemm_blocks(1 << 20, 64, 64, 9, True)


def test_a_file_that_is_not_a_tilings_table_is_refused_with_what_to_do(table) -> None:
    real.TILINGS_FILE.write_text('{"measured": {}}')
    with pytest.raises(ValueError, match=r"not a tilings table.*--tilings-out`, or delete it"):
        real.measured_tilings()
    real.TILINGS_FILE.write_text("not json")
    with pytest.raises(ValueError, match="not a tilings table"):
        real.measured_tilings()


@torch.library.custom_op("modiff_test::real_modulated_spy", mutates_args=())
def _modulated_spy(x: torch.Tensor, a_hat: torch.Tensor, o_hat: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor, geometry: list[int], out_dtype: torch.dtype,
                   weight_offset: Optional[torch.Tensor], tiling: list[int], source: str) -> torch.Tensor:
    """Stands in for the modulated op where Dynamo traces a call on the CPU (the interpreter needs real data)."""
    return x.new_zeros(geometry[0] * geometry[4] * geometry[5], geometry[6])


@_modulated_spy.register_fake
def _(x, a_hat, o_hat, weight, weight_scale, geometry, out_dtype, weight_offset, tiling, source) -> torch.Tensor:
    return x.new_empty(geometry[0] * geometry[4] * geometry[5], geometry[6])


@torch.library.custom_op("modiff_test::real_direct_spy", mutates_args=())
def _direct_spy(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                geometry: list[int], out_dtype: torch.dtype, weight_offset: Optional[torch.Tensor], tiling: list[int],
                source: str) -> torch.Tensor:
    """Stands in for the direct op, as `_modulated_spy` for the modulated one."""
    return x.new_zeros(geometry[0] * geometry[4] * geometry[5], geometry[6])


@_direct_spy.register_fake
def _(x, weight, weight_scale, bias, geometry, out_dtype, weight_offset, tiling, source) -> torch.Tensor:
    return x.new_empty(geometry[0] * geometry[4] * geometry[5], geometry[6])


GEOMETRY = [2, 8, 8, 16, 8, 8, 32, 3, 3, 1, 1, 1, 1]  # a 3x3 convolution of 16 to 32 channels on 8x8 maps
WEIGHT, SCALE = torch.zeros(32, 144, dtype=torch.int8), torch.ones(32)
CALLS = {  # op name -> (spy, a step calling the public function on x)
    "modulated": (_modulated_spy, lambda x: real.real_modulated(
        x, x.clone(), torch.zeros(2, 32, 8, 8).to(memory_format=torch.channels_last), WEIGHT, SCALE, GEOMETRY,
        torch.bfloat16)),
    "direct": (_direct_spy, lambda x: real.real_direct(x, WEIGHT, SCALE, None, GEOMETRY, torch.bfloat16)),
}


@pytest.mark.parametrize("op", sorted(CALLS))
def test_the_tiling_is_an_argument_of_the_compiled_graph(op: str, table, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile's graphs, and the keys of its caches on disk, see an op's arguments, not what its body reads:
    the tiling is an argument, and a new table compiles again (before, a warm cache replayed the old table's
    tilings). Dynamo traces `real_modulated` and `real_direct` with spy ops in place of the Triton ones; the table
    is read eagerly first, as `register_ops` does."""
    spy, call = CALLS[op]
    monkeypatch.setattr(real, "register_ops", lambda: None)
    monkeypatch.setitem(real._OPS, op, spy)
    monkeypatch.setattr(real, "_SOURCE", "code")  # the digest `register_ops` takes (tested below)
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs) -> object:
        graphs.append([node.args[-2:] for node in gm.graph.nodes if node.target is spy._opoverload])
        return gm.forward

    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    step = torch.compile(call, backend=backend, dynamic=False)
    measured = real.CANDIDATE_TILINGS[1]
    for tilings in ({}, {real.tiling_key(False, 9, 16, 32, 2 * 8 * 8): list(measured)}):
        table(tilings)
        real.measured_tilings()
        step(x)
    torch._dynamo.reset()
    heuristic = [real.heuristic_blocks(2 * 8 * 8, 32, 16)[key] for key in real.TILING_KEYS]
    assert graphs == [[(heuristic, "code")], [(list(measured), "code")]]


def test_the_ops_take_the_digest_of_the_real_backend_and_its_kernels() -> None:
    from modiff.quant.kernels import source_digest

    real.register_ops()
    assert real._SOURCE == source_digest("real", "real_triton") != source_digest("modulate", "modulate_triton")
