"""The fused Triton path against the reference torch path (the `search` count backend) on the same tensors.

Without CUDA the kernels run on CPU tensors in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytest.importorskip("triton")

from modiff.record import ChannelAbsMax, Histogram, Outliers, Quantiles, Stats, default_reducers, record  # noqa: E402
from modiff.record.results import Observation, results_of, update_rows  # noqa: E402
from modiff.record.engines.fused.engine import FusedEngine, use_fused  # noqa: E402

EXACT = {"min", "max", "absmax", "count", "counts", "edges", "underflow", "overflow", "outside"}
# On CUDA every test runs with both count kernels: shared-memory CUDA C (`count_cuda`) and Triton.
COUNT_BACKENDS = ["shared", "triton"] if DEVICE.type == "cuda" else ["triton"]


@pytest.fixture(autouse=True, params=COUNT_BACKENDS)
def count_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from modiff.record.engines.fused import engine as fused
    monkeypatch.setattr(fused, "COUNT_BACKEND", request.param)
    return request.param


def _templates() -> list:
    return [Stats(), ChannelAbsMax(), Histogram(8, range=(-1.0, 1.0)), Histogram(16, per="site", name="site_hist"),
            Quantiles(bins=64), Outliers(ks=(1.0, 2.0), threshold=0.5)]


class _Pair:
    """One site's reducers on both paths, fed like the recorder: buffer rows [a_s, a_s - a_s-1]."""

    def __init__(self, templates: list) -> None:
        self.templates = templates
        self.engine = FusedEngine(templates, DEVICE)
        self.shared: dict[str, dict] = {"ref": {}, "fused": {}}
        self.keys: dict[tuple, dict[str, list]] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    def rows(self, path: str, step: int, call: int, k: int) -> list[list]:
        out = []
        for kind in ("raw", "diff")[:k]:
            key = self.keys.setdefault((kind, step, call), {})
            if path not in key:
                shared = self.shared[path].setdefault(kind, {})
                key[path] = [r.spawn(shared) for r in self.templates]
            out.append(key[path])
        return out

    def observe(self, x: torch.Tensor, step: int, call: int = 0, diff: bool = True) -> None:
        k = 1 + diff
        for path in ("ref", "fused"):
            buffer = self.buffers.setdefault(f"{path}{call}", torch.zeros((2, *x.shape), device=DEVICE))
            rows = self.rows(path, step, call, k)
            if path == "fused":
                self.engine.update(("site", "input"), rows, buffer, x, diff)
                continue
            if diff:
                torch.sub(x, buffer[0], out=buffer[1])
            buffer[0].copy_(x)
            update_rows(rows, Observation(buffer[:k], backend="search"))

    def assert_equal(self) -> None:
        self.engine.flush()
        for key, paths in self.keys.items():
            ref, fused = (results_of(paths[p]) for p in ("ref", "fused"))
            for r, a, b in zip(paths["ref"], ref, fused):
                assert set(a) == set(b), (key, r)
                for name in a:
                    _assert_close(a[name], b[name], exact=name in EXACT or r.name.endswith("hist")
                                  or isinstance(r, (ChannelAbsMax, Outliers, Quantiles)), where=(key, r.name, name))


def _assert_close(a, b, exact: bool, where) -> None:
    if exact:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(where))
    else:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-9, equal_nan=True, err_msg=str(where))


def _edges_and_specials() -> torch.Tensor:
    """(3, 4, 5): values exactly on the fixed range's bin edges (and next to them), +-hi, 0, +-inf and NaN."""
    edges = torch.linspace(-1.0, 1.0, 9)
    up = torch.nextafter(edges, torch.full_like(edges, math.inf))
    down = torch.nextafter(edges, torch.full_like(edges, -math.inf))
    special = torch.tensor([0.0, -0.0, 2.0, -2.0, 1e-30, -1e-30, 0.999999, 3.5, -0.5, 0.5, 0.25, -0.25, 0.0, 1.0, -1.0])
    values = torch.cat([edges, up, down, special, torch.randn(60 - 42, generator=torch.Generator().manual_seed(3))])
    return values[:60].reshape(3, 4, 5)


