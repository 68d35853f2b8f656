"""Sampling on torch.distributed: two gloo ranks on the CPU write the run one process would write."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist

from modiff.pipelines import distributed
from modiff.utils.distributed import World
from modiff.pipelines.generate import SampleConfig, generate
from modiff.quant import presets, quantize, trajectory

CONFIG = SampleConfig(steps=3)
PRESET = "published-w4a4"  # one activation scale per run of samples: an image depends on its batch companions
_PUBLISHED = presets[PRESET]
PAIRS = replace(_PUBLISHED, activation=replace(_PUBLISHED.activation,  # runs of 2, the batch size of these runs
                                               spec=replace(_PUBLISHED.activation.spec, samples_per_scale=2)))


def _quantized_run(device: str, model, seeds, out: Path, prepare=None) -> None:
    """What each rank (and the one-process reference) runs: the preset's model sampled into ``out``."""
    net = quantize(model, PAIRS)
    generate(net, list(seeds), out, CONFIG, batch_size=2, device=device, identity={"name": "tame", "preset": PRESET},
             prepare=prepare or trajectory, progress=False)


def _four_step_run(device: str, model, seeds, out: Path) -> None:
    generate(model, list(seeds), out, SampleConfig(steps=4), batch_size=2, device=device,
             identity={"name": "tame", "preset": PRESET}, progress=False)


