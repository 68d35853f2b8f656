"""Per-seed random streams and the seed-spec parser."""
from __future__ import annotations

import threading

import pytest
import torch

import modiff
import modiff.utils.rng as rng_module
from modiff.pipelines.generate import SampleConfig, sample
from modiff.utils.rng import FirstDraw, SeedStreams, first_draws_ahead, noise, parse_seeds

SHAPE = (1, 16, 16)


@pytest.mark.parametrize("shape", [SHAPE, (3,), (2, 3, 5), (4, 64, 64)])
def test_noise_is_the_seeds_own_generator(shape: tuple[int, ...]) -> None:
    """noise([7, 2], shape)[i] is torch.randn(shape) from a CPU generator seeded with the seed, for sizes
    below and above the 16 values from which torch's CPU normal sampler changes its method."""
    got = modiff.noise([7, 2], shape)
    assert got.shape == (2, *shape) and got.dtype == torch.float32
    for row, seed in enumerate([7, 2]):
        assert torch.equal(got[row], torch.randn(shape, generator=torch.Generator().manual_seed(seed)))


def test_streams_do_not_depend_on_batch() -> None:
    """Every draw of a seed's stream is the same whatever the batch and position it is drawn in."""
    together = SeedStreams(range(6))
    first, second = together.randn(SHAPE), together.randn((3,))
    for order in ([5, 0, 3], [1], [4, 2]):
        part = SeedStreams(order)
        assert torch.equal(part.randn(SHAPE), first[order])
        assert torch.equal(part.randn((3,)), second[order])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0, 0, 0, :3], second[0])


def test_seed_streams_validation() -> None:
    """Empty and negative seed lists and fewer than one thread are refused."""
    with pytest.raises(ValueError, match="at least one"):
        SeedStreams([])
    with pytest.raises(ValueError, match="non-negative"):
        noise([-1], SHAPE)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        SeedStreams([1], threads=0)


def test_a_large_batch_is_drawn_in_contiguous_parts_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 seeds on 3 threads: three parts of 333-334 rows, one on the caller's thread; every draw (the first and
    the next) equals one thread's, which is each seed's own torch.randn; 511 seeds stay on one thread."""
    parts: list[tuple[str, int]] = []
    draw_rows = rng_module._draw_rows

    def recording(out, generators):
        parts.append((threading.current_thread().name, len(generators)))
        draw_rows(out, generators)

    monkeypatch.setattr(rng_module, "_draw_rows", recording)
    threaded, single = SeedStreams(range(1000), threads=3), SeedStreams(range(1000), threads=1)
    first = threaded.randn(SHAPE)
    assert sorted(n for _, n in parts) == [333, 333, 334]
    names = sorted(name for name, _ in parts)
    assert names.count(threading.current_thread().name) == 1 and sum(n.startswith("modiff-draws") for n in names) == 2
    assert torch.equal(first, single.randn(SHAPE)) and torch.equal(threaded.randn((3,)), single.randn((3,)))
    for seed in (0, 333, 999):
        assert torch.equal(first[seed], torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)))
    parts.clear()
    SeedStreams(range(511), threads=3).randn((3,))
    assert parts == [(threading.current_thread().name, 511)]


def test_default_threads_are_the_host_threads_but_at_most_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads drew twice as slowly as one on a 16-CPU host, two were the best there and on 2 cores."""
    for usable, expected in ((1, 1), (2, 2), (16, 2)):
        monkeypatch.setattr(rng_module, "host_threads", lambda: min(4, usable))
        assert SeedStreams([0]).threads == expected
    assert SeedStreams([0], threads=4).threads == 4


