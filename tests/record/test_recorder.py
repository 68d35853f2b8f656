"""The recorder: statistics against direct computation, keys, hooks, and modiff's own models."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import modiff as md
from modiff.quant import presets, quantize, trajectory
from modiff.quant.layers.direct import QuantLayer
from modiff.record import (ChannelAbsMax, Histogram, Outliers, Quantiles, Stats, TensorSpec, load_recording, record,
                           select_sites)

TS = (900, 600, 300)


def _mlp(width_in: int = 6, hidden: int = 16, width_out: int = 4) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, width_out)).eval()


def _inputs(n: int = 5, steps: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 6, generator=g) * (1 + s) + s for s in range(steps)]


@torch.no_grad()
def _run(model: nn.Module, rec, inputs: list[torch.Tensor]) -> None:
    for s, x in enumerate(inputs):
        model(x)
        rec.on_step(SimpleNamespace(index=s, t=TS[s]))


def _values(stats: pd.DataFrame, site: str, step: int, kind: str, call: int = 0, capture: str = "input") -> dict[str, float]:
    rows = stats[(stats.site == site) & (stats.step == step) & (stats.kind == kind) & (stats.call == call)
                 & (stats.capture == capture)]
    return dict(zip(rows.reducer + "." + rows.statistic, rows.value))


def _check_against(recording, site: str, step: int, kind: str, a: torch.Tensor) -> None:
    """Every statistic of (site, step, kind) equals a direct computation on the tensor `a`."""
    got, a64 = _values(recording.stats, site, step, kind), a.double()
    direct = {"min": a64.min(), "max": a64.max(), "absmax": a64.abs().max(), "mean": a64.mean(),
              "std": a64.std(correction=0), "l2": a64.norm(), "l2_per_sample": a64.norm(dim=1).mean()}
    for name, value in direct.items():
        assert got[f"stats.{name}"] == pytest.approx(float(value), rel=1e-5, abs=1e-7), (site, step, kind, name)
    arrays = recording.arrays(site, step, kind)
    np.testing.assert_allclose(arrays["channel_absmax.absmax"], a.abs().amax(dim=0).double().numpy(), rtol=1e-6)
    hist = recording.histogram(site, step, kind)
    lo, hi = float(hist["edges"][0]), float(hist["edges"][-1])
    np.testing.assert_array_equal(hist["counts"], torch.histc(a, len(hist["counts"]), lo, hi).long().numpy())
    assert (hist["underflow"], hist["overflow"]) == (float((a < lo).sum()), float((a > hi).sum()))
    width = 2 * 1.5 * float(a.abs().max()) / 256
    for q in (0.01, 0.5, 0.99):  # the histogram estimates the inverse empirical CDF
        exact = np.quantile(a64.numpy(), q, method="inverted_cdf")
        assert abs(got[f"quantiles.q{q:g}"] - exact) <= width + 1e-9, (site, step, q)
    sigma = a64.std(correction=0)
    for k in (3, 6):
        assert got[f"outliers.outliers_{k}std"] == pytest.approx(float((a64.abs() > k * sigma).double().mean()))
    assert got["outliers.outliers_gt_1"] == pytest.approx(float((a.abs() > 1.0).double().mean()))


def test_statistics_equal_direct_computation(tmp_path: Path) -> None:
    """Raw and difference statistics of both Linear inputs over 3 steps equal direct computations."""
    model, inputs = _mlp(), _inputs()
    reducers = [Stats(), ChannelAbsMax(), Histogram(32), Quantiles(bins=256), Outliers(threshold=1.0)]
    with record(model, "linear", reducers, tensors=TensorSpec("linear"), out_dir=tmp_path / "rec") as rec:
        _run(model, rec, inputs)
    recording = load_recording(tmp_path / "rec")
    assert all(torch.equal(recording.tensor("0", s), inputs[s]) for s in range(3))
    hidden = [torch.relu(model[0](x)).detach() for x in inputs]
    assert all(torch.allclose(recording.tensor("2", s), hidden[s]) for s in range(3))
    for site in ("0", "2"):
        acts = [recording.tensor(site, s) for s in range(3)]
        for s in range(3):
            _check_against(recording, site, s, "raw", acts[s])
            if s:
                _check_against(recording, site, s, "diff", acts[s] - acts[s - 1])
        edges = [recording.histogram(site, s, "raw")["edges"] for s in range(3)]
        assert all(np.array_equal(edges[0], e) for e in edges)  # range fixed per site at the first step
    assert recording.histogram("0", 2, "raw")["overflow"] > 0  # the inputs outgrow the first step's range
    assert not _values(recording.stats, "0", 0, "diff")  # no difference at the first step
    assert recording.stats.groupby("step").t.first().tolist() == list(TS)


def _two_call_sampler(model: nn.Module, x: torch.Tensor, ts: tuple[int, ...], callback: Callable) -> torch.Tensor:
    """Two model calls per step (like classifier-free guidance): on x and on 2x."""
    for i, t in enumerate(ts):
        e0, e1 = model(x), model(2 * x)
        x = x + 0.1 * (e0 + e1)
        callback(SimpleNamespace(index=i, t=t))
    return x


@torch.no_grad()
def test_two_model_calls_per_step_get_call_indices_0_and_1(tmp_path: Path) -> None:
    model = _mlp(6, 8, 6)
    with record(model, "linear", [Stats()], tensors=TensorSpec("0"), out_dir=tmp_path / "rec") as rec:
        _two_call_sampler(model, _inputs(4, 1)[0], TS, rec.on_step)
    recording = load_recording(tmp_path / "rec")
    stats = recording.stats
    raw = stats[(stats.site == "0") & (stats.kind == "raw")]
    assert sorted(set(zip(raw.step, raw.call))) == [(s, c) for s in range(3) for c in (0, 1)]
    assert sorted(set(zip(raw.step, raw.t))) == [(0, 900), (1, 600), (2, 300)]
    for s in range(3):
        a0, a1 = recording.tensor("0", s, call=0), recording.tensor("0", s, call=1)
        assert torch.equal(a1, 2 * a0)
        assert _values(stats, "0", s, "raw", call=1)["stats.mean"] == pytest.approx(float(a1.double().mean()))
        if s:
            diff = a1 - recording.tensor("0", s - 1, call=1)  # call 1 is compared with call 1 of the step before
            assert _values(stats, "0", s, "diff", call=1)["stats.l2"] == pytest.approx(float(diff.double().norm()))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_an_exception(tmp_path: Path, tiny_denoiser: md.Denoiser) -> None:
    x_T = md.noise(range(1), tiny_denoiser.sample_shape)
    with pytest.raises(RuntimeError, match="boom"):
        with record(tiny_denoiser, capture="both", out_dir=tmp_path / "rec") as rec:
            assert _hooks(tiny_denoiser) > 2 * len(rec.sites)
            tiny_denoiser(x_T, torch.tensor([10]))
            raise RuntimeError("boom")
    assert _hooks(tiny_denoiser) == 0
    assert not (tmp_path / "rec" / "manifest.json").exists()  # nothing saved from an interrupted run


@torch.no_grad()
def test_tiny_denoiser_through_sample_ddim(tiny_denoiser: md.Denoiser) -> None:
    """Every Conv/Linear recorded at every step with its t; recording leaves the samples unchanged."""
    ts = md.timesteps(3)
    x_T = md.noise(range(2), tiny_denoiser.sample_shape)
    plain = md.sample_ddim(tiny_denoiser, x_T, ts)
    with record(tiny_denoiser, reducers=[Stats(), Quantiles(bins=64)], capture="both") as rec:
        recorded = md.sample_ddim(tiny_denoiser, x_T, ts, callback=rec.on_step)
    assert torch.equal(plain, recorded) and _hooks(tiny_denoiser) == 0
    stats = rec.stats_frame()
    sites = select_sites(tiny_denoiser, "conv,linear")
    assert set(stats.site) == set(sites) and any(s.endswith("nin_shortcut") for s in sites)
    assert set(stats.capture) == {"input", "output"}
    assert sorted(set(zip(stats.step, stats.t))) == list(enumerate(ts))
    assert set(stats[stats.kind == "diff"].step) == set(range(1, len(ts)))  # timesteps(3) has 4 entries, as in DDIM
    assert _values(stats, "net.conv_in", 0, "raw")["stats.mean"] == pytest.approx(float(x_T.double().mean()))


@torch.no_grad()
def test_quantized_models_sites_found_by_kind(tiny_denoiser: md.Denoiser) -> None:
    qmodel = quantize(tiny_denoiser, presets["w8a8"])
    sites = select_sites(qmodel, "conv,linear")
    assert sites == [n for n, m in qmodel.named_modules() if isinstance(m, QuantLayer)]
    assert sites == select_sites(tiny_denoiser, "conv,linear")
    with record(qmodel, reducers=[Stats()]) as rec:
        md.sample_ddim(qmodel, md.noise(range(1), qmodel.sample_shape), md.timesteps(2), callback=rec.on_step)
    assert set(rec.stats_frame().site) == set(sites)
    modulated = quantize(tiny_denoiser, presets["w8a8-modiff"])
    with trajectory(modulated), record(modulated, "net.mid.*", [Stats()]) as rec:
        md.sample_ddim(modulated, md.noise(range(1), modulated.sample_shape), md.timesteps(2), callback=rec.on_step)
    assert set(rec.stats_frame().site) == {"net.mid.block_1.conv1", "net.mid.block_1.conv2", "net.mid.block_1.temb_proj",
                                           "net.mid.block_2.conv1", "net.mid.block_2.conv2", "net.mid.block_2.temb_proj",
                                           "net.mid.attn_1.q", "net.mid.attn_1.k", "net.mid.attn_1.v",
                                           "net.mid.attn_1.proj_out"}


def test_site_grammar(tiny_denoiser: md.Denoiser) -> None:
    every = select_sites(tiny_denoiser)
    assert select_sites(tiny_denoiser, "linear,net.temb.*") == ["net.temb.dense.0", "net.temb.dense.1"]
    assert all(n.startswith("net.temb.") or n.endswith("temb_proj") for n in select_sites(tiny_denoiser, "linear"))
    assert select_sites(tiny_denoiser, ["conv", "!net.up.*", "!net.down.*"]) == [
        n for n in every if n.startswith(("net.conv_in", "net.mid", "net.conv_out")) and "temb" not in n]
    assert select_sites(tiny_denoiser, "all,net.mid") == ["net.mid"]
    assert select_sites(tiny_denoiser, "type:GroupNorm,net.mid.block_1.*") == ["net.mid.block_1.norm1",
                                                                              "net.mid.block_1.norm2"]
    with pytest.raises(ValueError, match=r"net\.mdi\.\*.*matched no module"):
        select_sites(tiny_denoiser, "net.mid.*,net.mdi.*")
    with pytest.raises(ValueError, match="'all'"):
        select_sites(tiny_denoiser, "net.mid")  # a container is not a Conv/Linear


@torch.no_grad()
def test_a_second_run_needs_next_trajectory() -> None:
    model = _mlp()
    with record(model, reducers=[Stats()]) as rec:
        _run(model, rec, _inputs())
        with pytest.raises(ValueError, match="next_trajectory"):
            _run(model, rec, _inputs())
        rec.next_trajectory()
        _run(model, rec, _inputs(seed=1))
    assert rec.trajectory == 1


def test_user_mistakes_are_refused(tmp_path: Path) -> None:
    model = _mlp()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        record(model, out_dir=tmp_path / "full")
    with pytest.raises(ValueError, match="out_dir"):
        record(model, tensors=TensorSpec("linear"))
    with pytest.raises(ValueError, match="capture must be one of input, output, both"):
        record(model, capture="inputs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        record(model, reducers=[Stats(), Stats()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["reference", "fused"])
@torch.no_grad()
def test_cuda_recording_makes_no_host_sync_and_matches_cpu(tmp_path: Path, tiny_denoiser: md.Denoiser,
                                                           engine: str) -> None:
    """With torch.cuda.set_sync_debug_mode('error'), recording statistics and tensors never syncs."""
    ts, x_T = md.timesteps(3), md.noise(range(2), tiny_denoiser.sample_shape)
    with record(tiny_denoiser, reducers=[Stats(), Quantiles(bins=64)]) as cpu_rec:
        md.sample_ddim(tiny_denoiser, x_T, ts, callback=cpu_rec.on_step)
    model = tiny_denoiser.cuda()
    x_cuda = x_T.cuda()
    md.sample_ddim(model, x_cuda, ts)  # warm-up: kernels loaded, allocator primed
    torch.cuda.synchronize()
    spec = TensorSpec("net.mid.*", samples=[1])
    with record(model, reducers=[Stats(), ChannelAbsMax(), Histogram(), Quantiles(bins=64), Outliers(threshold=1.0)],
                tensors=spec, out_dir=tmp_path / "rec", engine=engine) as rec:
        torch.cuda.set_sync_debug_mode("error")
        try:
            md.sample_ddim(model, x_cuda, ts, callback=rec.on_step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    cpu, gpu = cpu_rec.stats_frame(), load_recording(tmp_path / "rec").stats
    merged = cpu.merge(gpu, on=["site", "capture", "kind", "step", "call", "reducer", "statistic"], suffixes=("_cpu", "_gpu"))
    assert len(merged) == len(cpu)
    means = merged[merged.statistic == "mean"]
    scale = merged[merged.statistic == "absmax"].value_cpu.max()
    assert ((means.value_cpu - means.value_gpu).abs() <= 1e-3 * scale).all()
    assert load_recording(tmp_path / "rec").tensor("net.mid.block_1.conv1", 1).shape[0] == 1
