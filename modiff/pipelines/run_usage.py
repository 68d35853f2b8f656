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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["RUN_USAGE_ENV", "RunUsage", "note", "recording"]

RUN_USAGE_ENV = "MODIFF_RUN_USAGE"


def _sampling_seconds(run_dir: Path) -> float:
    """Seconds every session of the run spent sampling, as its manifest records them (0 if it does not)."""
    try:
        sessions = json.loads((run_dir / "manifest.json").read_text()).get("sessions", [])
    except (OSError, ValueError):
        return 0.0
    return float(sum(s.get("seconds", 0.0) for s in sessions))


def note(run_dir: str | Path, made: bool) -> None:
    """Record that ``run_dir`` was made (images sampled now) or reused (finished earlier), when a
    `recording` block is active in this process or a parent; otherwise do nothing."""
    target = os.environ.get(RUN_USAGE_ENV)
    if not target:
        return
    line = {"run": str(Path(run_dir).resolve()), "made": bool(made), "sampling_seconds": _sampling_seconds(Path(run_dir))}
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
    (finished before), and the seconds the reused ones had spent sampling when they were made."""

    made: int
    reused: int
    reused_sampling_seconds: float

    @classmethod
    def read(cls, path: str | Path) -> "RunUsage":
        """Count the folders noted in ``path``: a folder noted as made anywhere (a worker process made it,
        the notebook then read it back) counts as made."""
        made: dict[str, bool] = {}
        seconds: dict[str, float] = {}
        for line in Path(path).read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                made[entry["run"]] = made.get(entry["run"], False) or entry["made"]
                seconds[entry["run"]] = max(seconds.get(entry["run"], 0.0), entry.get("sampling_seconds", 0.0))
        reused = [run for run, was_made in made.items() if not was_made]
        return cls(made=sum(made.values()), reused=len(reused),
                   reused_sampling_seconds=round(sum(seconds[r] for r in reused), 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
