"""Sampling on torch.distributed: one process per device, the batches of a run dealt over the ranks.

Three ways in, one mechanism:

- ``torchrun --nproc-per-node N -m modiff sample|evaluate ...``: the command joins the group torchrun
  describes in its environment (`torchrun_session`), each rank on its own device;
- `launch(fn, devices, *args)`: one process per device, joined by an ``env://`` rendezvous on localhost
  (what ``modiff reproduce --set devices=...`` uses, through `analysis.experiments.fill_runs`);
- a script that initialises its own process group: `generate` uses the default group when there is one.

`generate` then deals the batches of a run over the ranks: rank r samples batches r, r+N, ... of the
batches a one-process run would sample, so every image equals the one-process image of its seed (quantized
images depend on their batch companions, see `modiff.pipelines.run_folder`); with ``--batch-size 1``
rank r samples seeds r, r+N, .... Rank 0 alone holds the folder's lock, checks the identity and writes the
manifest; every rank writes its own PNGs; the seeds are recorded as done, and grid.png and samples.npz
written, only once every rank has finished. Backend: NCCL on CUDA, gloo on the CPU.

Calibration (``torchrun -m modiff calibrate-shipped``, `modiff.quant.ptq.reuse.calibrate_shipped`) deals whole
tasks instead (`modiff.utils.distributed.World.share`: AdaRound runs, then presets), and its ranks only
exchange Python objects, so its group is gloo's and ranks may share a GPU (`torchrun_session(...,
coordinate_only=True)`). `World` (a rank's place in the group and its collectives) lives in `modiff.utils`,
below the quantization code that deals work with it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from modiff.utils.device import resolve_device
from modiff.utils.distributed import portable_error

__all__ = ["launch", "torchrun_world", "torchrun_session", "torchrun_devices", "local_devices",
           "rank_device", "without_torchrun_environment", "backend_for"]

log = logging.getLogger(__name__)

# Ranks wait for each other through work that can take hours (a calibration dealt to one rank): the
# launcher ends every rank as soon as one fails, so a long timeout never hides a dead peer.
TIMEOUT = timedelta(hours=12)
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def torchrun_world() -> Optional[tuple[int, int, int, int]]:
    """(rank, local rank, world size, local world size) from the environment torchrun sets; None when
    this process was not started by torchrun (or by a launcher that sets the same variables)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    size = int(os.environ["WORLD_SIZE"])
    return (int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), size,
            int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def rank_device(device: str, local_rank: int, world_size: int, shared: bool = False) -> str:
    """The device of one rank: ``auto`` and ``cuda`` mean the rank's own GPU (cuda:LOCAL_RANK) where there
    is CUDA; ``cpu`` stays; a fixed ``cuda:N`` is refused with several ranks (they would share one GPU),
    unless ``shared``: ranks that only coordinate (gloo) may share GPUs, so a fixed device serves every rank
    and ``auto``/``cuda`` deal the GPUs there are over the ranks (cuda:LOCAL_RANK mod their count)."""
    dev = resolve_device(device)
    if dev.type == "cpu" or world_size == 1:
        return str(dev)
    if shared:
        return str(dev if dev.index is not None else resolve_device(f"cuda:{local_rank % torch.cuda.device_count()}"))
    if dev.index is not None:
        raise ValueError(f"--device {device} under torchrun would put all {world_size} ranks on one GPU; pass "
                         f"--device cuda (or auto): each rank then takes cuda:LOCAL_RANK")
    return str(resolve_device(f"cuda:{local_rank}"))


