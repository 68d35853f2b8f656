"""Whole-network error propagation: features of a quantized model vs the fp model over sampling steps.

Figures 1a (caching) and 3 (error compensation) of the MoDiff paper. Each model samples its OWN
trajectory from the same noise x_T (the quantized model never sees the fp model's x_t); at every
model call the output of one submodule (``site``) is captured with a forward hook, and per step

    rel_l2[i, b] = ||f_ref[i, b] - f_est[i, b]|| / ||f_ref[i, b]||     (b: sample, norms per sample)

is averaged over samples (``rel_l2_mean``, ``rel_l2_std`` population std over samples); the ``*_samples``
functions keep one row per sample, for intervals over samples (`analysis.intervals`).

=============  ===================================================================================
``i``          sampling index (column ``step``), one model call per step; ``t`` its timestep
``site``       a submodule name; a bare container (plain nn.Module without forward, e.g. DDIMUNet's
               ``net.mid``) means its last registered child (``net.mid.block_2``: the middle block's
               output). None (the default) is the model's middle block, `modiff.middle_block`
               (``net.mid`` in a DDIM UNet, ``net.middle_block`` in a CompVis latent UNet)
=============  ===================================================================================
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.intervals import Interval, mean_interval
from modiff.diffusion.sampling import sample_ddim
from modiff.models.conventions import middle_block
from modiff.pipelines.execution import float32_precision
from modiff.quant import ActQuant, QuantConfig, QuantSpec, WeightQuant, quantize, trajectory
from modiff.utils.hooks import Capture, attach

__all__ = [
    "caching_error_curves",
    "caching_error_samples",
    "capture_features",
    "compensation_ablation",
    "compensation_ablation_samples",
    "compensation_table",
    "curves_from_samples",
    "feature_error_over_steps",
    "last_step_intervals",
    "relative_l2",
    "relative_l2_samples",
    "resolve_site",
]

Sampler = Callable[..., torch.Tensor]


def resolve_site(model: nn.Module, site: Optional[str] = None) -> str:
    """The name of the module to hook for ``site`` (see the module notation)."""
    if site is None:
        site = middle_block(model)
    try:
        module = model.get_submodule(site)
    except AttributeError as err:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"model has no submodule {site!r}; some valid names: {', '.join(names)}, ...") from err
    children = list(module.named_children())
    if type(module) is nn.Module and children:  # a plain container has no forward of its own
        return resolve_site(model, f"{site}.{children[-1][0]}")
    return site


def _features(output: Any) -> torch.Tensor:
    out = output[0] if isinstance(output, (tuple, list)) else output
    return out.detach().float().clone()


def capture_features(
    model: nn.Module, x_T: torch.Tensor, timesteps: Sequence[int], site: Optional[str] = None,
    sampler: Sampler = sample_ddim, **sampler_kwargs: Any,
) -> list[torch.Tensor]:
    """Sample from ``x_T`` with ``model`` and return the output of ``site`` at every model call.

    Sampling runs inside `modiff.trajectory` (which does nothing for a model without MoDiff state), in IEEE
    float32 on every device (cuDNN's default TF32 convolutions would add their own error to the error being
    measured); the features are captured by a `modiff.utils.hooks.Capture` hook.
    """
    capture = Capture("output", keep=_features)
    module = model.get_submodule(resolve_site(model, site))
    with trajectory(model), attach("analysis.capture_features", [(module, capture)]), float32_precision("fp32"):
        sampler(model, x_T, timesteps, **sampler_kwargs)
    return capture.values


def relative_l2_samples(reference: Sequence[torch.Tensor], estimate: Sequence[torch.Tensor],
                        timesteps: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Per step and sample: step, t, sample (position in the batch), rel_l2 (see module docstring).

    ``t`` is NaN unless there is one timestep per captured call (one model call per step, as in DDIM,
    DDPM and DPM-Solver++(2M) here)."""
    if len(reference) != len(estimate):
        raise ValueError(f"the reference has {len(reference)} captured steps, the estimate {len(estimate)}")
    frames = []
    for i, (ref, est) in enumerate(zip(reference, estimate)):
        ref, est = ref.double().flatten(1), est.double().flatten(1)  # (B, features)
        rel = ((ref - est).norm(dim=1) / ref.norm(dim=1)).cpu().numpy()
        t = float(timesteps[i]) if timesteps is not None and len(timesteps) == len(reference) else np.nan
        frames.append(pd.DataFrame({"step": i, "t": t, "sample": np.arange(rel.size), "rel_l2": rel}))
    return pd.concat(frames, ignore_index=True)


