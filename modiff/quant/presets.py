"""Named quantization presets: `modiff.presets[name]` is a `QuantConfig`.

- ``fp``: every Conv/Linear wrapped, computing exactly (a baseline with the same code path).
- ``wXaY``: direct dynamic quantization: activations asymmetric per sample (batch-independent), weights
  asymmetric per output channel, min-max. ``wXa32``: weights only.
- ``wXaY-modiff``: the same quantizers, modulated with error compensation, one full-precision warm-up step.
- ``wXaY-modiff-noec``: modulated without error compensation ("standard modulation").
- ``published-wXaY`` / ``published-wXaY-modiff``: the published code's numerics: dynamic symmetric
  activations with its clamp [-2^(b-1), 2^(b-1) - 1] and ONE scale for the whole batch tensor of the
  published code's batch (64 samples; `PUBLISHED_BATCH`: here each run of 64 consecutive samples shares its
  scale, so a batch of 512 quantizes as eight batches of 64 and the numbers do not depend on the batch size
  used here; the published LSUN code's batch of 8 is not modelled), per-channel min-max weights, every Conv/Linear (time embedding, first and last layer included), attention core in
  full precision, split shortcut on (as published: only the shortcut conv reading cat([h, skip]) in the
  up path is quantized in two halves, its h and skip channels each with their own scale and weight grid;
  `tests/quant/test_published_equivalence.py` pins every layer against the published formulas).
  ``published-wXa32``: their weights alone (round to nearest, split shortcut on), the weights-only
  anchor of the published rows. These are the numerics of the published DDIM CIFAR-10 commands (``--a_sym
  --split``), and the same presets on a latent model keep them.
- ``published-lsun-wXaY`` / ``published-lsun-wXaY-modiff``: the numerics of the published LSUN commands
  (MoDiff README, dynamic mode; the published LDM script has neither ``--a_sym`` nor ``--split``): dynamic
  asymmetric activations, s = (max - min) / (2^b - 1) over ONE batch tensor of the commands' 8 samples
  (`PUBLISHED_LSUN_BATCH`; the range widened to 0, which the published per-tensor zero point also does and
  which changes nothing where the range holds 0, as residuals and post-SiLU inputs do), no split shortcut, the
  same weights as ``wXaY``, so ``wXa32`` is their weights-only anchor. The commands' 500 (churches) and 200
  (bedrooms) DDIM steps are the sampler's business, not the quantizer's.
- ``qdiff-wXaY`` / ``qdiff-wXaY-modiff``: Q-Diffusion (static activations, as the published DDIM
  CIFAR-10 runs: symmetric with the published clamp, one scale per tensor, split shortcut on, every
  Conv/Linear), direct or modulated. Static scales need calibration data: `modiff calibrate-data`, then
  `modiff calibrate --preset qdiff-w4a4 ...`, then `modiff sample --quantized RUN`. The start of the
  scales: MSE search for direct (Q-Diffusion), min-max of the residuals for modulated (the MoDiff README).
- ``wXa32-adaround``: the weights of ``qdiff-wXaY`` alone (AdaRound, split shortcut on), the Q-Diffusion
  rows' weights-only anchors.
- ``w4aY-adaround`` / ``w4aY-adaround-modiff`` (``w4a32-adaround`` their weights alone): the dynamic
  presets with Q-Diffusion's AdaRound weights, as the paper's W4 rows: the weight quantization of
  ``qdiff-w4aY`` (split shortcut on), whose AdaRound codes `modiff.quantize` loads from the model's
  shipped calibration (`modiff.quant.ptq.shipped`; `modiff calibrate-shipped` makes one), and per-sample
  dynamic activations. Round-to-nearest W4 (``w4aY``) breaks the embedded models.
- ``cacheN`` / ``cacheN-noec``: full-precision layers that reuse their output and refresh every N steps,
  with and without carrying the skipped residual (Figure 1a).
- ``w8a8-int8[-modiff]`` / ``w8a8-fp8[-modiff]``: the numerics of the real W8A8 kernels, simulated: symmetric
  weights per output channel and symmetric per-sample dynamic activations (residuals), as INT8 codes or FP8
  e4m3 values (`modiff.quant.kernels.real`), Conv2d and Linear layers. ``w4a8-int8[-modiff]``: the same with
  4-bit symmetric weights, rounded to nearest as in ``w4aY`` (see ``w4aY-adaround`` on what that does to the
  embedded models). The ``-real`` presets run the same on tensor cores
  (``backend="real"``; CUDA with Triton, the simulator elsewhere).
"""
from __future__ import annotations

