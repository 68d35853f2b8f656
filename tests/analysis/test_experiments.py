"""Experiment drivers behind the notebooks."""
from __future__ import annotations

import modiff as md
from analysis import experiments


def test_published_audit_measures_both_behaviours(tiny_denoiser: md.Denoiser) -> None:
    """The per-step reset equals weight-only quantization exactly; per-tensor scales couple the batch."""
    audit = experiments.published_audit(tiny_denoiser, 4, range(3), steps=4).set_index("check")["value"]
    assert audit.iloc[0] == 0.0
    assert audit.iloc[1] > 0.0 and audit.iloc[2] > 0.0


def test_bops_memory_table_scales_with_batch(tiny_denoiser: md.Denoiser) -> None:
    table = experiments.bops_memory_table(tiny_denoiser, ["w8a4-modiff"], [1, 4], steps=10)
    assert table.modiff_state_mb.iloc[1] == 4 * table.modiff_state_mb.iloc[0] > 0
