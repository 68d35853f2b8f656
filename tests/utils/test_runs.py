"""Files written by modiff (issue 23): the user's umask, and a full disk named."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from modiff.utils.device import resolve_device
from modiff.utils.rng import MAX_SEED, parse_seeds
from modiff.utils import runs
from modiff.utils.runs import DiskFullError, atomic_path, write_bytes_atomic, write_json


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Atomic writes went through mkstemp and stayed 0600 whatever the umask; now they get 0666 & ~umask."""
    old = os.umask(umask)
    try:
        write_json({"a": 1}, tmp_path / "m.json")
        with atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
        write_bytes_atomic(tmp_path / "g.bin", b"y")
    finally:
        os.umask(old)
    for name in ("m.json", "f.bin", "g.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_write_bytes_atomic_writes_every_byte_of_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`os.write` may take fewer bytes than given (a signal, a pipe): the rest is written, not dropped."""
    real_write = os.write
    monkeypatch.setattr(runs.os, "write", lambda descriptor, data: real_write(descriptor, bytes(data[:3])))
    write_bytes_atomic(tmp_path / "a.bin", b"0123456789")
    monkeypatch.undo()
    assert (tmp_path / "a.bin").read_bytes() == b"0123456789" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_write_bytes_atomic_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.png").write_bytes(b"old")

    def full(descriptor: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "write_all", full)
    with pytest.raises(DiskFullError, match=f"no space left on the device of {tmp_path}; a.png was not written"):
        write_bytes_atomic(tmp_path / "a.png", b"new")
    assert (tmp_path / "a.png").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_full_disk_is_named_and_leaves_the_target(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text("old")
    with pytest.raises(DiskFullError, match=f"no space left on the device of {tmp_path}.*f.json was not written"):
        with atomic_path(tmp_path / "f.json") as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "f.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_seed_limits() -> None:
    """Counts are checked before a list is built (0-99999999999 was a MemoryError); seeds fit int64."""
    with pytest.raises(ValueError, match="at most 1,000,000"):
        parse_seeds("0-99999999999")
    with pytest.raises(ValueError, match="too large"):
        parse_seeds(str(MAX_SEED + 1))
    assert parse_seeds(f"{MAX_SEED}") == [MAX_SEED]


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "mps"])
def test_unknown_devices(device: str) -> None:
    with pytest.raises(ValueError, match=r"use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_the_environment_names_the_cpu_and_its_vector_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest says which CPU made it: float32 sums, and so 4-bit rounding ties, depend on its vector unit."""
    capability = runs.torch.backends.cpu.get_cpu_capability()
    assert runs.environment()["cpu"].endswith(f", {capability}")

    def no_cpuinfo(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.setattr(runs.platform, "processor", lambda: "Some CPU")
    assert runs.cpu_name() == f"Some CPU, {capability}"


def test_the_commit_of_a_copied_tree_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree sent to a GPU machine may travel without .git, or with the git of an older commit than its files:
    $MODIFF_GIT_SHA, where set, names the commit; else git does; else nothing."""
    monkeypatch.delenv(runs.GIT_SHA_VARIABLE, raising=False)
    head = runs._git_sha()
    assert head is not None and len(head) == 40  # this checkout's
    monkeypatch.setenv(runs.GIT_SHA_VARIABLE, "f" * 40)
    assert runs._git_sha() == "f" * 40
    monkeypatch.setattr(runs, "repo_root", lambda: tmp_path)  # no repository there
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert runs.environment()["git_sha"] == "f" * 40
    monkeypatch.delenv(runs.GIT_SHA_VARIABLE)
    assert runs._git_sha() is None


def test_a_cpu_device_is_named_with_its_model_and_vector_unit() -> None:
    """Float32 sums round differently on another CPU (a 3-bit network can then cross a rounding tie), so a CPU
    notebook or run names its CPU, not only the architecture."""
    name = runs.environment("cpu")["device"]
    assert name == f"cpu ({runs.cpu_name()})" and name.endswith(f", {torch.backends.cpu.get_cpu_capability()})")