def test_first_step_without_previous_activation_then_differences() -> None:
    """K = 1 at step 0 (raw only), K = 2 after; values on bin edges."""
    pair = _Pair(_templates())
    x = _edges_and_specials().to(DEVICE)
    pair.observe(x, step=0, diff=False)
    pair.observe(x.flip(0) * 0.5, step=1)
    pair.observe(x.roll(7), step=2)
    pair.assert_equal()


def test_nan_counts_above_every_boundary() -> None:
    """A NaN makes min/max/moments NaN, the automatic ranges NaN (everything overflows), every value an outlier."""
    pair = _Pair(_templates())
    x = _edges_and_specials().to(DEVICE)
    pair.observe(x, step=0, diff=False)
    with_nan = x.clone()
    with_nan[1, 2, 3] = math.nan
    pair.observe(with_nan, step=1)
    pair.observe(x, step=2)
    pair.assert_equal()


def test_several_calls_per_step_and_trajectories_merge() -> None:
    """Two model calls per step (separate keys and buffers) and a second trajectory merged into the keys."""
    g = torch.Generator().manual_seed(0)
    pair = _Pair(default_reducers())
    for trajectory in range(2):
        for step in range(3):
            for call in range(2):
                x = (torch.randn(3, 6, 4, 4, generator=g) * (1 + step) + call).to(DEVICE)
                pair.observe(x, step=step, call=call, diff=step > 0)
    pair.assert_equal()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # x / subnormal bin width in the interpreter
def test_linear_inputs_half_precision_and_all_zero_difference() -> None:
    """(B, F) tensors (one value per channel), float16 inputs, and a difference of zeros (smallest range)."""
    pair = _Pair(_templates())
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    pair.observe(x, step=0, diff=False)
    pair.observe(x, step=1)
    pair.observe(x * 3, step=2)
    pair.assert_equal()


def test_partials_over_many_programs_and_sample_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count partials from several programs summed in several chunks; channel extremes over several
    sample chunks in the summary (20 samples, 16 per chunk at 300 channels)."""
    from modiff.record.engines.fused import engine as fused
    monkeypatch.setattr(fused, "_COUNT_BLOCK", 64)
    monkeypatch.setattr(fused, "_COUNT_BLOCKS_PER_PROGRAM", 1)
    monkeypatch.setattr(fused, "_ADD_TILE", (2, 128))
    pair = _Pair(_templates())
    pair.engine.programs = 5
    x = torch.randn(20, 300, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    pair.observe(x, step=0, diff=False)
    with_nan = x * 2
    with_nan[17, 250] = math.nan
    pair.observe(with_nan, step=1)
    pair.observe(x - 1, step=2)
    pair.assert_equal()


@pytest.mark.parametrize("small_tiles", [False, True])
def test_recorder_fused_engine_equals_reference(small_tiles: bool, count_backend: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder on both engines: the same statistics rows and arrays. The summaries of a model call run
    in one launch; with small scan tiles its sites differ in tiles per sample (1 to 8) and chunks per tile (1 or 2)."""
    from modiff.record.engines.fused import engine as fused
    if small_tiles:
        monkeypatch.setattr(fused, "_TILE", 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(64, 5))
    model = model.to(DEVICE).eval()
    xs = [torch.randn(2, 3, 4, 4, device=DEVICE) * (1 + s) for s in range(3)]
    tables = {}
    for engine in ("reference", "fused"):
        with record(model, engine=engine) as rec, torch.no_grad():
            for trajectory in range(2):
                for s, x in enumerate(xs):
                    model(x + trajectory)
                    rec.on_step(SimpleNamespace(index=s, t=900 - 300 * s))
                rec.next_trajectory()
        tables[engine] = rec._tables()
        assert rec._manifest()["engine"] == engine  # the engine used, and its count kernel
        assert rec._manifest()["count_kernel"] == (None if engine == "reference" else count_backend)
    (ref_stats, ref_arrays), (fused_stats, fused_arrays) = tables["reference"], tables["fused"]
    assert ref_stats.drop(columns="value").equals(fused_stats.drop(columns="value"))
    np.testing.assert_allclose(ref_stats["value"], fused_stats["value"], rtol=2e-6, atol=1e-9)
    assert ref_arrays.keys() == fused_arrays.keys()
    for name, value in ref_arrays.items():
        np.testing.assert_array_equal(value, fused_arrays[name], err_msg=name)


