"""Typed, frozen quantization configs.

A `QuantConfig` says which layers are quantized, how their weights and input activations are quantized,
and how the layer computes across sampling steps (`mode`):

- ``fp``: full precision (selected layers are wrapped but compute exactly);
- ``direct``: o_t = A_q(Q(a_t)) + b, the PTQ baseline;
- ``modulated``: MoDiff. With ``compensation`` (error feedback): r_t = a_t - a_hat_{t+1},
  a_hat_t = a_hat_{t+1} + Q(r_t), o_hat_t = o_hat_{t+1} + A_q(Q(r_t)). Without it ("standard modulation"):
  r_t = a_t - a_{t+1} and the rounding errors of all past residuals add up;
- ``cache``: modulated with Q = 0 ("0 bits") except every ``cache_interval``-th step, which refreshes
  (with the activation quantizer, or exactly if ``activation`` is None).

The first ``warmup_steps`` calls of a modulated/cached layer run on full-precision activations
(a_hat = a, o_hat = A_q(a) + b): the bias enters once, there.

``format``: the number format of weights and activations, ``int`` (the grids of `QuantSpec`) or
``fp8_e4m3`` (`modiff.quant.formats`). ``backend``: ``simulated`` computes with fake-quantized float
tensors; ``real`` runs W8A8 on tensor cores in that format (`modiff.quant.layers.real`, CUDA with Triton)
and falls back to the simulator, bit for bit, elsewhere. It supports one numerics only, refused otherwise
(`REAL_SUPPORT`). ``state_dtype``: the dtype of the MoDiff state (a_hat, and o_hat on the real backend);
``auto`` is the dtype the layer's operator consumes (bf16 under autocast).

`to_dict` leaves out ``format``, ``backend`` and ``state_dtype`` at their defaults: run identities and
calibration digests made before they existed stay valid. Read the backend of a recorded config with
`recorded_backend`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping, Optional, get_args

from modiff.quant.formats import NumberFormat, check_fp8_spec
from modiff.quant.observers import ObserverKind as Observer
from modiff.quant.primitives import QuantSpec, WeightMethod

__all__ = ["Mode", "ResetPolicy", "WeightMethod", "WeightCodes", "Observer", "WeightQuant", "ActQuant",
           "QuantConfig", "Backend", "StateDtype", "NumberFormat", "REAL_SUPPORT", "recorded_backend"]

Mode = Literal["fp", "direct", "modulated", "cache"]
WeightCodes = Literal["nearest", "adaround"]
ResetPolicy = Literal["per_trajectory", "per_step"]
LayerType = Literal["Conv1d", "Conv2d", "Linear"]
Backend = Literal["simulated", "real"]
StateDtype = Literal["auto", "float32", "bfloat16"]

# Fields added after configs were first recorded, with their defaults: left out of `to_dict` at these values.
_ADDED_DEFAULTS = {"format": "int", "backend": "simulated", "state_dtype": "auto"}
_ADDED_SPEC_DEFAULTS = {"samples_per_scale": 0}  # the same for QuantSpec fields

REAL_SUPPORT = ("backend 'real' supports: mode 'direct' or 'modulated' (with compensation), weights per output "
                "channel (granularity='channel', channel_axis=0, rounding='nearest') with bits=8 scheme='symmetric' "
                "codes='nearest', or, in format 'int' only, bits=4 of any scheme and codes, activations bits=8 "
                "scheme='symmetric' dynamic per sample (granularity='sample', rounding='nearest'), format 'int' "
                "(INT8) or 'fp8_e4m3', layer_types Conv2d and Linear, no split_shortcut, no quantize_attention "
                "(presets w8a8-int8[-modiff]-real, w8a8-fp8[-modiff]-real, w4a8-int8[-modiff]-real)")


def _check(value: object, literal: Any, name: str) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass(frozen=True)
class WeightQuant:
    """Weights: quantized once, per output channel by default (min-max or an MSE range search).

    ``codes``: "nearest" rounds every weight to the nearest point of its grid (a calibration may then
    learn other codes); "adaround" takes the integer codes and grids of an AdaRound calibration of this
    very model: `modiff.quantize` loads them from the model's shipped calibration (`modiff.quant.ptq.shipped`)
    or from the folder passed as ``weights=``.
    """

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, granularity="channel", channel_axis=0))
    method: WeightMethod = "minmax"
    codes: WeightCodes = "nearest"

    def __post_init__(self) -> None:
        _check(self.method, WeightMethod, "weight method")
        _check(self.codes, WeightCodes, "weight codes")
        if self.spec.bits == 0:
            raise ValueError("weights cannot have 0 bits; use activation bits 0 for caching")
        if self.spec.samples_per_scale:
            raise ValueError("samples_per_scale groups the samples of an activation batch; weights have none")


@dataclass(frozen=True)
class ActQuant:
    """Input activations: dynamic (qparams from the current tensor) or static (from calibration)."""

    spec: QuantSpec = field(default_factory=lambda: QuantSpec(bits=8, granularity="sample"))
    dynamic: bool = True
    observer: Observer = "minmax"

    def __post_init__(self) -> None:
        _check(self.observer, Observer, "observer")


@dataclass(frozen=True)
class QuantConfig:
    weight: Optional[WeightQuant] = field(default_factory=WeightQuant)
    activation: Optional[ActQuant] = field(default_factory=ActQuant)
    mode: Mode = "direct"
    compensation: bool = True
    warmup_steps: int = 1
    cache_interval: int = 0
    layer_types: tuple[LayerType, ...] = ("Conv1d", "Conv2d", "Linear")
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    quantize_attention: bool = False
    attention_bits: int = 8
    split_shortcut: bool = False
    reset: ResetPolicy = "per_trajectory"
    format: NumberFormat = "int"
    backend: Backend = "simulated"
    state_dtype: StateDtype = "auto"

    def __post_init__(self) -> None:
        _check(self.mode, Mode, "mode")
        _check(self.reset, ResetPolicy, "reset")
        _check(self.format, NumberFormat, "format")
        _check(self.backend, Backend, "backend")
        _check(self.state_dtype, StateDtype, "state_dtype")
        for t in self.layer_types:
            _check(t, LayerType, "layer type")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.mode in ("modulated", "cache") and self.warmup_steps < 1:
            raise ValueError("modulated and cache modes need warmup_steps >= 1: the first step sets a_hat and o_hat")
        if self.mode == "cache" and self.cache_interval < 1:
            raise ValueError(f"mode 'cache' needs cache_interval >= 1 (refresh every N steps), got {self.cache_interval}")
        if self.mode != "cache" and self.cache_interval:
            raise ValueError(f"cache_interval only applies to mode 'cache' (got mode {self.mode!r})")
        if self.activation is not None and self.activation.spec.bits == 0 and self.mode != "cache":
            raise ValueError(
                f"activation bits 0 (Q = 0) in mode {self.mode!r} would zero every layer's input; 0 bits means "
                f"reusing a cached output, which is mode 'cache' alone (cache_interval=N; the cacheN presets)")
        if self.quantize_attention and not 2 <= self.attention_bits <= 16:
            raise ValueError(f"attention_bits must be in [2, 16], got {self.attention_bits}")
        if self.format == "fp8_e4m3":
            self._check_fp8()
        if self.backend == "real":
            problems = self._real_problems()
            if problems:
                raise ValueError(f"{REAL_SUPPORT}; got {'; '.join(problems)}")

    def _check_fp8(self) -> None:
        if self.weight is not None:
            check_fp8_spec(self.weight.spec, "weights")
            if self.weight.method != "minmax" or self.weight.codes != "nearest":
                raise ValueError("format 'fp8_e4m3' takes min-max weight scales rounded to nearest (method='minmax', "
                                 f"codes='nearest'); got method={self.weight.method!r}, codes={self.weight.codes!r}")
        if self.activation is not None:
            check_fp8_spec(self.activation.spec, "activations")
            if not self.activation.dynamic:
                raise ValueError("format 'fp8_e4m3' takes dynamic activation scales (ActQuant(dynamic=True))")

    def _real_problems(self) -> list[str]:
        """What in this config no kernel of the real backend computes (empty: supported)."""
        problems = []
        if self.mode not in ("direct", "modulated"):
            problems.append(f"mode={self.mode!r}")
        if not self.compensation:
            problems.append("compensation=False")
        w, a = self.weight, self.activation
        if w is None:
            problems.append("weight=None")
        elif (w.spec.granularity, w.spec.channel_axis, w.spec.rounding) != ("channel", 0, "nearest") or not (
                (w.spec.bits, w.spec.scheme, w.codes) == (8, "symmetric", "nearest")
                or (w.spec.bits == 4 and self.format == "int")):
            problems.append(f"weight={w}")
        if a is None:
            problems.append("activation=None")
        elif (a.spec.bits, a.spec.scheme, a.spec.granularity, a.spec.rounding, a.dynamic) != \
                (8, "symmetric", "sample", "nearest", True):
            problems.append(f"activation={a}")
        if "Conv1d" in self.layer_types:
            problems.append("layer_types with Conv1d")
        if self.split_shortcut:
            problems.append("split_shortcut=True")
        if self.quantize_attention:
            problems.append("quantize_attention=True")
        return problems

    @property
    def adaround(self) -> bool:
        """Whether the weight codes are AdaRound's (loaded from a calibration, not rounded here)."""
        return self.weight is not None and self.weight.codes == "adaround"

    def with_weight_codes(self, codes: WeightCodes) -> "QuantConfig":
        """The same config with weight codes from ``codes`` (itself when weights are fp)."""
        if self.weight is None:
            return self
        return replace(self, weight=replace(self.weight, codes=codes))

    @property
    def stateful(self) -> bool:
        """Whether the quantized model keeps cross-step state (and so needs `trajectory()`)."""
        return self.mode in ("modulated", "cache")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for manifests); `from_dict` inverts it."""
        from dataclasses import asdict

        values = asdict(self)
        for part in ("weight", "activation"):
            spec = (values[part] or {}).get("spec", {})
            if spec.get("samples_per_scale") == _ADDED_SPEC_DEFAULTS["samples_per_scale"]:
                del spec["samples_per_scale"]
        return {f.name: values[f.name] for f in fields(self)
                if not (f.name in _ADDED_DEFAULTS and values[f.name] == _ADDED_DEFAULTS[f.name])}

    @property
    def samples_per_scale(self) -> int:
        """Consecutive samples that share a dynamic activation scale (`QuantSpec.samples_per_scale`); 0 when
        no scale spans samples in runs of a fixed length (per-sample scales, static scales, or none)."""
        act = self.activation
        return act.spec.samples_per_scale if act is not None and act.dynamic else 0

    def simulated(self) -> "QuantConfig":
        """The simulator's config of the same numerics: the reference of the real backend."""
        return replace(self, backend="simulated")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        """The config `to_dict` described (lists read back as tuples); unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {unknown}; allowed: {sorted(known)}")
        values = dict(data)
        if values.get("weight") is not None:
            w = dict(values["weight"])
            values["weight"] = WeightQuant(spec=QuantSpec(**w.pop("spec")), **w)
        if values.get("activation") is not None:
            a = dict(values["activation"])
            values["activation"] = ActQuant(spec=QuantSpec(**a.pop("spec")), **a)
        for key in ("layer_types", "include", "exclude"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def recorded_backend(recorded: Optional[Mapping[str, Any]]) -> Optional[str]:
    """"real" or "simulated" for a config as `to_dict` recorded it (None: no quantization recorded)."""
    if recorded is None:
        return None
    return str(recorded.get("backend", _ADDED_DEFAULTS["backend"]))
