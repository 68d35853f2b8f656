"""One writer per folder: an exclusive lock on ``folder/.lock``, whose text names its holder.

`folder_lock(folder)` takes ``flock(LOCK_EX | LOCK_NB)`` on ``folder/.lock`` and writes the holder (host,
pid, start time) into it. A second process asking for the folder is refused at once with a
`FolderLockedError` naming the holder. The kernel drops the lock when its process ends, however it ends
(``kill -9`` included), so the lock of a dead process is taken over without anyone deleting a file; over
NFS, Linux maps flock to POSIX locks, which also hold between hosts.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

__all__ = ["FolderLockedError", "folder_lock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class FolderLockedError(ValueError):
    """Another live process holds the folder's lock."""


def _holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[dict[str, Any]]:
    """Hold the lock of ``folder`` for the block; yields this holder's record (host, pid, since)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise FolderLockedError(
                f"{folder} is being written by another process: pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')!r}, since {holder.get('since', '?')}. Wait for it to finish, or "
                f"write into another folder (another --out)") from None
        me = {"host": platform.node(), "pid": os.getpid(),
              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        yield me
    finally:
        os.close(fd)  # releases the lock