def curves_from_samples(samples: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Per step (and group of ``by``): step, t, rel_l2_mean, rel_l2_std (population std over samples),
    n_samples, then the ``by`` columns; ``samples`` as from `relative_l2_samples`."""
    keys = [*by, "step"]
    grouped = samples.groupby(keys, sort=False, dropna=False)
    out = grouped.agg(t=("t", "first"), rel_l2_mean=("rel_l2", "mean"),
                      rel_l2_std=("rel_l2", lambda v: float(np.std(v.to_numpy()))),
                      n_samples=("rel_l2", "size")).reset_index()
    return out[["step", "t", "rel_l2_mean", "rel_l2_std", "n_samples", *by]]


def relative_l2(reference: Sequence[torch.Tensor], estimate: Sequence[torch.Tensor],
                timesteps: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Per step: step, t, rel_l2_mean, rel_l2_std (over samples), n_samples (see `relative_l2_samples`)."""
    return curves_from_samples(relative_l2_samples(reference, estimate, timesteps))


def feature_error_over_steps(
    model_fp: nn.Module, model_q: nn.Module, x_T: torch.Tensor, timesteps: Sequence[int],
    site: Optional[str] = None, sampler: Sampler = sample_ddim, **sampler_kwargs: Any,
) -> pd.DataFrame:
    """Relative L2 distance of ``site`` features, ``model_q`` vs ``model_fp``, each on its own
    trajectory from the same ``x_T`` (see `relative_l2`).

    Stochastic samplers: pass a fresh ``rng`` per call yourself; one kwargs set serves both runs here.
    """
    reference = capture_features(model_fp, x_T, timesteps, site, sampler, **sampler_kwargs)
    estimate = capture_features(model_q, x_T, timesteps, site, sampler, **sampler_kwargs)
    return relative_l2(reference, estimate, timesteps)


def caching_error_samples(
    model: nn.Module, intervals: Sequence[int] = (2, 3, 5), *, x_T: torch.Tensor, timesteps: Sequence[int],
    compensation: bool = True, site: Optional[str] = None, sampler: Sampler = sample_ddim, **sampler_kwargs: Any,
) -> pd.DataFrame:
    """Figure 1a per sample: `relative_l2_samples` for each refresh interval N (column ``interval``).

    Model: every Conv/Linear cached, QuantConfig(mode="cache", cache_interval=N, weight=None,
    activation=None) (the ``cacheN`` presets): exact on refresh steps, previous output reused between.
    """
    reference = capture_features(model, x_T, timesteps, site, sampler, **sampler_kwargs)
    frames = []
    for n in intervals:
        config = QuantConfig(weight=None, activation=None, mode="cache", cache_interval=int(n),
                             compensation=compensation)
        est = capture_features(quantize(model, config), x_T, timesteps, site, sampler, **sampler_kwargs)
        frames.append(relative_l2_samples(reference, est, timesteps).assign(interval=int(n)))
    return pd.concat(frames, ignore_index=True)


def caching_error_curves(
    model: nn.Module, intervals: Sequence[int] = (2, 3, 5), *, x_T: torch.Tensor, timesteps: Sequence[int],
    compensation: bool = True, site: Optional[str] = None, sampler: Sampler = sample_ddim, **sampler_kwargs: Any,
) -> pd.DataFrame:
    """Figure 1a: one `relative_l2` curve per refresh interval N (column ``interval``); see
    `caching_error_samples`."""
    samples = caching_error_samples(model, intervals, x_T=x_T, timesteps=timesteps, compensation=compensation,
                                    site=site, sampler=sampler, **sampler_kwargs)
    return curves_from_samples(samples, ["interval"])


def compensation_ablation_samples(
    model: nn.Module, bits: Sequence[int] = (8, 6, 4, 3), *, x_T: torch.Tensor, timesteps: Sequence[int],
    weight_bits: Optional[int] = None, warmup_steps: int = 1, site: Optional[str] = None,
    sampler: Sampler = sample_ddim, **sampler_kwargs: Any,
) -> pd.DataFrame:
    """Figure 3 per sample: `relative_l2_samples` for modulated quantization with and without error
    compensation, per activation bit width (columns ``bits``, ``compensation``).

    Activations: dynamic asymmetric, one scale per sample (as the ``wXaY-modiff`` presets). Weights
    stay in full precision by default (``weight_bits=None``) so the curves isolate the activation
    error the paper's Figure 3 is about; ``weight_bits`` adds per-channel min-max weights.
    """
    reference = capture_features(model, x_T, timesteps, site, sampler, **sampler_kwargs)
    weight = None
    if weight_bits is not None:
        weight = WeightQuant(QuantSpec(bits=weight_bits, granularity="channel", channel_axis=0))
    frames = []
    for b in bits:
        act = ActQuant(QuantSpec(bits=int(b), granularity="sample"))
        for ec in (True, False):
            config = QuantConfig(weight=weight, activation=act, mode="modulated", compensation=ec,
                                 warmup_steps=warmup_steps)
            est = capture_features(quantize(model, config), x_T, timesteps, site, sampler, **sampler_kwargs)
            frames.append(relative_l2_samples(reference, est, timesteps).assign(bits=int(b), compensation=ec))
    return pd.concat(frames, ignore_index=True)


def compensation_ablation(
    model: nn.Module, bits: Sequence[int] = (8, 6, 4, 3), *, x_T: torch.Tensor, timesteps: Sequence[int],
    weight_bits: Optional[int] = None, warmup_steps: int = 1, site: Optional[str] = None,
    sampler: Sampler = sample_ddim, **sampler_kwargs: Any,
) -> pd.DataFrame:
    """Figure 3: `relative_l2` curves per bit width, with and without error compensation (columns
    ``bits``, ``compensation``); see `compensation_ablation_samples`."""
    samples = compensation_ablation_samples(model, bits, x_T=x_T, timesteps=timesteps, weight_bits=weight_bits,
                                            warmup_steps=warmup_steps, site=site, sampler=sampler, **sampler_kwargs)
    return curves_from_samples(samples, ["bits", "compensation"])


def last_step_intervals(samples: pd.DataFrame, bits: int) -> dict[bool, Interval]:
    """Figure 3 at the last step, bit width ``bits``: the mean relative L2 over samples with its 95%
    interval, keyed by compensation (True: with error compensation). ``samples``:
    `compensation_ablation_samples`."""
    last = samples[(samples["step"] == samples["step"].max()) & (samples["bits"] == bits)]
    if last.empty:
        raise ValueError(f"no rows for {bits} bits; bit widths present: {sorted(samples['bits'].unique())}")
    return {bool(ec): mean_interval(part["rel_l2"].to_numpy()) for ec, part in last.groupby("compensation")}


def compensation_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Table 4 at the last step: per bit width, the relative L2 without and with error compensation, each a
    mean over samples with its 95% interval."""
    rows = []
    for b in sorted(samples["bits"].unique()):
        row: dict[str, object] = {"bits": int(b)}
        for ec, name in ((False, "without error compensation"), (True, "with error compensation")):
            interval = last_step_intervals(samples, int(b))[ec]
            row.update({name: interval.mean, f"{name}: ci95_low": interval.low, f"{name}: ci95_high": interval.high})
        rows.append({**row, "n_samples": interval.n})
    return pd.DataFrame(rows)