import fnmatch
from dataclasses import replace
from types import MappingProxyType
from typing import Iterable, Mapping

from modiff.quant.config import ActQuant, Observer, QuantConfig, WeightCodes, WeightQuant
from modiff.quant.primitives import QuantSpec

__all__ = ["presets", "preset_table", "UnknownPresetError", "WEIGHT_BITS", "ACT_BITS", "ADAROUND_WEIGHT_BITS",
           "PUBLISHED_BATCH", "PUBLISHED_LSUN_BATCH", "needs_calibration", "expand_static"]

WEIGHT_BITS = (8, 4)
ADAROUND_WEIGHT_BITS = (4,)
ACT_BITS = (8, 6, 4, 3, 2)
CACHE_INTERVALS = (2, 3, 5, 10)
# The published DDIM code samples CIFAR-10 in batches of 64, and its dynamic scales span the batch tensor: the
# published presets share each scale over 64 consecutive samples, whatever batch size samples them here.
PUBLISHED_BATCH = 64
# The published LSUN commands (MoDiff README, dynamic quantization) sample in batches of 8.
PUBLISHED_LSUN_BATCH = 8


def _weights(bits: int, codes: WeightCodes = "nearest") -> WeightQuant:
    return WeightQuant(QuantSpec(bits=bits, granularity="channel", channel_axis=0), codes=codes)


def _acts(bits: int, published: bool = False) -> ActQuant:
    if published:
        return ActQuant(QuantSpec(bits=bits, scheme="symmetric-published", granularity="tensor",
                                  samples_per_scale=PUBLISHED_BATCH))
    return ActQuant(QuantSpec(bits=bits, granularity="sample"))


def _lsun_acts(bits: int) -> ActQuant:
    return ActQuant(QuantSpec(bits=bits, scheme="asymmetric", granularity="tensor",
                              samples_per_scale=PUBLISHED_LSUN_BATCH))


def _static_acts(bits: int, observer: Observer) -> ActQuant:
    spec = QuantSpec(bits=bits, scheme="symmetric-published", granularity="tensor")
    return ActQuant(spec, dynamic=False, observer=observer)


def _build() -> dict[str, QuantConfig]:
    table: dict[str, QuantConfig] = {"fp": QuantConfig(weight=None, activation=None, mode="fp")}
    for w in WEIGHT_BITS:
        table[f"w{w}a32"] = QuantConfig(weight=_weights(w), activation=None, mode="direct")
        table[f"published-w{w}a32"] = QuantConfig(weight=_weights(w), activation=None, mode="direct",
                                                  split_shortcut=True)
        for a in ACT_BITS:
            base = QuantConfig(weight=_weights(w), activation=_acts(a), mode="direct")
            table[f"w{w}a{a}"] = base
            table[f"w{w}a{a}-modiff"] = QuantConfig(weight=_weights(w), activation=_acts(a), mode="modulated")
            table[f"w{w}a{a}-modiff-noec"] = QuantConfig(
                weight=_weights(w), activation=_acts(a), mode="modulated", compensation=False
            )
            published = dict(weight=_weights(w), activation=_acts(a, published=True), split_shortcut=True)
            table[f"published-w{w}a{a}"] = QuantConfig(**published, mode="direct")
            table[f"published-w{w}a{a}-modiff"] = QuantConfig(**published, mode="modulated")
            lsun = dict(weight=_weights(w), activation=_lsun_acts(a))
            table[f"published-lsun-w{w}a{a}"] = QuantConfig(**lsun, mode="direct")
            table[f"published-lsun-w{w}a{a}-modiff"] = QuantConfig(**lsun, mode="modulated")
    for w in WEIGHT_BITS:
        for a in ACT_BITS:
            static = dict(weight=_weights(w), split_shortcut=True)
            table[f"qdiff-w{w}a{a}"] = QuantConfig(**static, activation=_static_acts(a, "mse"), mode="direct")
            table[f"qdiff-w{w}a{a}-modiff"] = QuantConfig(**static, activation=_static_acts(a, "minmax"), mode="modulated")
    for w in WEIGHT_BITS:  # the Q-Diffusion rows' weights alone: their weights-only anchors
        table[f"w{w}a32-adaround"] = QuantConfig(weight=_weights(w, "adaround"), split_shortcut=True, activation=None,
                                                 mode="direct")
    for w in ADAROUND_WEIGHT_BITS:
        adaround = dict(weight=_weights(w, "adaround"), split_shortcut=True)  # qdiff-w{w}a*'s weights
        for a in ACT_BITS:
            table[f"w{w}a{a}-adaround"] = QuantConfig(**adaround, activation=_acts(a), mode="direct")
            table[f"w{w}a{a}-adaround-modiff"] = QuantConfig(**adaround, activation=_acts(a), mode="modulated")
    table.update(_real_backend_presets())
    for n in CACHE_INTERVALS:
        table[f"cache{n}"] = QuantConfig(weight=None, activation=None, mode="cache", cache_interval=n)
        table[f"cache{n}-noec"] = QuantConfig(
            weight=None, activation=None, mode="cache", cache_interval=n, compensation=False
        )
    return table