@contextlib.contextmanager
def torchrun_session(device: str, coordinate_only: bool = False) -> Iterator[str]:
    """Under torchrun with several ranks: join the process group for the block and yield this rank's
    device (`rank_device`); otherwise yield ``device`` unchanged and start nothing. ``coordinate_only``: the
    ranks exchange only Python objects and barriers (a calibration dealt over them), so the group is gloo's
    whatever the device, and ranks may share a GPU (`rank_device`'s ``shared``)."""
    found = torchrun_world()
    if found is None or found[2] == 1 or dist.is_initialized():
        yield device
        return
    _, local_rank, size, _ = found
    mine = rank_device(device, local_rank, size, shared=coordinate_only)
    _join(torch.device(mine), "gloo" if coordinate_only else None)
    try:
        yield mine
    finally:
        dist.destroy_process_group()


def _join(device: torch.device, backend: Optional[str] = None) -> None:
    """Initialise the default group from the environment (env://) for a rank on ``device`` (its backend by
    default: `backend_for`)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend or backend_for(device), init_method="env://", timeout=TIMEOUT)


def local_devices(device: str, count: int) -> list[str]:
    """``count`` devices for the ranks of one machine: cuda:0 ... cuda:count-1 where there is CUDA (and
    ``device`` asks for it), else ``count`` times cpu."""
    return [rank_device(device, rank, count) for rank in range(count)]


def torchrun_devices(device: str) -> Optional[list[str]]:
    """For a command that starts its own ranks (`modiff reproduce`, through `launch`) run under torchrun
    with N ranks on one machine: on rank 0 the N local devices (`local_devices`), with torchrun's variables
    removed from this process's environment so that the processes it starts (notebook kernels) do not take
    themselves for ranks of this job; ``[]`` on the other ranks, which leave the work to rank 0; None
    outside torchrun or with one rank."""
    found = torchrun_world()
    if found is None or found[2] == 1:
        return None
    rank, _, size, local_size = found
    if size != local_size:
        raise ValueError(f"this command runs on one machine: torchrun gave {size} ranks of which {local_size} are "
                         f"here; use --nnodes 1 (or --set devices=cuda:0,cuda:1,... without torchrun)")
    if rank != 0:
        return []
    devices = local_devices(device, size)
    kept = without_torchrun_environment()
    os.environ.clear()
    os.environ.update(kept)
    return devices


def without_torchrun_environment() -> dict[str, str]:
    """A copy of the environment without torchrun's variables, for child processes that must not take
    themselves for ranks of the parent's job (notebook kernels, for instance)."""
    return {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(index: int, fn: Callable[..., None], devices: list[str], port: int, threads: int, errors: Any,
               args: tuple[Any, ...]) -> None:
    """The body of one launched process: join the group as rank ``index`` and run ``fn(device, *args)``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE=str(len(devices)), LOCAL_WORLD_SIZE=str(len(devices)))
    device = resolve_device(devices[index])
    if device.type == "cpu":
        torch.set_num_threads(threads)  # CPU ranks share the parent's cores
    _join(device)
    try:
        fn(devices[index], *args)
    except Exception as err:
        errors.put(portable_error(err))  # the parent raises it as it was raised here
        raise
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., None], devices: Sequence[str], *args: Any) -> None:
    """Run ``fn(device, *args)`` in one new process per entry of ``devices``, all joined in one
    torch.distributed group (rendezvous env:// on localhost; NCCL for GPUs, gloo for CPUs); returns when
    all have finished. ``fn`` and ``args`` must pickle. The first exception a rank raises is raised here
    (the other ranks are stopped); CPU ranks share the caller's threads."""
    import torch.multiprocessing as mp

    devices = list(devices)
    if not devices:
        raise ValueError("launch needs at least one device, e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu']")
    kinds = {resolve_device(d).type for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"devices {devices} mix CPU and GPU; one process group uses one backend: give only GPUs "
                         f"or only cpu entries")
    errors = mp.get_context("spawn").SimpleQueue()
    threads = max(1, torch.get_num_threads() // len(devices))
    context = mp.start_processes(_rank_main, args=(fn, devices, _free_port(), threads, errors, args),
                                 nprocs=len(devices), join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as failure:
        if not errors.empty():
            raise errors.get() from failure
        raise
