"""The on-disk recording and its lazy loader.

Layout of a recording directory (every file written atomically; manifest.json last):

    manifest.json              sites, capture, reducers, engine and count kernel, steps and their timesteps
                               t, trajectories, samples, model description, environment, tensor spec,
                               memory budget, user metadata
    stats.csv                  one row per site x capture x kind (raw|diff) x step x call x statistic:
                               columns site, capture, kind, step, t, call, reducer, statistic, value
    arrays.npz                 array results (histogram counts/edges, per-channel absmax), keyed
                               <site>/<capture>/<kind>/step=<step:03d>/call=<call>/<reducer>.<name>
    tensors.index.json         full tensors: key -> shard file, rows (sample indices) of every part
    tensors-00001.safetensors  ... the shards

`kind` is "raw" for the activation a_t and "diff" for the temporal difference a_t - a_{t+1} (step index s
minus step index s - 1; none at the first step). `t` is the sampler's timestep of the step (empty where no
`on_step` reported it).
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from modiff.record.results import ResultBatch
from modiff.record.tensors import INDEX_FILE, tensor_key
from modiff.utils.runs import atomic_path, write_json

__all__ = ["Recording", "load_recording", "write_recording", "results_to_tables", "array_key", "STATS_COLUMNS", "ResultKey"]

STATS_COLUMNS = ["site", "capture", "kind", "step", "t", "call", "reducer", "statistic", "value"]
ResultKey = tuple[str, str, str, int, int]  # site, capture, kind, step, call


def array_key(site: str, capture: str, kind: str, step: int, call: int, reducer: str, name: str) -> str:
    return f"{site}/{capture}/{kind}/step={step:03d}/call={call}/{reducer}.{name}"


def results_to_tables(keys: Sequence[ResultKey], reducers: Sequence[str], batches: Iterable[ResultBatch],
                      timesteps: Mapping[int, int]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """(stats rows, arrays) of results in column batches (`batched.result_batches`): result i belongs to
    key keys[i] and the reducer named reducers[i]. Scalars become rows (ordered by i, then by statistic),
    arrays the entries of arrays.npz."""
    position: list[np.ndarray] = []  # result i of each row
    rank: list[np.ndarray] = []  # the statistic's place in its result
    names: list[np.ndarray] = []
    values: list[np.ndarray] = []
    entries: list[tuple[int, str, np.ndarray]] = []  # (i, array key, value)
    for batch in batches:
        index = np.asarray(batch.index, dtype=np.int64)
        for j, (name, column) in enumerate(batch.columns.scalars.items()):
            position.append(index)
            rank.append(np.full(len(index), j))
            names.append(np.full(len(index), name, dtype=object))
            values.append(np.asarray(column, dtype=np.float64))
        for name, column in batch.columns.arrays.items():
            entries += [(i, array_key(*keys[i], reducers[i], name), value) for i, value in zip(batch.index, column)]
    entries.sort(key=lambda entry: entry[0])  # stable: a result's arrays keep their order
    at = np.concatenate(position) if position else np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.concatenate(rank), at)) if position else at
    at = at[order]
    site, capture, kind, step, call = (np.array(column, dtype=object) for column in zip(*keys)) if keys else (
        np.zeros(0, dtype=object),) * 5
    frame = pd.DataFrame({
        "site": site[at], "capture": capture[at], "kind": kind[at], "step": step[at].astype(np.int64),
        "t": pd.array([timesteps.get(s) for s in step.tolist()], dtype="Int64")[at], "call": call[at].astype(np.int64),
        "reducer": np.array(reducers, dtype=object)[at],
        "statistic": np.concatenate(names)[order] if names else np.zeros(0, dtype=object),
        "value": np.concatenate(values)[order] if values else np.zeros(0)})
    return frame, {key: value for _, key, value in entries}


def write_recording(out: Path, manifest: Mapping[str, Any], stats: pd.DataFrame, arrays: Mapping[str, np.ndarray],
                    tensor_index: Optional[Mapping[str, Any]]) -> Path:
    """Write the files of a recording into `out` (manifest.json last, so its presence marks a whole one)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "stats.csv") as tmp:
        stats.to_csv(tmp, index=False)
    with atomic_path(out / "arrays.npz") as tmp:
        with tmp.open("wb") as f:
            np.savez(f, **arrays)
    if tensor_index is not None:
        write_json(tensor_index, out / INDEX_FILE)
    write_json(manifest, out / "manifest.json")
    return out


