"""Experiment drivers the notebooks call: each runs through the library into run directories (reused on
a re-run) or computes in memory, and returns a DataFrame (data in, tables out; no plotting here)."""
from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, get_args

import numpy as np
import pandas as pd
import torch
from torch import nn

import modiff as md
from modiff.metrics.bootstrap import BootstrapConfig, paired_difference
from modiff.pipelines.evaluate import seed_images
from modiff.diffusion.schedules import Spacing
from modiff.pipelines import run_usage
from modiff.utils.distributed import World
from modiff.pipelines.execution import PrecisionChoice, float32_precision, precision_record
from modiff.pipelines.generate import SampleConfig, SamplerName, finished_run, generate
from modiff.pipelines.run_folder import identity_differences, sampler_identity
from modiff.pipelines.summary import ReferenceImagesError, per_seed_fidelity, require_reference_images, run_scores
from modiff.utils.device import resolve_device
from modiff.utils.rng import format_seeds
from modiff.utils.runs import atomic_path, environment, write_json
from modiff.utils.hooks import Capture, attach
from modiff.quant.cost import preset_report
from modiff.quant.ptq.adaround import AdaRoundConfig
from modiff.quant.ptq.data import CalibDataConfig
from modiff.quant.ptq.calibrate import CalibrationConfig
from modiff.quant.ptq.reuse import Calibration, quantized_model

from analysis import intervals as ci
from modiff.quant.ptq.lsq import ActCalibConfig

__all__ = [
    "layer_inputs", "sample_config", "run_location", "sample_run", "seed_images", "sampler_table", "sampler_per_seed",
    "paper_samplers", "sampler_runs", "sampler_scores", "SCORE_COLUMNS", "score_columns", "HIGHER_IS_BETTER",
    "paired_verdict",
    "warmup_table", "warmup_per_seed", "warmup_location", "warmup_paired",
    "bops_memory_table", "published_audit", "paper_values", "paper_tables", "calibration_settings", "fill_runs",
    "run_is_finished", "fp_reference_run", "run_precision", "analysis_precision",
]


