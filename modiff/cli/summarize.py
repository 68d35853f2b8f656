"""`modiff summarize`: finished runs into small folders that travel (`modiff.pipelines.summary`).

Registered on the `modiff` group by `modiff.cli.main`; kept apart so the main CLI module stays short.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from modiff.cli.options import USER_ERRORS, check_device_option, parse_seeds_option

__all__ = ["summarize_command", "image_diff_command"]


def _optional_seeds(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[int]]:
    return None if value is None else parse_seeds_option(ctx, param, value)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@click.command("summarize")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of the summaries: a run goes to OUT/<its name>, a folder of runs keeps its layout.")
@click.option("--fp-run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Full-precision run of the per-seed distances [default: the fp run beside each run].")
@click.option("--seeds", default=None, callback=_optional_seeds, help="Seeds to summarize [default: all of the run's].")
@click.option("--ref", default="fmnist-train", show_default=True,
              help="FID reference, as the notebooks use it (KID and precision/recall: fmnist-test).")
@click.option("--bootstrap-resamples", type=click.IntRange(min=10), default=300, show_default=True,
              help="Bootstrap resamples of every score (the table1 notebook's bootstrap_resamples).")
@click.option("--images", type=click.IntRange(min=0), default=128, show_default=True,
              help="Images kept, of the first seeds (the notebooks' grids show analysis_samples of them).")
@click.option("--device", default="cpu", show_default=True, callback=check_device_option,
              help="Device of the feature extraction (recorded; GPU and CPU features move FID by about 1e-4).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs summarized at once, in processes sharing the CPU cores (a paper-scale folder of runs).")
def summarize_command(runs: tuple[Path, ...], out: Path, fp_run: Optional[Path], seeds: Optional[list[int]], ref: str,
                      bootstrap_resamples: int, images: int, device: str, jobs: int) -> None:
    """Summarize finished RUNS (run folders, or folders of runs) into small folders that stand in for them:
    manifest, FID, IS, KID and precision/recall with their bootstrap intervals and resamples, per-seed
    distances to the fp run, the first images and the grid (under 1 MB for 10,000 seeds). The notebooks read
    a summary where they would read its run, so `modiff reproduce --runs DIR` rebuilds the reports from
    summaries on a machine without the runs (or a GPU). Unfinished runs, and runs being written, are refused.
    A summary that keeps every image (a full-precision run's) may be given too: it is scored again with
    today's metrics (an older one gains KID and precision/recall), its images and distances kept.

    \b
    Examples:
      modiff summarize data/runs/paper --out summaries/paper --jobs 8
      modiff reproduce --preset paper --runs summaries --set precision=bf16   # the precision the runs were sampled at
      modiff summarize data/runs/w4a4-modiff --fp-run data/runs/fp --out summaries
      modiff summarize summaries/paper/spacing-quad/fp-ddim100-tf32 --out summaries/paper/spacing-quad
    """
    from modiff.metrics.bootstrap import BootstrapConfig
    from modiff.pipelines.summary import SummarySettings, summarize

    try:
        settings = SummarySettings(ref=ref, bootstrap=BootstrapConfig(resamples=bootstrap_resamples), images=images,
                                   device=device)
        made, refused = summarize(runs, out, fp_run, settings, seeds, jobs)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    for folder in made:
        click.echo(f"summary {folder} ({_size(folder) / 1e3:.0f} kB)")
    for run, why in refused.items():
        click.echo(f"REFUSED {run}: {why}", err=True)
    if refused:
        raise SystemExit(1)


@click.command("image-diff")
@click.argument("first", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as OUT (CSV).")
def image_diff_command(first: Path, second: Path, out: Optional[Path]) -> None:
    """How far the images of SECOND moved from FIRST: two samplings of the same runs (another GPU, commit or
    session), compared seed by seed on the seeds whose images both hold. FIRST and SECOND are runs, summaries,
    or folders of them paired by their path below each; per run: identical images, differing pixels, relative
    L2 (mean with its 95% interval, largest) and the seeds that differ by more than 4 grey levels.

    \b
    Examples:
      modiff image-diff data/summaries/paper data/summaries/h100/paper
      modiff image-diff data/runs/w8a4-modiff data/runs-again/w8a4-modiff --out /tmp/agreement.csv
    """
    import pandas as pd

    from modiff.pipelines.agreement import agreement_rows
    from modiff.utils.runs import write_bytes_atomic

    try:
        table = pd.DataFrame(agreement_rows(first, second))
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if out is not None:  # written whole or not at all
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, table.to_csv(index=False).encode())
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
