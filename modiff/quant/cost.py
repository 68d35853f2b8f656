"""Compute and memory accounting: MACs measured by hooks on a real forward, BOPs, MoDiff state bytes, and the
bytes of the counted layers' weights at their bit width (the codes alone: the per-channel scales, zero points and
biases are another C_out values per layer).

BOPs of a layer for one step = MACs x weight bits x activation bits (the paper's GBops convention,
per image). Full-precision operands count as 32 bits: warm-up steps of a modulated layer use 32-bit
activations, and steps a cached layer skips cost 0. Attention matmuls (q k^T and attn v) are reported
separately; MoDiff's extra additions (a_hat, o_hat updates) are not counted, as in the paper.

The paper's GBops for the CIFAR-10 UNet imply 6.39 GMAC per image per step (1636 GBops at W8A32 = 6.39 G
x 8 x 32), against 6.054 G measured in its 113 Conv/Linear layers. The difference is twice the attention
matmuls (2 x 0.168 G: 6.054 + 0.336 = 6.390, which gives 1635.8 at W8A32 and 153.4 at W8A3, the
paper's 1636 and 153): the paper counts the attention products, apparently as two operations per
multiply-add. `compute_report` gives both conventions.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from modiff.quant.api import attention_cores, select_layers
from modiff.quant.config import QuantConfig
from modiff.quant.layers.direct import QuantAttentionCore, QuantLayer
from modiff.quant.layers.trajectory import stateful_layers, trajectory
from modiff.utils.hooks import ModelHook, attach
from modiff.utils.selection import network_modules

__all__ = ["LayerCost", "measure_macs", "bops_table", "modiff_state_bytes", "compute_report", "preset_report"]

FP_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    macs: int  # per image, one forward
    input_numel: int  # per image
    output_numel: int  # per image


def _layer_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    per_output = module.weight[0].numel()  # in_channels / groups * kernel elements, or in_features
    return out[0].numel() * per_output


class _LayerMacs(ModelHook):
    def __init__(self, name: str, costs: list[LayerCost]):
        self.name, self.costs = name, costs

    def post_forward(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        kind = getattr(module, "kind", type(module).__name__)
        self.costs.append(LayerCost(self.name, kind, _layer_macs(module, args[0], out), args[0][0].numel(), out[0].numel()))


class _AttentionMacs(ModelHook):
    def __init__(self) -> None:
        self.macs = 0

    def post_forward(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        q = args[0]
        tokens, channels = q.shape[2] * q.shape[3], q.shape[1]
        self.macs += 2 * tokens * tokens * channels * q.shape[0]  # q k^T and attn v; dim 0 is heads (batch 1)

    def reset_state(self) -> None:
        self.macs = 0


@torch.no_grad()
def measure_macs(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> tuple[list[LayerCost], int]:
    """Per-layer MACs (per image) of every Conv/Linear (plain or quantized) on one real forward,
    and the MACs of the attention matmuls (the cores the model declares, `attention_cores`, or what its
    `count_attention_macs()` context counts). `x` may hold one image."""
    costs: list[LayerCost] = []
    attention = _AttentionMacs()
    cores = set(attention_cores(model))
    hooks: list[tuple[nn.Module, ModelHook]] = []
    for name, module in network_modules(model):  # a latent model's first stage is not counted
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, QuantLayer)):
            hooks.append((module, _LayerMacs(name, costs)))
        elif name in cores or isinstance(module, QuantAttentionCore):
            hooks.append((module, attention))
    active = any(layer.state.phase != "inactive" for layer in stateful_layers(model))
    # Models whose attention matmuls are no modules (diffusers: inside processors) count them themselves.
    count_own = getattr(model, "count_attention_macs", None)
    own = count_own() if callable(count_own) else contextlib.nullcontext()
    with attach("modiff.cost", hooks), (contextlib.nullcontext() if active else trajectory(model)), own as counted:
        model(x[:1], t[:1])
    return costs, attention.macs + (counted.macs if counted is not None else 0)


ConfigOf = Callable[[str], Optional[QuantConfig]]  # a counted layer's name -> the quantization it computes with


def _configs_of(model: nn.Module) -> ConfigOf:
    """The configs of a quantized model's layers (None for a full-precision one)."""
    return lambda name: getattr(model.get_submodule(name), "config", None)


def _bits(config: Optional[QuantConfig]) -> tuple[int, int]:
    if config is None:
        return FP_BITS, FP_BITS
    w = FP_BITS if config.weight is None else config.weight.spec.bits
    a = FP_BITS if config.activation is None else config.activation.spec.bits
    return w, a