def _on_cpu(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return args[0].detach().float().cpu()


def paper_spacing(model: nn.Module) -> Spacing:
    """The timesteps the paper's experiments use on this kind of model: the published ``quad`` sequence for
    the toolkit's pixel DDIM models (the MoDiff CIFAR-10 runs: ``--skip_type quad``), the model's own
    spacing otherwise (``ldm`` for a latent model, the scheduler's for a diffusers one)."""
    from modiff.models.diffusers.denoiser import DiffusersDenoiser

    own = md.default_spacing(model)
    return "quad" if own == "uniform" and not isinstance(model, DiffusersDenoiser) else own


def _timesteps(model: nn.Module, steps: int, spacing: Optional[Spacing] = None) -> tuple[int, ...]:
    """DDIM timesteps: the paper's spacing for the model (`paper_spacing`) unless one is given."""
    return md.timesteps(steps, spacing or paper_spacing(model), model.schedule.num_timesteps)


def sample_config(model: nn.Module, steps: int, sampler: SamplerName = "ddim",
                  precision: PrecisionChoice = "auto") -> SampleConfig:
    """A SampleConfig with the paper's timestep spacing for the model (`paper_spacing`); "auto" precision
    is the device's (`modiff.pipelines.execution`), resolved by `sample_run`."""
    return SampleConfig(sampler=sampler, steps=steps, spacing=paper_spacing(model), precision=precision)


def spacing_runs_dir(model: nn.Module, runs_dir: str | Path, config: SampleConfig) -> Path:
    """``runs_dir`` for the model's own spacing, else ``runs_dir/spacing-<name>``: run directories are named
    by preset, sampler and steps, so each spacing keeps its runs (and its calibrations) apart."""
    own = md.default_spacing(model)
    return Path(runs_dir) if config.spacing == own else Path(runs_dir) / f"spacing-{config.spacing}"


def _on_device(model: nn.Module, device: str) -> nn.Module:
    """``model`` itself on the CPU, else a copy on ``device`` (the caller's model stays where it is)."""
    dev = resolve_device(device)
    return model if dev.type == "cpu" else copy.deepcopy(model).to(dev)


@torch.no_grad()
def layer_inputs(model: nn.Module, sites: Sequence[str], seeds: Sequence[int], steps: int,
                 spacing: Optional[Spacing] = None,
                 device: str = "cpu") -> tuple[dict[str, list[torch.Tensor]], tuple[int, ...]]:
    """Inputs a_t of each site at every step (one call per step), in sampling order, on the CPU, and the
    timesteps (the model's own spacing unless ``spacing`` is given). Sampling runs on ``device`` in IEEE
    float32 (TF32 off on CUDA)."""
    ts = _timesteps(model, steps, spacing)
    runner = _on_device(model, device)
    captures = {site: Capture("input", keep=_on_cpu) for site in sites}
    hooks = [(runner.get_submodule(site), c) for site, c in captures.items()]
    with attach("analysis.layer_inputs", hooks), float32_precision("fp32"):
        md.sample_ddim(runner, md.noise(seeds, model.sample_shape).to(resolve_device(device)), ts)
    return {site: c.values for site, c in captures.items()}, ts


def calibration_settings(model: nn.Module, steps: int, samples_per_step: int, adaround_iters: int,
                         activation_iters: int) -> Calibration:
    """Q-Diffusion calibration as published, scaled by the arguments: 1 in 5 of the model's sampling steps
    (20 of 100), ``samples_per_step`` trajectories, AdaRound and step-size iterations per block."""
    data = CalibDataConfig(steps=steps, spacing=paper_spacing(model), calib_steps=max(1, steps // 5),
                           samples_per_step=samples_per_step, batch_size=min(256, samples_per_step))
    recipe = CalibrationConfig(AdaRoundConfig(iters=adaround_iters, log_every=min(1000, adaround_iters)),
                               ActCalibConfig(iters=activation_iters, log_every=min(1000, activation_iters)))
    return Calibration(data, recipe)


def _run_location(model: nn.Module, preset: str, config: SampleConfig, runs_dir: str | Path,
                  reset: Optional[str] = None) -> tuple[Path, dict[str, object]]:
    """runs_dir/<preset>-<sampler><steps>[-<reset>][-<precision>] (fp32 runs keep the older, shorter name),
    and the model identity; ``config`` has its precision resolved."""
    assert config.precision != "auto", "resolve the precision first (SampleConfig.resolved)"
    name = f"{preset}-{config.sampler}{config.steps}" + (f"-{reset}" if reset else "")
    run_dir = Path(runs_dir) / (name if config.precision == "fp32" else f"{name}-{config.precision}")
    identity = {"model": getattr(model, "name", "model"), "quant_preset": preset, "reset": reset,
                **sampler_identity(model, config.sampler)}
    quant = md.presets[preset]
    if quant.samples_per_scale:  # these numerics no longer follow the batch size: runs made before are refused
        identity["quant_config"] = quant.to_dict()
    return run_dir, identity


def run_location(model: nn.Module, preset: str, config: SampleConfig, runs_dir: str | Path) -> Path:
    """Where `sample_run` keeps the run of ``preset`` under ``runs_dir`` (``config`` with its precision resolved)."""
    return _run_location(model, preset, config, runs_dir)[0]


def sample_run(model: nn.Module, preset: str, seeds: Sequence[int], config: SampleConfig, runs_dir: str | Path,
               batch_size: int = 64, device: str = "auto", reset: Optional[str] = None,
               calibration: Optional[Calibration] = None) -> Path:
    """Generate (or reuse) runs_dir/<preset>-<sampler><steps>[-<reset>][-<precision>] for the seeds; returns
    the run dir. A summary of the run there (`modiff summarize`) is reused in its place: the tables read
    both alike. On CUDA the run takes the fast path (`modiff.pipelines.execution`) unless ``config`` sets
    another precision; torch.compile shares its graphs between presets in one process.

    Static (``qdiff-*``) presets are calibrated with ``calibration`` into runs_dir the first time. Whether
    the run was made or reused is noted for the report (`modiff.pipelines.run_usage`)."""
    config = config.resolved(resolve_device(device))
    run_dir, identity = _run_location(model, preset, config, runs_dir, reset)
    if finished_run(run_dir, seeds, config, identity, device):  # reused without building, calibrating or loading the model
        run_usage.note(run_dir, made=False)
        return run_dir
    net = model if preset == "fp" else quantized_model(model, preset, runs_dir, calibration, resolve_device(device))
    prepare = partial(md.trajectory, reset=reset)  # does nothing for a model without MoDiff state
    made = generate(net, seeds, run_dir, config, batch_size=batch_size, device=device,
                    identity=identity, prepare=prepare, progress=False)
    run_usage.note(made, made=True)
    return made


def run_is_finished(model: nn.Module, preset: str, seeds: Sequence[int], config: SampleConfig, runs_dir: str | Path,
                    device: str = "auto") -> bool:
    """Whether `sample_run` would reuse a run (or its summary) of ``preset`` for ``seeds``."""
    resolved = config.resolved(resolve_device(device))
    run_dir, identity = _run_location(model, preset, resolved, runs_dir)
    return finished_run(run_dir, seeds, resolved, identity, device)


def run_precision(run_dir: Path) -> str:
    """The arithmetic of a run as its manifest records it (every session), e.g. "fp32 (TF32 off) on cuda"."""
    sessions = json.loads((Path(run_dir) / "manifest.json").read_text()).get("sessions", [])
    labels = {f"{s['precision']['label']} on {s['precision']['device_type']}" if "precision" in s
              else "fp32, TF32 not recorded (older run)" for s in sessions}
    return "; ".join(sorted(labels))


def analysis_precision(device: str | torch.device) -> str:
    """The arithmetic of the trajectories the analysis functions run themselves (always IEEE float32), as a
    table's precision column reads it, e.g. "fp32 (TF32 off) on cuda" (`run_precision` for sample runs)."""
    where = resolve_device(device) if isinstance(device, str) else device
    return f"{precision_record('fp32', where)['label']} on {where.type}"


def fp_reference_run(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig,
                     runs_dir: str | Path, batch_size: int = 64, device: str = "auto") -> Path:
    """The fp run (made or reused by `sample_run`) that the per-seed distances of ``presets`` are measured
    against. A summary of it that lacks images is refused here, before any sampling, if one of ``presets``
    still has to be sampled (its distances need the fp image of every seed)."""
    fp_run = sample_run(model, "fp", seeds, config, runs_dir, batch_size, device)
    pending = [p for p in presets if p != "fp" and not run_is_finished(model, p, seeds, config, runs_dir, device)]
    require_reference_images(fp_run, seeds, pending)
    return fp_run


def _static(preset: str) -> bool:
    from modiff.quant.presets import needs_calibration

    return preset != "fp" and needs_calibration(md.presets[preset])


def _adaround_weights(preset: str) -> bool:
    """Whether the preset's weights come from AdaRound: static presets and the ``-adaround`` ones."""
    return _static(preset) or (preset != "fp" and md.presets[preset].adaround)


def _calibrates(preset: str, calibration: Optional[Calibration]) -> bool:
    """Whether `quantized_model` calibrates (and saves) something for ``preset`` when given ``calibration``."""
    return calibration is not None and _adaround_weights(preset)


def _waves(presets: Sequence[str]) -> list[list[str]]:
    """First the first AdaRound preset of each weight quantization (each computes the AdaRound weights the
    others reuse), then everything else."""
    from modiff.quant.ptq.calibrate import weight_only_config

    firsts: dict[str, str] = {}
    for p in filter(_adaround_weights, presets):
        firsts.setdefault(json.dumps(weight_only_config(md.presets[p]).to_dict(), sort_keys=True, default=str), p)
    return [list(firsts.values()), [p for p in presets if p not in firsts.values()]]


def _device_list(devices: str | Sequence[str]) -> list[str]:
    """``"cuda:0,cuda:1"`` (as a notebook parameter or ``--set devices=...`` gives it) or a list."""
    return [d.strip() for d in devices.split(",") if d.strip()] if isinstance(devices, str) else list(devices)


def _fill_rank(device: str, model: nn.Module, presets: list[str], seeds: list[int], config: SampleConfig,
               runs_dir: str, batch_size: int, calibration: Optional[Calibration]) -> None:
    """One rank of `fill_runs`: the calibrations dealt over the ranks, wave by wave (`_waves`), then every
    run sampled by all ranks together (`generate` deals its batches over them)."""
    world = World.current()
    for wave in _waves([p for p in presets if _calibrates(p, calibration)]):
        for preset in wave[world.rank :: world.size]:
            quantized_model(model, preset, runs_dir, calibration, resolve_device(device))
        world.barrier()
    for preset in presets:
        sample_run(model, preset, seeds, config, runs_dir, batch_size, device, calibration=calibration)


def fill_runs(model: nn.Module, presets: Sequence[str], seeds: Sequence[int], config: SampleConfig,
              runs_dir: str | Path, devices: str | Sequence[str], batch_size: int = 64,
              calibration: Optional[Calibration] = None) -> None:
    """Make the runs `sample_run` would make for ``presets`` on several devices, one torch.distributed rank
    per entry of ``devices`` (say ``["cuda:0", "cuda:1"]``; `modiff.pipelines.distributed.launch`); the
    table functions then reuse them. Each run is sampled by all ranks, its batches dealt over them, so its
    images are those of a one-process run.

    Calibrations come first, dealt over the ranks: the first preset of each weight quantization (its
    AdaRound weights, which the others reuse, see `quantized_model`), then the others. The calibration data
    is collected once, before the ranks start."""
    from modiff.pipelines.distributed import launch
    from modiff.quant.ptq.reuse import calibration_data

    devices = _device_list(devices)
    if not devices:
        raise ValueError("fill_runs needs at least one device")

    pending = [p for p in dict.fromkeys(presets) if not run_is_finished(model, p, seeds, config, runs_dir, devices[0])]
    if not pending:
        return
    if any(_calibrates(p, calibration) for p in pending):
        calibration_data(model, Path(runs_dir), calibration, resolve_device(devices[0]))
    launch(_fill_rank, devices, model, pending, list(seeds), config, str(runs_dir), batch_size, calibration)


SamplerRuns = dict[tuple[str, int], dict[str, Path]]  # (sampler, steps) -> preset -> run folder, "fp" included


MissingRuns = Literal["sample", "skip"]  # what a table does with a row whose run is not there


def check_missing_runs(missing_runs: str) -> str:
    if missing_runs not in get_args(MissingRuns):
        raise ValueError(f"missing_runs must be one of {', '.join(get_args(MissingRuns))}, got {missing_runs!r}")
    return missing_runs


def paper_samplers(steps: int) -> list[tuple[str, int]]:
    """The samplers of Tables 5 and 15-18 (samplers) for a table at ``steps``: DDIM at 20 steps (the paper's short
    schedule), at half and at all ``steps``, then DDPM and DPM-Solver++(2M) at ``steps``; a step count that
    repeats (a short quick-preset table) appears once."""
    ddim = sorted({min(20, steps), max(1, steps // 2), steps})
    return [("ddim", k) for k in ddim] + [("ddpm", steps), ("dpm-solver", steps)]


def samplers_to_run(model: nn.Module, presets: Sequence[str], samplers: Sequence[tuple[str, int]],
                    seeds: Sequence[int], runs_dir: str | Path, missing_runs: MissingRuns = "sample",
                    device: str = "auto", precision: PrecisionChoice = "auto") -> tuple[list[tuple[str, int]],
                                                                                      list[tuple[str, int]]]:
    """The (sampler, steps) of ``samplers`` that `sampler_runs` is given, and those left out, as
    `analysis.table1.rows_to_score` does for Table 1's rows: ``"sample"`` keeps all (runs not there are
    sampled); ``"skip"`` keeps those whose fp run and every preset's run (or summary) of ``seeds`` is there."""
    if check_missing_runs(missing_runs) == "sample":
        return list(samplers), []
    kept, left_out = [], []
    for sampler, steps in samplers:
        config = sample_config(model, steps, sampler, precision)
        folder = spacing_runs_dir(model, runs_dir, config)
        there = all(run_is_finished(model, p, seeds, config, folder, device) for p in dict.fromkeys(["fp", *presets]))
        (kept if there else left_out).append((sampler, steps))
    return kept, left_out


def sampler_runs(model: nn.Module, presets: Sequence[str], samplers: Sequence[tuple[str, int]], seeds: Sequence[int],
                 runs_dir: str | Path, batch_size: int = 64, device: str = "auto", devices: str | Sequence[str] = (),
                 precision: PrecisionChoice = "auto") -> SamplerRuns:
    """Tables 5 and 15-18 (samplers): the fp run and a run of each preset per sampler and step count, made or reused (full
    or summarized) by `sample_run` in ``precision``. With several ``devices`` the runs of each sampler are made
    in parallel first (`fill_runs`)."""
    runs: SamplerRuns = {}
    for sampler, steps in samplers:
        config = sample_config(model, steps, sampler, precision)
        folder = spacing_runs_dir(model, runs_dir, config)
        fp_run = fp_reference_run(model, presets, seeds, config, folder, batch_size, device)
        if len(_device_list(devices)) > 1:
            fill_runs(model, presets, seeds, config, folder, devices, batch_size)
        runs[(sampler, steps)] = {"fp": fp_run, **{p: sample_run(model, p, seeds, config, folder, batch_size, device)
                                                  for p in presets if p != "fp"}}
    return runs


def sampler_per_seed(runs: SamplerRuns, seeds: Sequence[int]) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
    """Per seed, the relative L2 (pixels) of each preset's sample to the fp sample of the same seed and
    sampler (``runs``: `sampler_runs`); columns sampler, steps, preset, precision (`run_precision`), seed,
    rel_l2_pixels. Second, the (sampler, steps) left out whole: a run of theirs is a summary whose distances
    were measured against other fp images than their fp run's (`ReferenceImagesError`), so no pair is formed."""
    frames, not_compared = [], []
    for (sampler, steps), by_preset in runs.items():
        try:
            distances = {preset: per_seed_fidelity(run, by_preset["fp"], seeds).rel_l2_pixels
                         for preset, run in by_preset.items() if preset != "fp"}
        except ReferenceImagesError:
            not_compared.append((sampler, steps))
            continue
        frames += [pd.DataFrame({"sampler": sampler, "steps": steps, "preset": preset,
                                 "precision": run_precision(by_preset[preset]), "seed": list(seeds),
                                 "rel_l2_pixels": values}) for preset, values in distances.items()]
    columns = ["sampler", "steps", "preset", "precision", "seed", "rel_l2_pixels"]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)), not_compared


_SCORES = {  # table column: (key of the score, stem of its interval's keys) in `modiff.metrics.fidelity.score`
    "fid_classifier": ("fid", "fid"), "is_classifier": ("is_mean", "is"), "kid_classifier": ("kid", "kid"),
    "improved_precision": ("precision", "precision"), "improved_recall": ("recall", "recall")}
SCORE_COLUMNS = [c for column in _SCORES for c in (column, f"{column.removesuffix('_classifier')}_ci95_low",
                                                   f"{column.removesuffix('_classifier')}_ci95_high")]


def score_columns(metrics: Mapping[str, Any]) -> dict[str, float]:
    """FID, IS, KID (over all samples) and improved precision/recall (Kynkäänniemi et al.) with their 95%
    bootstrap intervals, as table columns (`SCORE_COLUMNS`); NaN where ``metrics`` lack one (a summary made
    before KID and precision/recall were scored, a degenerate set)."""
    out = {}
    for column, (key, stem) in _SCORES.items():
        name = column.removesuffix("_classifier")
        out.update({column: metrics.get(key, np.nan), f"{name}_ci95_low": metrics.get(f"{stem}_ci95_low", np.nan),
                    f"{name}_ci95_high": metrics.get(f"{stem}_ci95_high", np.nan)})
    return out


HIGHER_IS_BETTER = {"fid": False, "kid": False, "precision": True, "recall": True}  # the scores paired verdicts read


def paired_verdict(scores: dict, preset: str, other: str, level: float, score: str = "fid") -> str:
    """"worse: +d [low, high]" for score(preset) - score(other) (paired bootstrap; for precision and recall a
    positive difference is better), "" where a side lacks the score's resamples."""
    a, b = scores.get(preset), scores.get(other)
    if a is None or b is None or score not in a.resamples or score not in b.resamples:
        return ""
    d = paired_difference(a.metrics[score], b.metrics[score], a.resamples[score], b.resamples[score], level,
                          HIGHER_IS_BETTER[score])
    return f"{d['verdict']}: {d['difference']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}]"


def sampler_scores(runs: SamplerRuns, seeds: Sequence[int], ref: str = "fmnist-train",
                   bootstrap: BootstrapConfig = BootstrapConfig(), device: str = "cpu") -> pd.DataFrame:
    """The paper's measure for Tables 5 and 15-18 (samplers): FID (classifier features against ``ref``) with its 95%
    bootstrap interval for every run of ``runs`` (fp included), and paired-bootstrap verdicts over the same
    seeds against the sampler's fp run (vs_fp) and, for a ``-modiff`` preset, against its direct counterpart
    (modiff_vs_direct, and by KID, precision and recall modiff_vs_direct_kid, _precision, _recall), as
    Table 1 reads them; features of a full run are extracted on ``device`` (a summary holds its scores);
    columns sampler, steps, preset, precision, n, `SCORE_COLUMNS` (FID, IS, KID, improved precision and
    recall with their intervals), vs_fp, the four modiff_vs_direct columns, note."""
    rows = []
    for (sampler, steps), by_preset in runs.items():
        scores, notes = {}, {}
        for preset, run in by_preset.items():
            try:
                scores[preset] = run_scores(run, seeds, ref, bootstrap, device)
            except ValueError as err:  # a degenerate set (all images alike): reported in its row, not fatal
                notes[preset] = str(err)
        for preset, run in by_preset.items():
            metrics = scores[preset].metrics if preset in scores else {}
            direct = preset.removesuffix("-modiff")
            rows.append({"sampler": sampler, "steps": steps, "preset": preset, "precision": run_precision(run),
                         "n": len(seeds), **score_columns(metrics),
                         "vs_fp": "" if preset == "fp" else paired_verdict(scores, preset, "fp", bootstrap.level),
                         **{f"modiff_vs_direct{'' if score == 'fid' else '_' + score}":
                            paired_verdict(scores, preset, direct, bootstrap.level, score)
                            if direct != preset and direct in by_preset else "" for score in HIGHER_IS_BETTER},
                         "note": notes.get(preset, "")})
    return pd.DataFrame(rows)


def sampler_table(model: nn.Module, presets: Sequence[str], samplers: Sequence[tuple[str, int]], seeds: Sequence[int],
                  runs_dir: str | Path, batch_size: int = 64, device: str = "auto",
                  devices: str | Sequence[str] = (), precision: PrecisionChoice = "auto") -> pd.DataFrame:
    """Tables 5 and 15-18 (samplers): per (sampler, steps) and preset, the mean relative L2 to the fp run of the same
    sampler over seeds (`sampler_per_seed`) with its 95% bootstrap interval (ci95_low, ci95_high, n)."""
    from analysis.intervals import summarize

    runs = sampler_runs(model, presets, samplers, seeds, runs_dir, batch_size, device, devices, precision)
    per_seed, _ = sampler_per_seed(runs, seeds)
    return summarize(per_seed, ["sampler", "steps", "preset", "precision"], "rel_l2_pixels").rename(columns={"mean": "rel_l2_pixels"})


@torch.no_grad()
def warmup_per_seed(model: nn.Module, preset: str, warmups: Sequence[int], seeds: Sequence[int], steps: int,
                    device: str = "cpu", batch_size: int = 64, runs_dir: Optional[str | Path] = None) -> pd.DataFrame:
    """Tables 5 and 15-18 (warm-up) per seed: MoDiff with k full-precision warm-up steps, relative L2 to the fp sample (decoded
    image for a latent model) of the same seed, sampled on ``device`` in IEEE float32 (TF32 off on CUDA) in
    batches of ``batch_size``; columns preset, warmup_steps, precision, seed, rel_l2_pixels.

    With ``runs_dir`` the table travels as the sampler runs' summaries do: it is kept there (`warmup_location`)
    and a later call asking for the same model, preset, warm-ups, seeds and steps reads it on any device instead
    of sampling (its precision column still says where it was made); a file made for other settings is refused."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    if runs_dir is None:
        return _sample_warmup(model, preset, warmups, seeds, steps, device, batch_size)
    path, identity = warmup_location(model, preset, warmups, seeds, steps, runs_dir)
    kept = _read_warmup(path, identity)
    if kept is not None:
        return kept
    table = _sample_warmup(model, preset, warmups, seeds, steps, device, batch_size)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    write_json({"identity": identity, "environment": environment(resolve_device(device))}, _warmup_manifest(path))
    return table


def warmup_location(model: nn.Module, preset: str, warmups: Sequence[int], seeds: Sequence[int], steps: int,
                    runs_dir: str | Path) -> tuple[Path, dict[str, object]]:
    """runs_dir/warmup-<preset>-ddim<steps>.csv (its identity in the .json beside it) and that identity."""
    identity = {"model": getattr(model, "name", "model"), "preset": preset, "warmups": [int(k) for k in warmups],
                "seeds": format_seeds(seeds), "sampler": "ddim", "steps": int(steps), "spacing": paper_spacing(model)}
    return Path(runs_dir) / f"warmup-{preset}-ddim{steps}.csv", identity


def _warmup_manifest(path: Path) -> Path:
    return path.with_suffix(".json")


def warmup_paired(per_seed: pd.DataFrame, baseline: int, enough: int = 5) -> pd.DataFrame:
    """Tables 5 and 15-18 paired on the same seeds (`analysis.intervals.paired_table` of ``rel_l2_pixels``):
    every warm-up setting against ``baseline`` steps, and every setting above ``enough`` also against ``enough``,
    since the paper's "4-5 steps suffice" says that steps beyond 5 gain little. The ``baseline`` column tells the
    two kinds of rows apart; the second is left out where ``per_seed`` has no setting on each side of ``enough``."""
    pairs = [ci.paired_table(per_seed, "warmup_steps", "rel_l2_pixels", baseline)]
    measured = set(per_seed["warmup_steps"])
    if enough != baseline and enough in measured and max(measured) > enough:
        pairs.append(ci.paired_table(per_seed[per_seed["warmup_steps"] >= enough], "warmup_steps", "rel_l2_pixels",
                                     enough))
    return pd.concat(pairs, ignore_index=True)


def _read_warmup(path: Path, identity: dict[str, object]) -> Optional[pd.DataFrame]:
    """The kept table, None when there is none (the .json is written last: a table without it is unfinished)."""
    manifest = _warmup_manifest(path)
    if not (path.exists() and manifest.exists()):
        return None
    diff = identity_differences({"warmup": json.loads(manifest.read_text())["identity"]}, {"warmup": identity},
                                ("warmup",))
    if diff:
        raise ValueError(f"{path} holds warm-up results made with other settings (old -> new: {'; '.join(diff)}); "
                         f"delete it and {manifest.name}, or use another runs folder")
    return pd.read_csv(path)


def _sample_warmup(model: nn.Module, preset: str, warmups: Sequence[int], seeds: list[int], steps: int,
                   device: str, batch_size: int) -> pd.DataFrame:
    from dataclasses import replace

    runner = _on_device(model, device)
    ts = _timesteps(model, steps)
    where = resolve_device(device)
    arithmetic = analysis_precision(where)
    rows = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        x_T = md.noise(chunk, model.sample_shape).to(where)
        with float32_precision("fp32"):
            reference = md.to_images(runner, md.sample_ddim(runner, x_T, ts)).flatten(1)
        for k in warmups:
            qmodel = md.quantize(runner, replace(md.presets[preset], warmup_steps=k))
            with md.trajectory(qmodel), float32_precision("fp32"):
                out = md.to_images(qmodel, md.sample_ddim(qmodel, x_T, ts)).flatten(1)
            rel = ((out - reference).norm(dim=1) / reference.norm(dim=1)).cpu().numpy()
            rows += [{"preset": preset, "warmup_steps": k, "precision": arithmetic, "seed": s, "rel_l2_pixels": float(v)}
                     for s, v in zip(chunk, rel)]
    return pd.DataFrame(rows).sort_values(["warmup_steps", "seed"], kind="stable", ignore_index=True)


def warmup_table(model: nn.Module, preset: str, warmups: Sequence[int], seeds: Sequence[int], steps: int,
                 device: str = "cpu", batch_size: int = 64, runs_dir: Optional[str | Path] = None) -> pd.DataFrame:
    """Tables 5 and 15-18 (warm-up): per warm-up setting, the mean relative L2 to fp over seeds (`warmup_per_seed`) with its 95%
    bootstrap interval; columns preset, warmup_steps, precision, rel_l2_pixels, ci95_low, ci95_high, n."""
    from analysis.intervals import summarize

    per_seed = warmup_per_seed(model, preset, warmups, seeds, steps, device, batch_size, runs_dir)
    table = summarize(per_seed, ["preset", "warmup_steps", "precision"], "rel_l2_pixels")
    return table.rename(columns={"mean": "rel_l2_pixels"})


def bops_memory_table(model: nn.Module, presets: Sequence[str], batch_sizes: Sequence[int], steps: int) -> pd.DataFrame:
    """GBops per step and per trajectory (per image) and the MoDiff state for each batch size."""
    rows = []
    for preset in presets:
        report = preset_report(model, md.presets[preset], steps)
        for batch in batch_sizes:
            rows.append({"preset": preset, "batch": batch, "gbops_per_step": report["gbops_per_step"],
                         "gbops_per_trajectory": report["gbops_per_trajectory"],
                         "modiff_state_mb": report["modiff_state_mb_per_image"] * batch})
    return pd.DataFrame(rows)


@torch.no_grad()
def published_audit(model: nn.Module, bits: int, seeds: Sequence[int], steps: int, device: str = "cpu") -> pd.DataFrame:
    """The published code's two behaviours, measured: (1) a per-step reset makes MoDiff weight-only
    quantization; (2) one activation scale per batch tensor (up to the published batch of 64 samples) makes a
    sample depend on its batch-mates.
    Differences are measured on images (decoded for a latent model). Sampling runs on ``device`` in IEEE
    float32 (TF32 off on CUDA), four sampling runs of ``steps`` model calls each."""
    from dataclasses import replace

    ts = _timesteps(model, steps)
    runner = _on_device(model, device)
    x_T = md.noise(seeds, model.sample_shape).to(resolve_device(device))
    config = md.presets[f"published-w{bits}a{bits}-modiff"]
    with float32_precision("fp32"):
        q = md.quantize(runner, config)
        with md.trajectory(q, reset="per_step"):
            per_step = md.to_images(q, md.sample_ddim(q, x_T, ts))
        # The same weights (split-shortcut quantization included), activations in full precision.
        weight_only_model = md.quantize(runner, replace(config, activation=None, mode="direct"))
        weight_only = md.to_images(weight_only_model, md.sample_ddim(weight_only_model, x_T, ts))
        with md.trajectory(q):
            per_trajectory = md.to_images(q, md.sample_ddim(q, x_T, ts))
        with md.trajectory(q):
            alone = md.to_images(q, md.sample_ddim(q, x_T[:1], ts))
    return pd.DataFrame([
        {"check": "per-step reset vs weight-only (max |difference|)", "value": float((per_step - weight_only).abs().max())},
        {"check": "per-trajectory reset vs weight-only (max |difference|)", "value": float((per_trajectory - weight_only).abs().max())},
        {"check": f"sample {seeds[0]}: alone vs in a batch of {len(seeds)} (max |difference|, per-tensor scales)",
         "value": float((alone[0] - per_trajectory[0]).abs().max())},
    ])


def paper_tables(model: nn.Module) -> tuple[str, ...]:
    """The paper's bit-width tables for this kind of model: Table 1 (CIFAR-10 DDIM) for a pixel model,
    Tables 2 and 3 (LSUN-Bedrooms LDM-4, LSUN-Churches LDM-8) for a latent one."""
    return ("Table 2", "Table 3") if isinstance(model, md.LatentDenoiser) else ("Table 1",)


def paper_values(tables: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """The paper's numbers, with their table and cell (data/paper_values.csv), optionally only ``tables``;
    a value without a note has an empty one, one without bit widths (the paper gives none) empty bit widths."""
    from modiff.models.registry import data_dir

    values = pd.read_csv(data_dir() / "paper_values.csv", dtype={"weight_bits": "Int64", "act_bits": "Int64"})
    values["note"] = values["note"].fillna("")
    return values if tables is None else values[values["table"].isin(list(tables))].reset_index(drop=True)
