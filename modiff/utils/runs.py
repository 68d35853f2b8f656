"""Run directories: atomic writes and manifests (config, git sha, versions, seeds, device, times).

Files written here get the mode a plain ``open(path, "w")`` would give them (0666 less the umask), and a
full disk raises `DiskFullError` naming the folder; what was written before stays.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import subprocess
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from modiff._version import __version__
from modiff.utils.paths import repo_root

__all__ = ["atomic_path", "write_bytes_atomic", "write_json", "environment", "ensure_writable_dir", "DiskFullError", "disk_full_hint",
           "file_mode"]


class DiskFullError(OSError):
    """No space left on the device of a folder being written (errno ENOSPC), with a message that says so."""


def file_mode() -> int:
    """0666 less the process umask: the mode ``open(path, "w")`` gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def disk_full_hint(folder: Path, what: str = "") -> Iterator[None]:
    """Turn ``OSError(ENOSPC)`` raised in the block into a `DiskFullError` naming ``folder``."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or isinstance(err, DiskFullError):
            raise
        kept = f"; {what}" if what else ""
        raise DiskFullError(errno.ENOSPC, f"no space left on the device of {folder}{kept}. Free some space "
                                          f"and run the same command again") from err


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. The file
    gets the umask's mode (a temporary file alone would be 0600). A full disk raises `DiskFullError`."""
    with disk_full_hint(path.parent, f"{path.name} was not written, files written before are kept"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` (an existing folder) through a temporary name beside it, renamed once complete.
    The same guarantees as `atomic_path` with fewer system calls and little Python per file, for many small
    files (the PNG writer's): the temporary name is this thread's own, the file gets the umask's mode, and a
    full disk raises `DiskFullError`."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        descriptor = os.open(tmp, _NEW_FILE_FLAGS, 0o666)
        try:
            write_all(descriptor, data)
        finally:
            os.close(descriptor)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        with disk_full_hint(Path(folder), f"{name} was not written, files written before are kept"):
            raise


def write_all(descriptor: int, data: bytes) -> None:
    """Every byte of ``data`` to an open file (`os.write` may take fewer than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view):]


def write_json(data: Mapping[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` if needed and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe."):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to the output directory {path}: {err.strerror or err}") from err
    return path


GIT_SHA_VARIABLE = "MODIFF_GIT_SHA"


def _git_sha() -> str | None:
    """The commit of the code modiff runs: $MODIFF_GIT_SHA where set (a copy of the tree sent to another machine,
    whose own git, if any, may name an older commit than the files it holds), else HEAD of the checkout, else None."""
    given = os.environ.get(GIT_SHA_VARIABLE, "").strip()
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU's model and the vector unit torch's CPU kernels use ("AMD EPYC, AVX2"): float32 sums round
    differently with another, and a 3-4 bit network can then move a value across a rounding tie."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.backends.cpu.get_cpu_capability()}"


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a manifest records about where and with what a run was made."""
    import numpy

    env: dict[str, Any] = {
        "modiff": __version__,
        "git_sha": _git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "host": platform.node(),
        "cpu": cpu_name(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        dev = torch.device(device)
        env["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} ({cpu_name()})"
    return env
