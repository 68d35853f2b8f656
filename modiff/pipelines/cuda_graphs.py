"""CUDA graphs for sampling: each kind of network call recorded once, then replayed as one launch per step.

At small batches a sampling step is bound by the host: the CIFAR-10 UNet launches hundreds of kernels per
call, and MoDiff's modulated layers add their own. `CUDAGraphed(net)` runs the first call of each kind
plainly (compilation, autotuning, lazy initialisation), records the second into a CUDA graph and replays
that graph from then on, copying the arguments into the graph's own input tensors.

A graph reads every tensor at the address it had at capture. Parameters, buffers and static activation
qparams stay put (they move with `.to()`, never inside a call; replacing one, for instance with
`set_weight_codes`, needs a new wrapper); the MoDiff state is allocated at warm-up
and updated in place after it (`modiff.quant.layers.modulated.ModulatedLayer`). The key of a graph therefore holds
the arguments' shapes, strides and dtypes, the autocast setting, and every modulated layer's phase and state
addresses. These calls always run plainly: warm-up calls (they allocate the state), calls with gradients,
calls of non-CUDA tensors, and calls while any module of the network has hooks (a recorder's hooks must
see every call).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional

import torch
from torch import Tensor, nn

from modiff.pipelines.net_wrapper import NetWrapper
from modiff.quant.layers.trajectory import replay_signature, stateful_layers

__all__ = ["CUDAGraphed"]


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor


class CUDAGraphed(NetWrapper):
    """`net(*tensors) -> tensor` replayed through CUDA graphs; see the module docstring for when.

    max_graphs: graphs kept, least recently used dropped first (a new trajectory whose state lands at new
    addresses records new ones). The graphs share one memory pool: they never run concurrently and each
    output is copied out right after its replay, before another graph can reuse its memory.
    """

    def __init__(self, net: nn.Module, max_graphs: int = 8):
        super().__init__()
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.net = net
        self.max_graphs = max_graphs
        self._layers = stateful_layers(net)
        self._hookable = tuple(net.modules())  # walked at every call for hooks: a tuple, not named_modules
        self._graphs: OrderedDict[Hashable, _Recorded] = OrderedDict()
        self._seen: set[Hashable] = set()
        self._pool: Optional[Any] = None

    @property
    def graphs(self) -> int:
        """Graphs recorded and kept."""
        return len(self._graphs)

    def _has_hooks(self) -> bool:
        hooks = nn.modules.module
        if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._hookable)

    def _key(self, args: tuple[Any, ...]) -> Optional[Hashable]:
        """What a recorded call depends on besides parameters; None when the call must run plainly."""
        if not args or not all(isinstance(a, Tensor) and a.is_cuda for a in args) or torch.is_grad_enabled():
            return None
        state = replay_signature(self._layers)
        if state is None or self._has_hooks():
            return None
        tensors = tuple((a.shape, a.stride(), a.dtype, a.device) for a in args)
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        return tensors, autocast, state

    def _record(self, key: Hashable, args: tuple[Tensor, ...]) -> _Recorded:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._seen.discard(key)
        inputs = tuple(a.clone() for a in args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.net(*inputs)
        if not isinstance(output, Tensor):
            raise TypeError(f"CUDAGraphed needs a network that returns one tensor, got {type(output).__name__}")
        self._graphs[key] = recorded = _Recorded(graph, inputs, output)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return recorded

    def forward(self, *args: Tensor) -> Tensor:
        key = self._key(args)
        if key is None:
            return self.net(*args)
        recorded = self._graphs.get(key)
        if recorded is None:
            if key not in self._seen:
                self._seen.add(key)
                return self.net(*args)
            recorded = self._record(key, args)
        self._graphs.move_to_end(key)
        for static, arg in zip(recorded.inputs, args):
            static.copy_(arg)
        recorded.graph.replay()
        return recorded.output.clone()
