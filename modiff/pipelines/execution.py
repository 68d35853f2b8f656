"""How a network runs on its device: the fast path on CUDA, resolved in one place.

`resolve_execution(device, precision, compile, cuda_graphs)` turns what the user asked for ("auto" or
None: nothing) into an `ExecutionConfig`; `prepare_network` applies it to a model:

=================  ===============================  ====================
                   CUDA: the fast path              CPU
=================  ===============================  ====================
precision          bf16 autocast                    fp32
channels_last      yes (and cudnn.benchmark)        no
torch.compile      yes (`CompiledNet`)              no
CUDA graphs        yes (`CUDAGraphed`)              no (refused if asked)
=================  ===============================  ====================

What the user gives wins: precision ``fp32`` (IEEE float32, TF32 off) or ``tf32``, ``compile=False``,
``cuda_graphs=False``. The precision is part of a run's sample config and torch.compile of its execution
identity (inductor fuses and reorders float operations: the images change); CUDA graphs replay the kernels
they recorded and change no number, so run manifests record them without making them part of the identity
(`modiff.pipelines.run_folder`). channels_last and cudnn.benchmark come with the device kind, which is part
of the identity. A compiled network sees every batch of a run at the run's batch size (`PaddedBatch`), so
the last, smaller batch reuses the graphs instead of compiling its own.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Literal, Optional, get_args

import torch
from torch import nn

from modiff.pipelines.cuda_graphs import CUDAGraphed
from modiff.pipelines.net_wrapper import NetWrapper
from modiff.quant.layers.trajectory import stateful_layers

__all__ = ["Precision", "PrecisionChoice", "ExecutionConfig", "resolve_precision", "resolve_execution",
           "CompiledNet", "PaddedBatch", "prepare_network", "prepared_network", "float32_precision", "precision_context",
           "precision_record", "RECOMPILE_LIMIT"]

Precision = Literal["fp32", "tf32", "bf16"]
PrecisionChoice = Literal["auto", "fp32", "tf32", "bf16"]  # auto: bf16 on CUDA, fp32 on the CPU

# Graphs one architecture may compile in a process: one per structure (direct, modulated, cache skip, split
# shortcut, static or dynamic scales, autocast on or off), never one per preset or step. Dynamo's default
# (8 per function) is below what the Table 1 presets need, and past it dynamo silently runs eagerly.
RECOMPILE_LIMIT = 64


def _check_precision(precision: str, allowed: Any) -> None:
    if precision not in get_args(allowed):
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(get_args(allowed))}")


@dataclass(frozen=True)
class ExecutionConfig:
    """The resolved settings (see the module docstring); `resolve_execution` makes them from a device."""

    precision: Precision = "fp32"
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _check_precision(self.precision, Precision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` -> bf16 on CUDA, fp32 on the CPU; any other allowed value as given."""
    _check_precision(precision, PrecisionChoice)
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision  # type: ignore[return-value]


def resolve_execution(device: torch.device, precision: str = "auto", compile: Optional[bool] = None,
                      cuda_graphs: Optional[bool] = None, keyword_net: bool = False) -> ExecutionConfig:
    """The fast path on CUDA, eager fp32 on the CPU; an explicit ``precision``, ``compile`` or
    ``cuda_graphs`` wins. CUDA graphs asked for on a device without CUDA are refused (ValueError), and so
    are they for a ``keyword_net`` (a network called with keyword arguments, `Denoiser.net_takes_keywords`:
    `CUDAGraphed` replays tensors given by position), whose default is without them."""
    cuda = device.type == "cuda"
    if cuda_graphs and not cuda:
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}; leave CUDA graphs off (--no-cuda-graphs)")
    if cuda_graphs and keyword_net:
        raise ValueError("CUDA graphs replay networks called with tensors alone; this network (a diffusers one) takes "
                         "keywords: leave CUDA graphs off (--no-cuda-graphs)")
    return ExecutionConfig(precision=resolve_precision(precision, device),
                           compile=cuda if compile is None else bool(compile),
                           cuda_graphs=cuda and not keyword_net if cuda_graphs is None else bool(cuda_graphs))


class CompiledNet(NetWrapper):
    """`net` through torch.compile, one cache for every quantization preset of an architecture.

    Dynamo keeps compiled graphs on the code of `net.forward`, shared by every instance and guarded by what
    the trace read. The quantized layers hold bit widths and scales as tensors (`modiff.quant.layers`), so
    presets that differ only in numbers reuse a graph; what compiles anew is a structure (a mode, a scheme
    or granularity, a split shortcut, static scales) or a phase (refresh, cache skip), once per process.
    Calls in any other phase run `net` eagerly: warm-up calls allocate the MoDiff state and come once per
    trajectory (compiling them would add a graph per structure for one step in a hundred), and calls
    outside trajectory() raise the layers' own error. The recompile limit is raised to `RECOMPILE_LIMIT`
    during calls, so that running many presets never falls back to eager silently.
    """

    _inner = "compiled"  # `net` is read from it

    def __init__(self, net: nn.Module, backend: str | Callable[..., Any] = "inductor", mode: Optional[str] = None,
                 options: Optional[dict[str, Any]] = None):
        super().__init__()
        self.compiled = torch.compile(net, backend=backend, mode=mode, options=options, dynamic=False)
        self._layers = stateful_layers(net)

    @property
    def net(self) -> nn.Module:
        return self.compiled._orig_mod

    def _compiles(self) -> bool:
        return all(layer.state.phase in ("refresh", "skip") for layer in self._layers)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._compiles():
            return self.net(*args, **kwargs)
        with torch._dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return self.compiled(*args, **kwargs)