def test_draws_ahead_equal_successive_draws_and_are_made_on_a_background_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ahead(shape, 3)` gives the stream's next three `randn(shape)` values in order, each drawn on the
    draws-ahead thread, not the caller's; it stops after three and leaves the streams exactly three draws on."""
    threads: list[str] = []
    draw_into = SeedStreams.draw_into
    monkeypatch.setattr(SeedStreams, "draw_into", lambda self, out: (threads.append(threading.current_thread().name),
                                                                       draw_into(self, out))[1])
    reference, streams = SeedStreams([3, 8]), SeedStreams([3, 8])
    expected = [reference.randn(SHAPE) for _ in range(4)]
    threads.clear()
    with streams.ahead(SHAPE, 3) as draws:
        got = list(draws)
    assert len(got) == 3 and all(torch.equal(g, e) for g, e in zip(got, expected))
    assert len(threads) == 3 and all(name.startswith("modiff-draws-ahead") for name in threads)
    assert torch.equal(streams.randn(SHAPE), expected[3])
    with SeedStreams([3]).ahead(SHAPE, 0) as none:
        assert list(none) == []


def test_draws_ahead_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A negative count is refused, a failing draw raises in the caller's `next`, and leaving the block waits for
    a draw still running; `draw_into` refuses a buffer of the wrong rows, dtype or device."""
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        SeedStreams([1]).ahead(SHAPE, -1)
    finished = threading.Event()

    def slow_then_fail(self, out):
        finished.wait(0.2)
        finished.set()
        raise RuntimeError("draw failed")

    monkeypatch.setattr(SeedStreams, "draw_into", slow_then_fail)
    with SeedStreams([1]).ahead(SHAPE, 2) as draws:
        pass
    assert finished.is_set()
    with pytest.raises(RuntimeError, match="draw failed"), SeedStreams([1]).ahead(SHAPE, 2) as draws:
        next(draws)
    monkeypatch.undo()
    streams = SeedStreams([1, 2])
    for bad in (torch.empty(3, *SHAPE), torch.empty(2, *SHAPE, dtype=torch.float64)):
        with pytest.raises(ValueError, match="float32 CPU tensor of 2 rows"):
            streams.draw_into(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_draws_for_a_gpu_are_made_in_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    pinned: list[bool] = []
    draw_rows = rng_module._draw_rows
    monkeypatch.setattr(rng_module, "_draw_rows", lambda out, gens: (pinned.append(out.is_pinned()), draw_rows(out, gens)))
    got = SeedStreams([4, 5]).randn(SHAPE, device="cuda")
    assert pinned == [True] and torch.equal(got.cpu(), noise([4, 5], SHAPE))


CONFIGS = [SampleConfig(steps=3), SampleConfig(steps=3, eta=0.5), SampleConfig(sampler="ddpm", steps=3), SampleConfig(sampler="dpm-solver", steps=3)]


@pytest.mark.parametrize("config", CONFIGS, ids=["ddim", "ddim-eta0.5", "ddpm", "dpm-solver"])
def test_samples_depend_only_on_their_seed(tiny_denoiser, config: SampleConfig) -> None:
    """Seeds 0..5 in one batch equal the same seeds in batches of 1, 2, 3 and other orders.

    Equal up to float32 rounding: CPU conv/linear kernels differ at the last bit between batch sizes
    (measured: up to 1e-5 after a few steps), so bitwise equality is not promised across batch compositions.
    """
    dev = torch.device("cpu")
    full = sample(tiny_denoiser, list(range(6)), config, dev)
    batches = [[3], [5, 0], [4, 1, 2]]
    parts = {s: x for batch in batches for s, x in zip(batch, sample(tiny_denoiser, batch, config, dev))}
    scale = full.abs().max().item()
    for seed in range(6):
        torch.testing.assert_close(parts[seed], full[seed], rtol=1e-4, atol=1e-4 * max(1.0, scale))
    assert not torch.allclose(full[0], full[1], rtol=1e-3, atol=1e-3 * max(1.0, scale))
    again = sample(tiny_denoiser, list(range(6)), config, dev)
    assert torch.equal(full, again), "same batch, same seeds must be bitwise reproducible"


def test_stochastic_samplers_use_the_noise() -> None:
    """eta > 0 and DDPM draw later noise: with a zero eps model they differ from deterministic DDIM."""
    from modiff.diffusion.schedules import linear_schedule
    from modiff.models.registry import Denoiser

    class Zero(torch.nn.Module):
        sample_shape = SHAPE

        def forward(self, x, t):
            return torch.zeros_like(x)

    model = Denoiser(Zero(), linear_schedule(), "zero", {})
    outs = {c.sampler + str(c.eta): sample(model, [0, 1], c, torch.device("cpu")) for c in CONFIGS}
    assert not torch.allclose(outs["ddim0.0"], outs["ddim0.5"])
    assert not torch.allclose(outs["ddim0.0"], outs["ddpm0.0"])


@pytest.mark.parametrize(
    "spec, seeds",
    [("0-3", [0, 1, 2, 3]), ("0-2,10", [0, 1, 2, 10]), ("7", [7]), (" 1 , 3-4 ", [1, 3, 4]), ("5-5", [5])],
)
def test_parse_seeds(spec: str, seeds: list[int]) -> None:
    """Comma-separated integers and inclusive ranges."""
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize(
    "spec, match",
    [
        ("a", "malformed seed spec 'a'"),
        ("3-1", "end 1 is before the start 3"),
        ("1,,2", "malformed seed spec '1,,2' at ''"),
        ("-1", "malformed"),
        ("1-2-3", "malformed"),
        ("", "malformed"),
        ("1,1", "more than once"),
        ("0-3,2", "more than once"),
    ],
)
def test_parse_seeds_errors(spec: str, match: str) -> None:
    """Malformed specs raise ValueError quoting the bad part and showing valid examples."""
    with pytest.raises(ValueError, match=match) as err:
        parse_seeds(spec)
    if "malformed seed spec" in str(err.value):
        assert "'0-63'" in str(err.value)


def test_later_noise_continues_each_seeds_stream() -> None:
    """x_T is a seed's first draw and the step noise its next draws (not a fresh, correlated stream)."""
    import math

    from modiff.diffusion.schedules import linear_schedule
    from modiff.models.registry import Denoiser

    class Zero(torch.nn.Module):
        sample_shape = SHAPE

        def forward(self, x, t):
            return torch.zeros_like(x)

    schedule = linear_schedule()
    infos = []
    sample(Denoiser(Zero(), schedule, "zero", {}), [3, 8], SampleConfig(steps=3, eta=1.0), torch.device("cpu"), callback=infos.append)
    for row, seed in enumerate([3, 8]):
        g = torch.Generator().manual_seed(seed)
        first, second = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        assert torch.equal(infos[0].x_t[row], first)
        step = infos[0]
        a, a_prev = schedule.alpha_bar_at(step.t), schedule.alpha_bar_at(step.t_prev)
        c1 = math.sqrt((1 - a / a_prev) * (1 - a_prev) / (1 - a))  # eta = 1, eps = 0
        z = (step.x_prev[row] - math.sqrt(a_prev / a) * step.x_t[row]) / c1
        torch.testing.assert_close(z, second, atol=1e-4, rtol=1e-4)


def test_first_draws_ahead_are_each_batchs_first_draw_drawn_on_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch k's x_T and streams, in order, equal to drawing them in place; the draws run on the noise thread."""
    threads: list[str] = []
    real_of = FirstDraw.of.__func__

    def recording_of(cls, seeds, shape):
        threads.append(threading.current_thread().name)
        return real_of(cls, seeds, shape)

    monkeypatch.setattr(FirstDraw, "of", classmethod(recording_of))
    batches = [[4, 1], [0], [7, 2, 9]]
    with first_draws_ahead(batches, SHAPE) as draws:
        got = list(draws)
    assert len(threads) == 3 and all(name.startswith("modiff-noise") for name in threads)
    for batch, draw in zip(batches, got):
        assert draw.streams.seeds == batch and torch.equal(draw.x_T, noise(batch, SHAPE))
        fresh = SeedStreams(batch)
        fresh.randn(SHAPE)
        assert torch.equal(draw.streams.randn((3,)), fresh.randn((3,)))  # the streams go on after x_T
    with first_draws_ahead([], SHAPE) as draws:
        assert list(draws) == []


def test_sample_takes_a_first_draw_of_its_own_seeds(tiny_denoiser) -> None:
    config, dev = SampleConfig(steps=2, eta=0.5), torch.device("cpu")
    drawn = sample(tiny_denoiser, [3, 5], config, dev, first_draw=FirstDraw.of([3, 5], tiny_denoiser.sample_shape))
    assert torch.equal(drawn, sample(tiny_denoiser, [3, 5], config, dev))
    with pytest.raises(ValueError, match="first_draw holds seeds 3,5, not 3-4"):
        sample(tiny_denoiser, [3, 4], config, dev, first_draw=FirstDraw.of([3, 5], tiny_denoiser.sample_shape))
