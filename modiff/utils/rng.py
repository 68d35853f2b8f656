"""Per-seed random streams: the noise of sample `seed` depends only on `seed`.

Every sample owns a CPU `torch.Generator` seeded with its seed. The initial noise x_T and every later
draw (DDIM with eta > 0, DDPM) come from that stream, on the CPU, so an image does not depend on the batch
size, its position in the batch, the number of devices or the device type.
"""
from __future__ import annotations

import contextlib
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from modiff.utils.device import host_threads

__all__ = ["SeedStreams", "DrawsAhead", "FirstDraw", "first_draws_ahead", "to_device", "noise", "parse_seeds", "format_seeds"]


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, without waiting for the copy."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


class SeedStreams:
    """One generator per sample; `randn(shape)` returns a (B, *shape) tensor drawn per sample.

    A batch of at least ``2 * MIN_ROWS_PER_THREAD`` seeds is drawn in contiguous parts by up to ``threads``
    threads at once (default `host_threads`, at most ``MAX_DEFAULT_THREADS``): a seed's draw is one `normal_`
    call, which releases the GIL, and every generator is drawn by one thread, so the values do not depend on
    the thread count. DDPM and DDIM with eta > 0 draw at every step, a step ahead on a thread of their own
    (`ahead`), while the caller's thread queues the device's step.
    """

    MIN_ROWS_PER_THREAD = 256
    # Two threads drew 4,096 seeds 1.31x faster than one on the H200 host (16 CPUs) and 1.64-1.69x on a 2-core VM;
    # four were 2x slower there, probably as each call is too short for the GIL's hand-offs among more threads
    # (benchmarks/README.md, sitting 35).
    MAX_DEFAULT_THREADS = 2

    def __init__(self, seeds: Iterable[int], threads: Optional[int] = None):
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-negative, got {min(self.seeds)}")
        self.threads = min(self.MAX_DEFAULT_THREADS, host_threads()) if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self._generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self._host_buffer(shape, device)
        self.draw_into(out)
        return to_device(out, device).to(dtype=dtype)

    def ahead(self, shape: Sequence[int], count: int, device: torch.device | str = "cpu") -> "DrawsAhead":
        """The next ``count`` draws of ``randn(shape, device)``, the same values in the same order, each drawn
        on a background thread while the caller uses the one before (see `DrawsAhead`)."""
        return DrawsAhead(self, shape, count, device)

    def _host_buffer(self, shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
        # Pinned for a GPU, so that `to_device` copies it without another host copy.
        return torch.empty((len(self), *shape), dtype=torch.float32, pin_memory=torch.device(device).type == "cuda")

    def draw_into(self, out: torch.Tensor) -> None:
        """Fill ``out`` (B, ...), float32 on the CPU, with each seed's next draw; the host only, no CUDA call."""
        if out.shape[0] != len(self) or out.dtype != torch.float32 or out.device.type != "cpu":
            raise ValueError(f"draw_into needs a float32 CPU tensor of {len(self)} rows, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        parts = min(self.threads, len(self) // self.MIN_ROWS_PER_THREAD) or 1
        bounds = [len(self) * i // parts for i in range(parts + 1)]
        if parts == 1:
            _draw_rows(out, self._generators)
        else:
            with ThreadPoolExecutor(parts - 1, thread_name_prefix="modiff-draws") as pool:
                others = [pool.submit(_draw_rows, out[a:b], self._generators[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
                _draw_rows(out[: bounds[1]], self._generators[: bounds[1]])
                for other in others:
                    other.result()


class DrawsAhead:
    """An iterator over a stream's next ``count`` draws on ``device``, each drawn while the caller uses the one
    before: `next` waits for draw k (on the host), queues its copy to the device and starts draw k + 1 on a
    background thread. Use it as a context manager, which waits for a draw still running when the block ends.

    Why: a DDPM step's 4,096 per-seed draws take most of the device's step on the host, and drawn on the caller's
    thread they hold back the launches of the step after (benchmarks/README.md has the measured effect). The
    background thread only fills host memory that the caller's thread allocated (pinned for a GPU), so every CUDA
    call stays on the caller's thread, which may be capturing a CUDA graph; the streams must not be drawn
    elsewhere while it is open.
    """

    def __init__(self, streams: SeedStreams, shape: Sequence[int], count: int, device: torch.device | str = "cpu"):
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._streams, self._shape, self._device, self._left = streams, tuple(shape), device, count
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="modiff-draws-ahead")
        self._pending: Optional[tuple[torch.Tensor, Future[None]]] = None
        self._start_next()

    def _start_next(self) -> None:
        if self._left > 0:
            out = self._streams._host_buffer(self._shape, self._device)
            self._pending = out, self._pool.submit(self._streams.draw_into, out)
            self._left -= 1

    def __iter__(self) -> "DrawsAhead":
        return self

    def __next__(self) -> torch.Tensor:
        if self._pending is None:
            raise StopIteration
        out, future = self._pending
        self._pending = None
        future.result()
        self._start_next()
        return to_device(out, self._device)

    def __enter__(self) -> "DrawsAhead":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


def _draw_rows(out: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    for row, generator in zip(out, generators):  # what torch.randn(shape, generator=...) does, in place
        row.normal_(generator=generator)


@dataclass(frozen=True)
class FirstDraw:
    """A batch's streams after their first draw, and that draw: x_T (B, *shape), float32 on the CPU."""

    streams: SeedStreams
    x_T: torch.Tensor

    @classmethod
    def of(cls, seeds: Sequence[int], shape: Sequence[int]) -> "FirstDraw":
        streams = SeedStreams(seeds)
        return cls(streams, streams.randn(shape))


@contextlib.contextmanager
def first_draws_ahead(batches: Sequence[Sequence[int]], shape: Sequence[int]) -> Iterator[Iterator[FirstDraw]]:
    """Each batch's `FirstDraw`, in order, the next batch's drawn on a background thread while the caller uses
    the current one (samples it on a GPU): the per-seed draws run on the host (about 0.1 s per 4,096 seeds on an
    H200 host), which would otherwise leave the device waiting before every batch. The CPU only: a thread that
    touched the GPU could break a CUDA graph being captured on the caller's."""
    with ThreadPoolExecutor(1, thread_name_prefix="modiff-noise") as pool:
        def draws() -> Iterator[FirstDraw]:
            upcoming = [pool.submit(FirstDraw.of, batch, shape) for batch in batches[:1]]
            for following in batches[1:]:
                current = upcoming.pop().result()
                upcoming.append(pool.submit(FirstDraw.of, following, shape))
                yield current
            if upcoming:
                yield upcoming.pop().result()
        yield draws()


def noise(seeds: Iterable[int], shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T for the given seeds: (len(seeds), *shape), the first draw of each seed's stream."""
    return SeedStreams(seeds).randn(shape, device=device)


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (samples.npz) and seed torch generators
MAX_SEEDS = 1_000_000  # per run; larger runs are split into several (runs resume and shard by seed)


def parse_seeds(spec: str) -> list[int]:
    """'0-63' -> [0..63]; '0-9,100' -> [0..9, 100]. Ranges are inclusive; duplicates are refused, and so
    are seeds above MAX_SEED and more than MAX_SEEDS seeds (checked before any list is built)."""
    seeds: list[int] = []
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(
                f"malformed seed spec {spec!r} at {part!r}: use comma-separated integers or "
                f"inclusive ranges, for example '0-63' or '0-9,100'"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"malformed seed range {part!r}: the end {last} is before the start {first}")
        if last > MAX_SEED:
            raise ValueError(f"seed {last} is too large: seeds go up to 2^63 - 1 = {MAX_SEED}")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise ValueError(f"{spec!r} names {len(seeds) + last - first + 1:,} seeds or more; one run takes at most "
                             f"{MAX_SEEDS:,}: split it into several runs (e.g. 0-999999, then 1000000-1999999)")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed spec {spec!r} names some seeds more than once")
    return seeds


def format_seeds(seeds: Iterable[int]) -> str:
    """The inverse of parse_seeds: [0, 1, 2, 3, 10] -> '0-3,10'."""
    ordered = sorted(int(s) for s in seeds)
    parts: list[str] = []
    start = prev = ordered[0]
    for seed in ordered[1:] + [None]:
        if seed is not None and seed == prev + 1:
            prev = seed
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if seed is not None:
            start = prev = seed
    return ",".join(parts)