class PaddedBatch(NetWrapper):
    """`net(x, t, ...)` on exactly ``batch_size`` rows: a smaller batch (a run's last) is filled up with repeats
    of its last row and the output cut back, so that one compiled graph (and one set of CUDA graphs) serves
    every batch of a run, instead of a compilation (tens of seconds) for the last one.

    The rows come out as the network computes them in a batch of ``batch_size``: the networks work per
    sample (convolutions, GroupNorm, attention, per-sample quantizers), and a quantizer with one range per
    run of consecutive samples (the published per-tensor numerics, `QuantSpec.samples_per_scale`) sees the
    same minimum and maximum for every real row, since the repeats of the last row join the last row's run
    and add no value to it. The MoDiff state then holds the filled batch, for the whole trajectory. A call
    with keywords (a diffusers network: conditioning in keywords, a tuple out) passes through unpadded.
    """

    def __init__(self, net: nn.Module, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net, self.batch_size = net, batch_size
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _filled(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._rows:
            self._rows[key] = torch.arange(self.batch_size, device=device).clamp(max=n - 1)
        return self._rows[key]

    def forward(self, x: torch.Tensor, *args: torch.Tensor, **kwargs: Any) -> Any:
        n = x.shape[0]
        if n >= self.batch_size or kwargs:  # a keyword call (diffusers: conditioning, tuple out) is not padded
            return self.net(x, *args, **kwargs)
        rows = self._filled(n, x.device)
        return self.net(x[rows], *(a[rows] for a in args))[:n]


def prepare_network(model: nn.Module, device: torch.device, execution: ExecutionConfig,
                    batch_size: Optional[int] = None) -> nn.Module:
    """``model`` on ``device`` in eval mode, its ``net`` wrapped as ``execution`` says: channels_last and
    cudnn.benchmark on CUDA, then `CompiledNet`, then `CUDAGraphed` (graphs of the compiled network), and
    for a compiled network with a ``batch_size``, `PaddedBatch` around them. The model itself is changed;
    `prepared_network` gives its network back afterwards."""
    if execution.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}")
    model = model.to(device).eval()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    if execution.compile:
        model.net = CompiledNet(model.net)
    if execution.cuda_graphs:
        model.net = CUDAGraphed(model.net)
    if execution.compile and batch_size is not None:
        model.net = PaddedBatch(model.net, batch_size)
    return model


@contextlib.contextmanager
def prepared_network(model: nn.Module, device: torch.device, execution: ExecutionConfig,
                     batch_size: Optional[int] = None) -> Iterator[nn.Module]:
    """`prepare_network` for the block; on exit ``model.net`` is the caller's network again (on ``device``),
    so that a later quantize() or prepare starts from the plain network, never from a wrapper (and the CUDA
    graphs' memory is released)."""
    net = model.net
    try:
        yield prepare_network(model, device, execution, batch_size)
    finally:
        model.net = net


def _tf32_switches() -> dict[str, tuple[Any, str]]:
    """name -> (object, attribute) of every CUDA TF32 switch: the ``fp32_precision`` settings of torch >= 2.9
    ("ieee" / "tf32" / "none"), else the legacy ``allow_tf32`` flags (torch refuses a mix of the two APIs)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {"cuda.matmul.fp32_precision": (torch.backends.cuda.matmul, "fp32_precision"),
                "cudnn.conv.fp32_precision": (torch.backends.cudnn.conv, "fp32_precision"),
                "cudnn.rnn.fp32_precision": (torch.backends.cudnn.rnn, "fp32_precision")}
    return {"cuda.matmul.allow_tf32": (torch.backends.cuda.matmul, "allow_tf32"),
            "cudnn.allow_tf32": (torch.backends.cudnn, "allow_tf32")}


def _tf32_value(attribute: str, allow: bool) -> Any:
    return allow if attribute == "allow_tf32" else ("tf32" if allow else "ieee")


@contextlib.contextmanager
def float32_precision(precision: Precision) -> Iterator[None]:
    """CUDA float32 matmuls and cuDNN convolutions in TF32 only for ``precision == "tf32"``; IEEE float32
    otherwise (fp32, and the float32 parts of bf16 autocast). The previous settings are restored on exit."""
    _check_precision(precision, Precision)
    switches = list(_tf32_switches().values())
    before = [getattr(obj, name) for obj, name in switches]
    try:
        for obj, name in switches:
            setattr(obj, name, _tf32_value(name, precision == "tf32"))
        yield
    finally:
        for (obj, name), value in zip(switches, before):
            setattr(obj, name, value)


@contextlib.contextmanager
def precision_context(precision: Precision, device: torch.device) -> Iterator[None]:
    """The arithmetic of ``precision`` for code run inside: TF32 switches, and bf16 autocast for bf16."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with float32_precision(precision), autocast:
        yield


def precision_record(precision: Precision, device: torch.device) -> dict[str, Any]:
    """What a manifest records about the arithmetic of a run: the precision asked for, the TF32 switches as
    `float32_precision` sets them (read back from torch) and the autocast dtype; ``label`` for tables."""
    with float32_precision(precision):
        switches = {key: getattr(obj, name) for key, (obj, name) in _tf32_switches().items()}
    tf32 = device.type == "cuda" and any(v in (True, "tf32") for v in switches.values())
    label = {"bf16": "bf16 autocast", "tf32": "tf32", "fp32": "fp32"}[precision]
    if device.type == "cuda" and precision != "tf32":
        label += " (TF32 off)"
    return {"precision": precision, "label": label, "device_type": device.type, "tf32": tf32,
            "autocast": "bfloat16" if precision == "bf16" else None, "switches": switches}
