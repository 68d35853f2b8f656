"""`quantize(model, config)`: a quantized copy; the full-precision model is left untouched."""
from __future__ import annotations

import copy
import fnmatch
import logging
from pathlib import Path
from typing import Iterator, Optional

from torch import nn

from modiff.quant.config import QuantConfig
from modiff.quant.modules import ModulatedLayer, QuantAttentionCore, QuantLayer

__all__ = ["quantize", "select_layers", "quant_layers", "network_modules"]

log = logging.getLogger(__name__)


def network_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules quantization may touch: a Denoiser's network (`model.network_modules()`, which leaves
    a latent model's first stage out), or every module of any other model."""
    own = getattr(model, "network_modules", None)
    return own() if callable(own) else model.named_modules()


def select_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """Qualified names of the layers `config` selects, by type and name patterns (fnmatch)."""
    names = []
    for name, module in network_modules(model):
        if type(module).__name__ not in config.layer_types:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        names.append(name)
    return names


def _concat_splits(model: nn.Module) -> dict[str, int]:
    """Layer name -> channels of the first half of its concatenated skip input, where a model says."""
    splits: dict[str, int] = {}
    for prefix, module in model.named_modules():
        describe = getattr(module, "concat_splits", None)
        if callable(describe):
            splits.update({f"{prefix}.{k}" if prefix else k: v for k, v in describe().items()})
    return splits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, config: QuantConfig, *, weights: Optional[str | Path] = None) -> nn.Module:
    """Return a deep copy of `model` whose selected Conv/Linear layers are `QuantLayer`s.

    Weights are fake-quantized once here: rounded to nearest, or, when ``config.weight.codes`` is
    "adaround", with the AdaRound codes of ``weights`` (a folder saved by `modiff calibrate` with the same
    weight quantization) or, when None, of the model's shipped calibration (`modiff.quant.shipped`).
    Modulated and cached models must then be called inside `with modiff.trajectory(qmodel):`.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig (or modiff.presets[name]), got {type(config).__name__}")
    if weights is not None and not config.adaround:
        raise ValueError("weights= gives AdaRound codes, which only a config with weight codes 'adaround' "
                         "uses (e.g. modiff.presets['w4a4-adaround-modiff'])")
    if config.adaround:
        from modiff.quant.shipped import with_adaround_weights

        return with_adaround_weights(quantize(model, config.with_weight_codes("nearest")), model, config, weights)
    qmodel = copy.deepcopy(model)
    names = select_layers(qmodel, config)
    if not names:
        raise ValueError(f"no layer matched layer_types={config.layer_types}, include={config.include}, "
                         f"exclude={config.exclude}")
    splits = _concat_splits(qmodel) if config.split_shortcut else {}
    layer_class = ModulatedLayer if config.stateful else QuantLayer
    for name in names:
        layer = qmodel.get_submodule(name)
        _replace(qmodel, name, layer_class(layer, config, name, splits.get(name)))
    if config.quantize_attention:
        cores = [n for n, m in network_modules(qmodel) if type(m).__name__ == "AttentionCore"]
        for name in cores:
            _replace(qmodel, name, QuantAttentionCore(config.attention_bits))
    qmodel.quant_config = config
    log.info("quantized %d layers (%s)", len(names), config.mode)
    return qmodel


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {m.name: m for m in model.modules() if isinstance(m, QuantLayer)}
