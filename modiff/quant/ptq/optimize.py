"""The optimisation loop shared by AdaRound and learned step sizes: minibatches from cached tensors.

Each iteration draws ``batch_size`` rows (without replacement, as the published ``randperm[:B]``) of
tensors cached on the device, and runs ``step(batch)`` (forward, loss, backward, optimiser step). The
row indices for all iterations are drawn on the device up front, so the loop never waits on the device:
losses are summed on the device and read every ``log_every`` iterations.

On CUDA the step can be captured once as a CUDA graph and replayed: a block's step is a few hundred
small kernels at batch 32, so launching them costs more than running them, and replaying removes the
launch cost. The step must then be capture-safe (no host reads, fixed shapes); its inputs are copied
into static tensors before every replay. The first ``EAGER_WARMUP`` iterations run eagerly on a side
stream (cuDNN autotuning, optimiser state), as the PyTorch CUDA-graph recipe asks.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["LoopConfig", "run_loop", "draw_rows", "make_adam", "cosine_lr"]

log = logging.getLogger(__name__)

EAGER_WARMUP = 3
Step = Callable[[Sequence[Tensor]], Tensor]
Schedule = Callable[[int], None]


@dataclass(frozen=True)
class LoopConfig:
    iters: int
    batch_size: int
    seed: int = 0
    log_every: int = 1000
    cuda_graphs: bool = True
    autocast: bool = False


def make_adam(params: Sequence[Tensor], lr: float, device: torch.device,
              config: LoopConfig) -> tuple[torch.optim.Adam, Callable[[float], None]]:
    """Adam over ``params`` and a function that sets its learning rate between iterations.

    Under CUDA graphs Adam must be ``capturable`` and its learning rate a device tensor that the graph
    reads (a Python float would be frozen into the capture).
    """
    if config.cuda_graphs and device.type == "cuda":
        lr_tensor = torch.tensor(float(lr), device=device)
        optimizer = torch.optim.Adam(params, lr=lr_tensor, capturable=True)
        return optimizer, lambda value: lr_tensor.fill_(value)
    optimizer = torch.optim.Adam(params, lr=lr)

    def set_lr(value: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = value

    return optimizer, set_lr


def cosine_lr(iteration: int, iters: int, lr: float) -> float:
    """Cosine annealing from ``lr`` at iteration 0 to 0 at ``iters`` (CosineAnnealingLR, eta_min = 0)."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * iteration / iters))


def draw_rows(n: int, iters: int, batch_size: int, device: torch.device, seed: int, chunk: int = 256) -> Tensor:
    """(iters, min(batch_size, n)) row indices: each row a random draw without replacement from range(n)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    take = min(batch_size, n)
    parts = []
    for start in range(0, iters, chunk):
        rows = min(chunk, iters - start)
        keys = torch.rand(rows, n, generator=gen, device=device)
        parts.append(keys.topk(take, dim=1).indices)  # a uniformly random subset, in random order
    return torch.cat(parts)


class _Replayer:
    """Runs the step eagerly, or (CUDA) eagerly a few times and then as a captured graph."""

    def __init__(self, step: Callable[[], Tensor], use_graph: bool):
        self.step, self.use_graph = step, use_graph
        self.calls, self.graph = 0, None
        self.loss: Optional[Tensor] = None

    def __call__(self) -> Tensor:
        self.calls += 1
        if not self.use_graph:
            return self.step()
        if self.calls <= EAGER_WARMUP:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.step()
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss = self.step()
        self.graph.replay()
        assert self.loss is not None
        return self.loss


def run_loop(step: Step, cached: Sequence[Tensor], config: LoopConfig, schedule: Optional[Schedule] = None,
             params: Sequence[Tensor] = (), desc: str = "") -> list[float]:
    """Run ``config.iters`` iterations of ``step(batch)``; returns the mean loss of every logging window.

    ``cached``: tensors with the same first dim N (stored compactly); the batch given to ``step`` holds
    their rows as float32. ``schedule(i)`` updates device scalars (beta, lr) before iteration i, outside
    the graph. ``params`` are zeroed-grad before every iteration.
    """
    device = cached[0].device
    rows = draw_rows(cached[0].shape[0], config.iters, config.batch_size, device, config.seed)
    index = rows[0].clone()  # static: the graph reads the batch through it
    loss_sum = torch.zeros((), device=device)
    use_graph = config.cuda_graphs and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast, cache_enabled=False)

    def one_step() -> Tensor:
        for p in params:
            p.grad = None
        batch = [c.index_select(0, index).float() for c in cached]
        with autocast:
            loss = step(batch)
        loss_sum.add_(loss.detach())
        return loss

    replay = _Replayer(one_step, use_graph)
    history: list[float] = []
    # Streams and graph capture belong to the *current* CUDA device: on any other (cuda:1 while the
    # current device is 0) the capture would be empty and every replay a silent no-op.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        for i in range(config.iters):
            index.copy_(rows[i])
            if schedule is not None:
                schedule(i)
            replay()
            if (i + 1) % config.log_every == 0 or i + 1 == config.iters:
                window = (i % config.log_every) + 1
                history.append(float(loss_sum) / window)  # one host read per window
                loss_sum.zero_()
                log.debug("%s iteration %d: loss %.5g", desc, i + 1, history[-1])
    return history
