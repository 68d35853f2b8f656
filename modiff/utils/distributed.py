"""This process's place in a torch.distributed group, and the collectives the toolkit's ranks use: a value
computed by rank 0 for all (`World.from_leader`), a gather, and work dealt over the ranks (`World.share`,
`World.run_own`) with any rank's failure raised on every rank. Without a group: rank 0 of 1, everything in
place. How the groups are started (torchrun, `launch`) is `modiff.pipelines.distributed`.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch.distributed as dist

__all__ = ["World", "portable_error"]

T = TypeVar("T")


def portable_error(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (to reach the other ranks or the parent), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # any exception type may refuse pickling; its text still reaches the others
        return RuntimeError(f"{type(err).__name__}: {err}")


@dataclass(frozen=True)
class World:
    """This process's place in the default process group: rank ``rank`` of ``size`` (0 of 1 without one)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def from_leader(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0; its result, or the exception it raised, reaches every rank."""
        if self.size == 1:
            return compute()
        box: list[Any] = [None]
        own: Optional[Exception] = None
        if self.leader:
            try:
                box[0] = (True, compute())
            except Exception as err:  # raised on every rank: here as it was, elsewhere as it arrives
                own, box[0] = err, (False, portable_error(err))
        dist.broadcast_object_list(box, src=0)
        ok, value = box[0]
        if not ok:
            raise own if own is not None else value
        return value

    def gather(self, value: T) -> list[T]:
        """``value`` of every rank, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def share(self, items: Sequence[T], work: Callable[[T], object]) -> None:
        """``work(item)`` for this rank's share of ``items`` (items r, r+N, ...); see `run_own`."""
        self.run_own(list(items)[self.rank::self.size], work)

    def run_own(self, mine: Sequence[T], work: Callable[[T], object]) -> None:
        """``work(item)`` for each of this rank's items ``mine``; returns once every rank has done its own. An
        exception on any rank is raised on every rank (its own where it was raised), after the others have
        finished: no rank waits for a dead peer, and none returns as if all went well."""
        failure: Optional[Exception] = None
        for item in mine:
            try:
                work(item)
            except Exception as err:  # stop this rank's work; the others finish theirs, then all raise
                failure = err
                break
        failures = self.gather(None if failure is None else portable_error(failure))
        if failure is not None:
            raise failure
        raised = next((f for f in failures if f is not None), None)
        if raised is not None:
            raise raised
