"""Which run folders a notebook made and which it reused, so a report's times say what work they cover.

A notebook whose run folders were all made earlier finishes in seconds; its time alone would mislead.
`recording(path)` names a file in the environment variable `RUN_USAGE_ENV` for the duration of a block
(the notebook kernel and its worker processes inherit it); `note(run_dir, made)` appends one JSON line
there when the variable is set and does nothing otherwise; `RunUsage.read(path)` counts the folders.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["RUN_USAGE_ENV", "RunUsage", "note", "recording"]

RUN_USAGE_ENV = "MODIFF_RUN_USAGE"


def _sessions(run_dir: Path) -> list[dict[str, Any]]:
    try:
        sessions = json.loads((run_dir / "manifest.json").read_text()).get("sessions", [])
    except (OSError, ValueError):
        return []
    return [s for s in sessions if isinstance(s, dict)]


def _sampling_seconds(sessions: list[dict[str, Any]]) -> float:
    """Seconds every session of the run spent sampling, as its manifest records them (0 if it does not)."""
    return float(sum(s.get("seconds", 0.0) for s in sessions))


def _devices(sessions: list[dict[str, Any]]) -> list[str]:
    """The devices the run's sessions sampled on (``NVIDIA H100 80GB HBM3``), as their manifests record them."""
    return sorted({str(s["environment"]["device"]) for s in sessions
                   if isinstance(s.get("environment"), dict) and s["environment"].get("device")})


def note(run_dir: str | Path, made: bool) -> None:
    """Record that ``run_dir`` was made (images sampled now) or reused (finished earlier), when a
    `recording` block is active in this process or a parent; otherwise do nothing."""
    target = os.environ.get(RUN_USAGE_ENV)
    if not target:
        return
    sessions = _sessions(Path(run_dir))
    line = {"run": str(Path(run_dir).resolve()), "made": bool(made), "sampling_seconds": _sampling_seconds(sessions),
            "devices": _devices(sessions)}
    with open(target, "a") as f:  # one short line per call: appends from several processes do not interleave
        f.write(json.dumps(line) + "\n")


@contextmanager
def recording(path: str | Path) -> Iterator[Path]:
    """Within the block, `note` appends to ``path`` (created empty); the variable is restored after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    before = os.environ.get(RUN_USAGE_ENV)
    os.environ[RUN_USAGE_ENV] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(RUN_USAGE_ENV, None)
        else:
            os.environ[RUN_USAGE_ENV] = before


@dataclass(frozen=True)
class RunUsage:
    """Run folders a notebook used: ``made`` (sampled, at least in part, while it ran) and ``reused``
    (finished before), the seconds the reused ones had spent sampling when they were made, and on which
    devices (device name: how many of the reused runs sampled on it; a run resumed elsewhere counts for each)."""

    made: int
    reused: int
    reused_sampling_seconds: float
    reused_devices: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> "RunUsage":
        """Count the folders noted in ``path``: a folder noted as made anywhere (a worker process made it,
        the notebook then read it back) counts as made."""
        made: dict[str, bool] = {}
        seconds: dict[str, float] = {}
        devices: dict[str, set[str]] = {}
        for line in Path(path).read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                made[entry["run"]] = made.get(entry["run"], False) or entry["made"]
                seconds[entry["run"]] = max(seconds.get(entry["run"], 0.0), entry.get("sampling_seconds", 0.0))
                devices.setdefault(entry["run"], set()).update(entry.get("devices", []))
        reused = [run for run, was_made in made.items() if not was_made]
        counts = Counter(device for run in reused for device in devices[run])
        return cls(made=sum(made.values()), reused=len(reused),
                   reused_sampling_seconds=round(sum(seconds[r] for r in reused), 1),
                   reused_devices=dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