def _real_backend_presets() -> dict[str, QuantConfig]:
    """The real backend's numerics (see the module docstring), simulated and real: W8A8 in both formats, W4A8 in
    INT8."""
    table = {}
    acts = ActQuant(QuantSpec(bits=8, scheme="symmetric", granularity="sample"))
    for weight_bits, name, number_format in ((8, "int8", "int"), (8, "fp8", "fp8_e4m3"), (4, "int8", "int")):
        weights = WeightQuant(QuantSpec(bits=weight_bits, scheme="symmetric", granularity="channel", channel_axis=0))
        base = QuantConfig(weight=weights, activation=acts, format=number_format, layer_types=("Conv2d", "Linear"))
        for suffix, mode in (("", "direct"), ("-modiff", "modulated")):
            table[f"w{weight_bits}a8-{name}{suffix}"] = replace(base, mode=mode)
            table[f"w{weight_bits}a8-{name}{suffix}-real"] = replace(base, mode=mode, backend="real")
    return table


class UnknownPresetError(KeyError, ValueError):
    """An unknown preset name; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Presets(Mapping[str, QuantConfig]):
    """Read-only name -> QuantConfig; an unknown name lists the valid ones."""

    def __init__(self, table: dict[str, QuantConfig]):
        self._table = MappingProxyType(table)

    def __getitem__(self, name: str) -> QuantConfig:
        if name not in self._table:
            raise UnknownPresetError(f"unknown quantization preset {name!r}; valid presets: {', '.join(self._table)}")
        return self._table[name]

    def __iter__(self):
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


presets: Mapping[str, QuantConfig] = _Presets(_build())


def needs_calibration(config: QuantConfig) -> bool:
    """Whether ``config`` has static activation quantizers, which need calibration data before use."""
    return config.activation is not None and not config.activation.dynamic


def expand_static(names: Iterable[str]) -> list[str]:
    """``names`` with each shell pattern (``qdiff-*``, ``qdiff-w8a?``) replaced by the presets needing calibration
    that it matches, in table order; plain names are kept as given. A pattern matching none raises ValueError."""
    static = [name for name, config in presets.items() if needs_calibration(config)]
    out: list[str] = []
    for name in names:
        if not any(c in name for c in "*?["):
            out.append(name)
            continue
        matched = fnmatch.filter(static, name)
        if not matched:
            raise ValueError(f"{name!r} matches no preset that needs calibration; those are: {', '.join(static)}")
        out += matched
    return list(dict.fromkeys(out))


def calibration_hint(name: str) -> str:
    """What to do with a preset whose static scales need calibration (for error messages)."""
    return (f"preset {name!r} has static activation scales, which need calibration data: run "
            f"`modiff calibrate-data --model M --out DATA`, then `modiff calibrate --model M --data DATA "
            f"--preset {name} --out RUN`, and sample with `modiff sample --quantized RUN` (or ship it with "
            f"the model: `modiff calibrate-shipped --model M --preset {name}`)")


def preset_table() -> list[dict[str, object]]:
    """One row per preset, for `modiff presets`."""
    rows = []
    for name, c in presets.items():
        act = c.activation
        rows.append({
            "preset": name,
            "mode": c.mode + ("" if c.compensation or c.mode in ("fp", "direct") else " (no EC)"),
            "weights": "fp" if c.weight is None else f"{c.weight.spec.bits}b {c.weight.spec.scheme} per-{c.weight.spec.granularity}"
                                                     + (" adaround" if c.adaround else ""),
            "activations": "fp" if act is None else f"{act.spec.bits}b {act.spec.scheme} per-{act.spec.granularity} {'dynamic' if act.dynamic else 'static'}",
            "warmup": c.warmup_steps if c.stateful else "-",
            "cache_every": c.cache_interval or "-",
            "split_shortcut": c.split_shortcut,
            "format": c.format,
            "backend": c.backend,
        })
    return rows