def test_outlier_boundaries_and_grids_beyond_the_shared_kernel_are_counted_by_triton() -> None:
    """Nine outlier boundaries (more than count_cuda.MAX_LIMITS) and a 16,000-bin grid (over 48 KB of shared
    memory): the Triton kernel counts them, with the same results."""
    pair = _Pair([Stats(), Outliers(ks=tuple(0.25 * k for k in range(1, 10))), Quantiles(bins=16000)])
    x = torch.randn(4, 8, 9, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    pair.observe(x, step=0, diff=False)
    pair.observe(x.roll(5) * 1.5, step=1)
    pair.assert_equal()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the CUDA C count kernel needs CUDA")
def test_shared_count_kernel_is_the_one_that_counts(count_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from modiff.record.engines.fused import cuda_count as count_cuda
    assert count_cuda.count_kernel_for(DEVICE) is not None  # NVRTC compiled it: no silent fallback
    launches = []
    launch = count_cuda.launch_count
    monkeypatch.setattr(count_cuda, "launch_count", lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs))
    pair = _Pair(default_reducers())
    x = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE)  # rows of 630 values: unaligned
    pair.observe(x, step=0, diff=False)
    pair.observe(x * 0.5 + 0.1, step=1)
    pair.assert_equal()
    assert len(launches) == (2 if count_backend == "shared" else 0)  # a pair of grids per launch, one flush per step


def test_engine_choice() -> None:
    assert not use_fused("reference", default_reducers())
    assert use_fused("fused", default_reducers())
    assert not use_fused("fused", [])  # nothing to reduce: only the buffer is updated
    assert record(nn.Sequential(nn.Linear(2, 2))).engine == "auto"  # the default
    assert use_fused("auto", default_reducers(), torch.device("cuda"))
    assert not use_fused("auto", default_reducers(), torch.device("cpu"))  # the interpreter only when asked for
    assert not use_fused("auto", [Stats(), ChannelAbsMax(dim=2)], torch.device("cuda"))  # unsupported: reference
    with pytest.raises(ValueError, match="engine='fused' supports only"):
        use_fused("fused", [ChannelAbsMax(dim=2)])
    with pytest.raises(ValueError, match="engine='fused' supports only"):
        record(nn.Sequential(nn.Linear(2, 2)), reducers=[Stats(), ChannelAbsMax(dim=2)], engine="fused")
    with pytest.raises(ValueError, match="engine must be one of"):
        record(nn.Linear(2, 2), engine="triton")


def test_fused_on_a_cpu_without_the_interpreter_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 .*engine='reference'"):
        with record(nn.Sequential(nn.Linear(3, 2)), reducers=[Stats()], engine="fused") as rec:
            rec.model(torch.randn(4, 3))


def test_pending_work_is_dropped_when_the_recording_fails() -> None:
    """An error inside the block: hooks removed, the pending summaries dropped, the engine left empty."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)).to(DEVICE)
    with pytest.raises(RuntimeError, match="boom"):
        with record(model, reducers=[Stats()], engine="fused") as rec, torch.no_grad():
            model(torch.randn(2, 3, 4, 4, device=DEVICE))
            assert len(rec._engine.pending) == 2  # one descriptor per site call, summarised at the next model call
            raise RuntimeError("boom")
    assert not rec._engine.pending and rec._hooks is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_recording_on_a_second_gpu_while_the_first_is_current() -> None:
    """Kernels compiled and launched for the tensors' device, not the current one."""
    device = torch.device("cuda", 1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)).to(device).eval()
    xs = [torch.randn(2, 3, 6, 6, device=device) * (1 + s) for s in range(3)]
    frames = {}
    for engine in ("reference", "fused"):
        with record(model, engine=engine) as rec, torch.no_grad():
            for s, x in enumerate(xs):
                model(x)
                rec.on_step(SimpleNamespace(index=s, t=900 - 300 * s))
        frames[engine] = rec.stats_frame()
    assert torch.cuda.current_device() == 0
    ref, fused = frames["reference"], frames["fused"]
    assert ref.drop(columns="value").equals(fused.drop(columns="value"))
    np.testing.assert_allclose(ref["value"], fused["value"], rtol=1e-5, atol=1e-6)  # moments: float32 rounding