def _rows(model: nn.Module, costs: list[LayerCost], steps: int, config_of: ConfigOf) -> list[dict[str, object]]:
    rows = []
    for cost in costs:
        config = config_of(cost.name)
        w_bits, a_bits = _bits(config)
        warmup = min(config.warmup_steps, steps) if config is not None and config.stateful else 0
        quantized_steps = steps - warmup
        if config is not None and config.mode == "cache":
            refresh = sum(1 for k in range(warmup, steps) if k % config.cache_interval == 0)
            per_trajectory = cost.macs * w_bits * (FP_BITS * warmup + a_bits * refresh)
        else:
            per_trajectory = cost.macs * w_bits * (FP_BITS * warmup + a_bits * quantized_steps)
        rows.append({"layer": cost.name, "kind": cost.kind, "macs": cost.macs,
                     "weights": model.get_submodule(cost.name).weight.numel(), "weight_bits": w_bits,
                     "act_bits": a_bits, "bops_per_step": cost.macs * w_bits * a_bits,
                     "bops_per_trajectory": per_trajectory})
    return rows


def bops_table(model: nn.Module, costs: list[LayerCost], steps: int) -> list[dict[str, object]]:
    """Per layer: MACs, bits, BOPs per step (steady state) and over a trajectory of `steps` steps."""
    return _rows(model, costs, steps, _configs_of(model))


def _state_bytes(costs: list[LayerCost], config_of: ConfigOf, bytes_per_value: int) -> int:
    stateful = (config_of(cost.name) for cost in costs)
    return sum((cost.input_numel + cost.output_numel) * bytes_per_value
               for cost, config in zip(costs, stateful) if config is not None and config.stateful)


def modiff_state_bytes(model: nn.Module, costs: list[LayerCost], bytes_per_value: int = 4) -> int:
    """Bytes of MoDiff state per sample: a_hat (input-shaped) and o_hat (output-shaped) per stateful layer."""
    return _state_bytes(costs, _configs_of(model), bytes_per_value)


def _costs(model: nn.Module) -> tuple[list[LayerCost], int]:
    device = next(model.parameters()).device
    x = torch.zeros(1, *model.sample_shape, device=device)
    return measure_macs(model, x, torch.full((1,), 500, device=device, dtype=torch.long))


# The full-precision model's costs, measured once per model object: a table of many presets counts them each time.
_FP_COSTS: "weakref.WeakKeyDictionary[nn.Module, tuple[list[LayerCost], int]]" = weakref.WeakKeyDictionary()


def _fp_costs(model: nn.Module) -> tuple[list[LayerCost], int]:
    if model not in _FP_COSTS:
        _FP_COSTS[model] = _costs(model)
    return _FP_COSTS[model]


def compute_report(model: nn.Module, steps: int) -> dict[str, object]:
    """Totals per image: MACs, GMACs of attention, GBops per step and per trajectory, state bytes; and the MB of
    the counted layers' weights, at their bit width and in fp32."""
    return _report(model, *_costs(model), steps, _configs_of(model))


def preset_report(model: nn.Module, config: QuantConfig, steps: int) -> dict[str, object]:
    """`compute_report` of ``quantize(model, config)``, counted on the full-precision ``model`` without quantizing
    it: the layers `config` selects compute with it, the others in full precision, and BOPs depend only on the
    layers and their bit widths. So a static (Q-Diffusion) preset is counted without being calibrated, and a
    report needs no saved calibration (nor AdaRound codes)."""
    selected = set(select_layers(model, config))
    if not selected:
        raise ValueError(f"no layer matched layer_types={config.layer_types}, include={config.include}, "
                         f"exclude={config.exclude}")
    return _report(model, *_fp_costs(model), steps, lambda name: config if name in selected else None)


def _report(model: nn.Module, costs: list[LayerCost], attention_macs: int, steps: int,
            config_of: ConfigOf) -> dict[str, object]:
    rows = _rows(model, costs, steps, config_of)
    return {
        "layers_counted": len(rows),
        "gmacs_conv_linear": sum(r["macs"] for r in rows) / 1e9,
        "gmacs_attention_matmuls": attention_macs / 1e9,
        "gmacs_paper_convention": (sum(r["macs"] for r in rows) + 2 * attention_macs) / 1e9,
        "gbops_per_step": sum(r["bops_per_step"] for r in rows) / 1e9,
        "gbops_per_trajectory": sum(r["bops_per_trajectory"] for r in rows) / 1e9,
        "steps": steps,
        "modiff_state_mb_per_image": _state_bytes(costs, config_of, 4) / 1e6,
        "weight_mb": sum(r["weights"] * r["weight_bits"] for r in rows) / 8 / 1e6,
        "weight_mb_fp32": sum(r["weights"] for r in rows) * FP_BITS / 8 / 1e6,
        "layers": rows,
    }
