"""How the real GEMM picks its tiling: a measured table per shape and row scale, the heuristic otherwise."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from modiff.quant.kernels import real


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a tilings file where the kernels read it; the cached table is dropped before and after."""
    path = tmp_path / "gemm_tilings.json"
    monkeypatch.setattr(real, "TILINGS_FILE", path)
    real.measured_tilings.cache_clear()

    def write(tilings: dict) -> None:
        path.write_text(json.dumps({"measured": {"device": "test"}, "tilings": tilings}))
        real.measured_tilings.cache_clear()

    yield write
    real.measured_tilings.cache_clear()


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


def test_the_shipped_table_names_only_value_tested_tilings_by_well_formed_keys() -> None:
    real.measured_tilings.cache_clear()
    shipped = real.measured_tilings()  # raises if the committed file is not a table or names an untested tiling
    assert shipped, "modiff/quant/kernels/gemm_tilings.json is committed with the H200 measurement"
    key = re.compile(r"(int8|fp8) taps\d+ c\d+ n\d+ m2\^\d+")
    assert all(key.fullmatch(name) and tiling in real.CANDIDATE_TILINGS for name, tiling in shipped.items())
    real.measured_tilings.cache_clear()


def test_a_table_naming_an_untested_tiling_is_refused(table) -> None:
    table({real.tiling_key(True, 9, 64, 64, 1 << 20): [32, 32, 32, 2, 2]})
    with pytest.raises(ValueError, match="outside CANDIDATE_TILINGS"):
        real.gemm_blocks(1 << 20, 64, 64, 9, True)


def test_a_file_that_is_not_a_tilings_table_is_refused_with_what_to_do(table) -> None:
    real.TILINGS_FILE.write_text('{"measured": {}}')
    with pytest.raises(ValueError, match=r"not a tilings table.*--tilings-out`, or delete it"):
        real.measured_tilings()
    real.TILINGS_FILE.write_text("not json")
    real.measured_tilings.cache_clear()
    with pytest.raises(ValueError, match="not a tilings table"):
        real.measured_tilings()
