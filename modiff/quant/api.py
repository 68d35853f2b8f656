"""`quantize(model, config)`: a quantized copy; the full-precision model is left untouched.

The layer class of a mode and backend comes from a small registry (`register_layer`, `layer_class`), as torchao's
`quantize_(model, config)` dispatches on its config: `direct` and `fp` wrap a layer in `QuantLayer`,
`modulated` and `cache` in `ModulatedLayer` (state across steps, `trajectory()`); with ``backend="real"``,
`direct` and `modulated` in `RealQuantLayer` and `RealModulatedLayer` (W8A8 kernels on CUDA, the simulator
elsewhere; `modiff.quant.layers.real`). Layers are selected
by type and name patterns (`modiff.utils.selection.select_modules`). What a model knows about itself it
declares: `concat_splits()` (layers whose input is a concatenated skip) and `attention_cores()` (the
parameter-free attention matmuls that `quantize_attention` wraps).
"""
from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from torch import nn

from modiff.quant.config import Backend, Mode, QuantConfig, WeightCodes
from modiff.quant.layers.direct import QuantAttentionCore, QuantLayer
from modiff.quant.layers.modulated import ModulatedLayer
from modiff.quant.layers.real import RealModulatedLayer, RealQuantLayer
from modiff.utils.selection import network_modules, select_modules

__all__ = ["attention_cores", "layer_class", "quantize", "register_layer", "register_weight_codes", "select_layers",
           "quant_layers", "network_modules"]

log = logging.getLogger(__name__)

L = TypeVar("L", bound=type[QuantLayer])
_LAYERS: dict[tuple[str, str], type[QuantLayer]] = {}


def register_layer(*modes: Mode, backend: Backend = "simulated") -> Callable[[L], L]:
    """Make a QuantLayer subclass the layer of `modes` on `backend` (a class decorator; a mode has one class
    per backend)."""
    def register(cls: L) -> L:
        for mode in modes:
            key = (mode, backend)
            if key in _LAYERS and _LAYERS[key] is not cls:
                raise ValueError(f"mode {mode!r} on backend {backend!r} already has the layer class "
                                 f"{_LAYERS[key].__name__}")
            _LAYERS[key] = cls
        return cls
    return register


register_layer("fp", "direct")(QuantLayer)
register_layer("modulated", "cache")(ModulatedLayer)
register_layer("direct", backend="real")(RealQuantLayer)
register_layer("modulated", backend="real")(RealModulatedLayer)


# qmodel (weights rounded to nearest), fp model, config, folder or None -> qmodel with the codes of `config`
WeightSource = Callable[[nn.Module, nn.Module, QuantConfig, Optional[Path]], nn.Module]
_WEIGHT_CODES: dict[str, WeightSource] = {}


def register_weight_codes(codes: WeightCodes) -> Callable[[WeightSource], WeightSource]:
    """Make a function the source of weight codes `codes` other than "nearest" ("adaround": registered by
    `modiff.quant.ptq.shipped`, which reads saved calibrations; `modiff.quant` imports it)."""
    def register(source: WeightSource) -> WeightSource:
        _WEIGHT_CODES[codes] = source
        return source
    return register


def layer_class(config: QuantConfig) -> type[QuantLayer]:
    """The layer class that computes in `config.mode` on `config.backend`."""
    key = (config.mode, config.backend)
    if key not in _LAYERS:
        raise ValueError(f"no layer class for mode {config.mode!r} on backend {config.backend!r}; registered "
                         f"(mode, backend): {sorted(_LAYERS)}")
    return _LAYERS[key]


def select_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Qualified names of the layers `config` selects, by type and name patterns (fnmatch)."""
    return select_modules(model, config.layer_types, config.include, config.exclude)


def _declared(model: nn.Module, method: str) -> list[tuple[str, Any]]:
    """(qualified name, value) of what the modules of `model` declare through `method()` (a dict of
    local name -> value, or a list of local names)."""
    found: list[tuple[str, Any]] = []
    for prefix, module in model.named_modules():
        describe = getattr(module, method, None)
        if callable(describe):
            declared = describe()
            items = declared.items() if isinstance(declared, dict) else ((name, None) for name in declared)
            found.extend((f"{prefix}.{k}" if prefix else k, v) for k, v in items)
    return found


def attention_cores(model: nn.Module) -> list[str]:
    """Qualified names of the attention cores the model declares (`attention_cores()` of its networks)."""
    return [name for name, _ in _declared(model, "attention_cores")]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is, on that module's device (or its parent's, for a module without
    tensors): new quantizers make their grid buffers on the CPU, and a model on the GPU needs them there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    tensors = itertools.chain(model.get_submodule(name).parameters(), parent.parameters(), parent.buffers())
    first = next(tensors, None)
    setattr(parent, child, new if first is None else new.to(first.device))


def quantize(model: nn.Module, config: QuantConfig, *, weights: Optional[str | Path] = None) -> nn.Module:
    """Return a deep copy of `model` whose selected Conv/Linear layers are `QuantLayer`s.

    Weights are fake-quantized once here: rounded to nearest, or, when ``config.weight.codes`` is
    "adaround", with the AdaRound codes of ``weights`` (a folder saved by `modiff calibrate` with the same
    weight quantization) or, when None, of the model's shipped calibration (`modiff.quant.ptq.shipped`).
    Modulated and cached models must then be called inside `with modiff.trajectory(qmodel):`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (or modiff.presets[name]), got {type(config).__name__}")
    if weights is not None and not config.adaround:
        raise ValueError("weights= gives AdaRound codes, which only a config with weight codes 'adaround' "
                         "uses (e.g. modiff.presets['w4a4-adaround-modiff'])")
    if config.adaround:
        if "adaround" not in _WEIGHT_CODES:
            raise RuntimeError("no source of AdaRound weight codes is registered; import modiff.quant.ptq.shipped")
        rounded = quantize(model, config.with_weight_codes("nearest"))
        return _WEIGHT_CODES["adaround"](rounded, model, config, None if weights is None else Path(weights))
    qmodel = copy.deepcopy(model)
    names = select_layers(qmodel, config)
    if not names:
        raise ValueError(f"no layer matched layer_types={config.layer_types}, include={config.include}, "
                         f"exclude={config.exclude}")
    splits = dict(_declared(qmodel, "concat_splits")) if config.split_shortcut else {}
    cls = layer_class(config)
    for name in names:
        layer = qmodel.get_submodule(name)
        _replace(qmodel, name, cls(layer, config, name, splits.get(name)))
    if config.quantize_attention:
        network = {name for name, _ in network_modules(qmodel)}
        for name in attention_cores(qmodel):
            if name in network:  # a latent model's first stage stays in full precision
                _replace(qmodel, name, QuantAttentionCore(config.attention_bits))
    qmodel.quant_config = config
    log.info("quantized %d layers (%s, %s backend)", len(names), config.mode, config.backend)
    return qmodel


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}