class FailOnRank:
    """A `prepare` that raises on one rank (the others sample as usual)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self, model):
        if dist.get_rank() == self.rank:
            raise RuntimeError(f"rank {self.rank} broke")
        return trajectory(model)


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "samples").iterdir())}


@pytest.mark.slow
def test_two_ranks_resume_a_run_into_the_images_of_one_process(tmp_path: Path, tame_denoiser) -> None:
    """A run begun by one process (seeds 0-3) and finished by two gloo ranks (0-8, batches dealt k mod 2)
    holds, bit for bit, the PNGs, samples.npz and grid of one uninterrupted process; one session records
    both ranks, and the seeds are recorded once."""
    single, shared = tmp_path / "single", tmp_path / "shared"
    _quantized_run("cpu", tame_denoiser, range(9), single)
    _quantized_run("cpu", tame_denoiser, range(4), shared)
    distributed.launch(_quantized_run, ["cpu", "cpu"], tame_denoiser, range(9), shared)
    assert _files(shared) == _files(single) and len(_files(shared)) == 9
    assert (shared / "grid.png").read_bytes() == (single / "grid.png").read_bytes()
    with np.load(shared / "samples.npz") as a, np.load(single / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["seeds"], b["seeds"])
    manifest = json.loads((shared / "manifest.json").read_text())
    first, second = manifest["sessions"]
    assert "ranks" not in first and first["seeds_sampled"] == 4
    assert second["world_size"] == 2 and [r["rank"] for r in second["ranks"]] == [0, 1]
    assert [r["seeds_sampled"] for r in second["ranks"]] == [3, 2]  # batches [4, 5], [8] and [6, 7]
    assert second["seeds_sampled"] == 5 and manifest["seeds"] == list(range(9))
    assert not [p for p in shared.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_failing_rank_leaves_the_run_unfinished(tmp_path: Path, tame_denoiser) -> None:
    """Rank 1 fails: its error reaches the caller, the seeds are not recorded as done and no samples.npz is
    written; rank 0's PNGs stay, and a one-process re-run finishes the run as if nothing had happened. Two
    ranks with another sample config are refused before any image."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="rank 1 broke"):
        distributed.launch(_quantized_run, ["cpu", "cpu"], tame_denoiser, range(6), out, FailOnRank(1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [] and not (out / "samples.npz").exists()
    assert sorted(_files(out)) == ["000000.png", "000001.png", "000004.png", "000005.png"]
    _quantized_run("cpu", tame_denoiser, range(6), out)
    _quantized_run("cpu", tame_denoiser, range(6), tmp_path / "single")
    assert _files(out) == _files(tmp_path / "single")
    with pytest.raises(ValueError, match=r"another configuration .*sample.steps: 3 -> 4"):  # rank 0's check, every rank
        distributed.launch(_four_step_run, ["cpu", "cpu"], tame_denoiser, range(8), out)
    assert len(json.loads((out / "manifest.json").read_text())["sessions"]) == 2 and len(_files(out)) == 6


def test_launch_refuses_no_devices_and_mixed_devices() -> None:
    with pytest.raises(ValueError, match="at least one device"):
        distributed.launch(_quantized_run, [])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="mix CPU and GPU"):
            distributed.launch(_quantized_run, ["cpu", "cuda:0"])


def test_one_process_world_runs_the_leader_code_in_place() -> None:
    """Without a process group: rank 0 of 1, the leader's exception raised as is, gather of one value."""
    world = World.current()
    assert world == World(0, 1) and world.leader
    assert world.from_leader(lambda: 7) == 7 and world.gather("x") == ["x"]
    with pytest.raises(KeyError):
        world.from_leader(lambda: {}["missing"])
    done: list[int] = []
    world.share([1, 3], done.append)
    with pytest.raises(KeyError):  # a share stops at its first failure
        world.share([5, 2, 7], lambda item: done.append(item) if item != 2 else {}["broken"])
    assert done == [1, 3, 5]


def _share_rank(device: str, out: Path, broken: Optional[int]) -> None:
    """Each rank's share of items 0-4, marked done by a file (``broken`` raises), then a mark of returning."""
    world = World.current()

    def work(item: int) -> None:
        if item == broken:
            (out.parent / "failed").touch()
            raise RuntimeError(f"item {item} broke")
        if item == 4 and broken is not None:  # rank 0's last item ends well after rank 1 has failed
            while not (out.parent / "failed").exists():
                time.sleep(0.05)
            time.sleep(2)
        (out / f"{item}-rank{world.rank}").touch()

    world.share(range(5), work)
    (out / f"returned-rank{world.rank}").touch()


@pytest.mark.slow
def test_share_deals_items_round_robin_and_raises_a_failure_on_every_rank(tmp_path: Path) -> None:
    """Two gloo ranks: rank r does items r, r+2, ...; when rank 1 breaks on item 1, rank 0 still finishes its
    share, and neither returns as if the work were done (the launcher raises the failure)."""
    (tmp_path / "ok").mkdir(), (tmp_path / "broken").mkdir()
    distributed.launch(_share_rank, ["cpu", "cpu"], tmp_path / "ok", None)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [
        "0-rank0", "1-rank1", "2-rank0", "3-rank1", "4-rank0", "returned-rank0", "returned-rank1"]
    with pytest.raises(RuntimeError, match="item 1 broke"):
        distributed.launch(_share_rank, ["cpu", "cpu"], tmp_path / "broken", 1)
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == ["0-rank0", "2-rank0", "4-rank0"]


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank and sizes read from torchrun's variables; the CPU stays the CPU on every rank; a scrubbed
    environment for child processes drops them."""
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.torchrun_world() is None
    with distributed.torchrun_session("cpu") as device:  # not under torchrun: nothing started
        assert device == "cpu" and not dist.is_initialized()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert distributed.torchrun_world() == (3, 1, 4, 2)
    assert distributed.local_devices("cpu", 2) == ["cpu", "cpu"]
    kept = distributed.without_torchrun_environment()
    assert not {"RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"} & set(kept) and "PATH" in kept


def test_ranks_that_only_coordinate_may_share_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared: a fixed GPU serves every rank, and cuda deals the GPUs there are; not shared, a fixed GPU for
    several ranks is refused (NCCL cannot put two ranks on one GPU)."""
    monkeypatch.setattr(distributed, "resolve_device", torch.device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [distributed.rank_device("cuda", rank, 4, shared=True) for rank in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert distributed.rank_device("cuda:1", 2, 4, shared=True) == "cuda:1"
    assert distributed.rank_device("cpu", 3, 4, shared=True) == "cpu"
    with pytest.raises(ValueError, match="all 4 ranks on one GPU"):
        distributed.rank_device("cuda:1", 3, 4)


def test_a_session_that_only_coordinates_joins_gloo_on_a_shared_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    joined: list[tuple[str, Optional[str]]] = []
    monkeypatch.setattr(distributed, "_join", lambda device, backend=None: joined.append((str(device), backend)))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(distributed, "resolve_device", torch.device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _torchrun_env(monkeypatch, 1, 2, 2)
    with distributed.torchrun_session("cuda:0", coordinate_only=True) as device:
        assert device == "cuda:0"
    with distributed.torchrun_session("cuda", coordinate_only=True) as device:
        assert device == "cuda:0"
    assert joined == [("cuda:0", "gloo"), ("cuda:0", "gloo")]
    with pytest.raises(ValueError, match="all 2 ranks on one GPU"):
        with distributed.torchrun_session("cuda:0"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_rank_takes_its_own_gpu() -> None:
    assert distributed.rank_device("auto", 0, 1) == "cuda:0"
    assert distributed.rank_device("cuda", 0, 2) == "cuda:0"
    with pytest.raises(ValueError, match="all 2 ranks on one GPU"):
        distributed.rank_device("cuda:0", 1, 2)


@pytest.mark.slow
def test_torchrun_sample_equals_one_process(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m modiff sample` (gloo, CPU) writes the run `modiff sample` writes."""
    from click.testing import CliRunner

    from conftest import TINY, tiny_net
    from modiff.cli import main
    from modiff.pipelines.train import DDIMTrainConfig, export_weights

    export_weights(tiny_net(0), DDIMTrainConfig(model=TINY).official_yaml(), tmp_path / "tiny")
    args = ["sample", "--model", str(tmp_path / "tiny"), "--preset", "w8a4-modiff", "--seeds", "0-6", "--steps", "2",
            "--batch-size", "2", "--device", "cpu"]
    single = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads of the reference run
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "modiff",
                            *args, "--out", str(tmp_path / "ranks")], capture_output=True, text=True, env=env, timeout=300)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert ranks.stdout.count("wrote 7 new samples") == 1  # rank 0 speaks for the job
    assert _files(tmp_path / "ranks") == _files(tmp_path / "single")
    (session,) = json.loads((tmp_path / "ranks" / "manifest.json").read_text())["sessions"]
    assert session["world_size"] == 2 and session["seeds_sampled"] == 7


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, size: int, local_size: int) -> None:
    for name, value in {"RANK": rank, "LOCAL_RANK": rank % local_size, "WORLD_SIZE": size,
                        "LOCAL_WORLD_SIZE": local_size, "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(name, str(value))


def test_reproduce_under_torchrun_runs_on_rank_0_with_every_local_device(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """Rank 0 gets one device per local rank and an environment its notebook kernels cannot mistake for a
    rank's; the other ranks leave the work to it (`modiff reproduce` exits at once); several machines are refused."""
    from click.testing import CliRunner

    from modiff.cli import main

    _torchrun_env(monkeypatch, 1, 2, 2)
    assert distributed.torchrun_devices("cpu") == []
    result = CliRunner().invoke(main, ["reproduce", "--reports", str(tmp_path / "reports"), "--set", "device=cpu"])
    assert result.exit_code == 0 and result.output == "" and not (tmp_path / "reports").exists()
    _torchrun_env(monkeypatch, 0, 4, 2)
    with pytest.raises(ValueError, match="one machine"):
        distributed.torchrun_devices("cpu")
    _torchrun_env(monkeypatch, 0, 2, 2)
    assert distributed.torchrun_devices("cpu") == ["cpu", "cpu"]
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ and "PATH" in os.environ