class Recording:
    """A recording directory, read lazily: the manifest at once, statistics and arrays on first use,
    tensors one at a time from their shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.path} is not a recording: no manifest.json (was the recording saved?)")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())

    def __repr__(self) -> str:
        return f"Recording({str(self.path)!r}, sites={len(self.sites)}, steps={len(self.steps)})"

    @property
    def sites(self) -> list[str]:
        return [s["name"] for s in self.manifest["sites"]]

    @property
    def steps(self) -> list[int]:
        return list(self.manifest["steps"])

    @property
    def timesteps(self) -> list[Optional[int]]:
        """The timestep t of each entry of `steps` (None where unknown)."""
        return list(self.manifest["timesteps"])

    @cached_property
    def stats(self) -> pd.DataFrame:
        """All scalar statistics (columns STATS_COLUMNS), read on first access."""
        frame = pd.read_csv(self.path / "stats.csv", dtype={"site": str, "capture": str, "kind": str,
                                                             "reducer": str, "statistic": str})
        return frame.astype({"step": "int64", "t": "Int64", "call": "int64", "value": "float64"})

    @cached_property
    def _arrays(self) -> Any:
        return np.load(self.path / "arrays.npz")

    @cached_property
    def _index(self) -> dict[str, Any]:
        path = self.path / INDEX_FILE
        return json.loads(path.read_text()) if path.is_file() else {"tensors": {}}

    @cached_property
    def _array_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for key in self._arrays.files:
            groups.setdefault(key.rsplit("/", 1)[0], []).append(key)
        return groups

    def arrays(self, site: str, step: int, kind: str = "raw", *, call: int = 0, capture: str = "input") -> dict[str, np.ndarray]:
        """Array results of one key, named '<reducer>.<name>' (e.g. 'histogram.counts', 'channel_absmax.absmax')."""
        group = array_key(site, capture, kind, step, call, "", "").rsplit("/", 1)[0]
        return {k.rsplit("/", 1)[1]: self._arrays[k] for k in self._array_groups.get(group, [])}

    @cached_property
    def _outside(self) -> dict[tuple[Any, ...], float]:
        s = self.stats
        picked = s[s["statistic"].isin(["underflow", "overflow"])]
        cols = ["site", "capture", "kind", "step", "call", "reducer", "statistic"]
        return {tuple(r[:-1]): r[-1] for r in picked[cols + ["value"]].itertuples(index=False, name=None)}

    def histogram(self, site: str, step: int, kind: str = "raw", *, call: int = 0, capture: str = "input",
                  reducer: str = "histogram") -> dict[str, Any]:
        """counts (bins,), edges (bins + 1,), underflow, overflow of one site, step and kind (raw|diff)."""
        found = self.arrays(site, step, kind, call=call, capture=capture)
        if f"{reducer}.counts" not in found:
            raise KeyError(f"no histogram '{reducer}' for site {site!r}, step {step}, kind {kind!r}, call {call}, "
                           f"capture {capture!r} in {self.path}; reducers: {[r['name'] for r in self.manifest['reducers']]}")
        key = (site, capture, kind, step, call, reducer)
        return {"counts": found[f"{reducer}.counts"], "edges": found[f"{reducer}.edges"],
                "underflow": self._outside.get(key + ("underflow",), 0.0),
                "overflow": self._outside.get(key + ("overflow",), 0.0)}

    def tensor_keys(self) -> list[str]:
        """Keys of the recorded full tensors (parts of later trajectories merged)."""
        return list(self._index["tensors"])

    def tensor(self, site: str, step: int, call: int = 0, capture: str = "input") -> torch.Tensor:
        """The full tensor of one site, step and call (all trajectories concatenated along dim 0)."""
        base = tensor_key(site, capture, step, call)
        parts = self._index["tensors"].get(base)
        if not parts:
            known = sorted({k.split("/", 1)[0] for k in self._index["tensors"]})
            raise KeyError(f"no tensor {base!r} in {self.path}; tensors were recorded for sites {known}")
        loaded = []
        for entry in parts:
            with safe_open(str(self.path / entry["file"]), framework="pt") as f:
                loaded.append(f.get_tensor(entry["key"]))
        return loaded[0] if len(loaded) == 1 else torch.cat(loaded, dim=0)

    def tensor_rows(self, site: str, step: int, call: int = 0, capture: str = "input") -> list[int]:
        """The sample indices of the rows of `tensor(...)`."""
        parts = self._index["tensors"].get(tensor_key(site, capture, step, call), [])
        return [row for entry in parts for row in entry["rows"]]


def load_recording(path: str | Path) -> Recording:
    """Open a recording directory written by `modiff.record.record(...)` or `modiff record`."""
    return Recording(path)
