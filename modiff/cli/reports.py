"""`modiff reproduce`: the notebooks run into a report folder (`modiff.pipelines.reproduce`); `modiff report-diff`:
a regenerated report against the committed one (`modiff.pipelines.report_diff`).

Registered on the `modiff` group by `modiff.cli.main`; kept apart so the main CLI module stays short.
"""
from __future__ import annotations

from pathlib import Path

import click

from modiff.cli.options import USER_ERRORS

__all__ = ["reproduce", "report_diff_command"]


@click.command()
@click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: minutes on a CPU; paper: paper-scale sample counts (GPU).")
@click.option("--model", default="fmnist-ddim", show_default=True,
              help="A preset (fmnist-ddim, fmnist-ldm) or an exported folder; reports go to REPORTS/PRESET-MODEL.")
@click.option("--reports", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"), show_default=True)
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("data/runs"), show_default=True,
              help="Runs under RUNS/<name>/ are reused: full runs, or their summaries (`modiff summarize`).")
@click.option("--notebook", "--notebooks", "notebooks", multiple=True,
              help="Run only these notebooks (repeatable, or comma-separated).")
@click.option("--set", "overrides", multiple=True,
              help="Override a preset parameter: num_samples=8, analysis_samples=4, steps=50, calibrate=true, adaround_iters=5000 "
                   "(repeatable).")
@click.option("--index-only", is_flag=True, help="Rewrite index.html and index.md from the report folder as it is; "
                                                 "run no notebook.")
def reproduce(preset: str, model: str, reports: Path, runs: Path, notebooks: tuple[str, ...], overrides: tuple[str, ...],
              index_only: bool) -> None:
    """Run every notebook with papermill and write reports/PRESET/ (reports/PRESET-MODEL/ for another model
    than fmnist-ddim): the main job.

    \b
    Examples:
      modiff reproduce
      modiff reproduce --preset paper
      modiff reproduce --model fmnist-ldm --notebooks fig1b_activations,fig3_compensation,table1_bitwidth
      modiff reproduce --notebook model_card --reports /tmp/reports --set num_samples=8
      modiff reproduce --preset paper --index-only
      modiff reproduce --preset paper --set devices=cuda:0,cuda:1    # runs made by two torch.distributed ranks
      modiff reproduce --preset paper --runs data/summaries --set precision=tf32 --set calibrate=false  # the committed summaries, no GPU

    Each notebook's start and end (its time, its runs made and reused, the time so far) are printed on
    stderr as it goes.
    """
    from modiff.pipelines.distributed import torchrun_devices
    from modiff.pipelines.reproduce import parse_override, rebuild_index, report_name
    from modiff.pipelines.reproduce import reproduce as run_all

    try:
        if index_only:
            click.echo(f"index: {rebuild_index(preset, model, reports)}")
            return
        parsed = dict(parse_override(item) for item in overrides)
        devices = torchrun_devices(str(parsed.get("device", "auto")))  # under torchrun: rank 0 uses every rank's device
        if devices is not None and not devices:
            return  # another rank of a torchrun job: rank 0 runs the notebooks
        if devices:
            parsed.setdefault("devices", ",".join(devices))
        chosen = [name.strip() for item in notebooks for name in item.split(",") if name.strip()]
        results = run_all(preset, model, reports, runs, chosen or None, parsed,
                          progress=lambda line: click.echo(line, err=True))
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    for r in results:
        click.echo(f"{'ok    ' if r.ok else 'FAILED'} {r.name} ({r.seconds} s){'' if r.ok else ': ' + r.error.splitlines()[-1]}")
    click.echo(f"index: {reports / report_name(preset, model) / 'index.html'}")
    if not all(r.ok for r in results):
        raise SystemExit(1)


@click.command("report-diff")
@click.argument("committed", type=click.Path(file_okay=False, path_type=Path))
@click.argument("regenerated", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the page as OUT (Markdown), and the per-table rows as OUT with .csv beside it.")
def report_diff_command(committed: Path, regenerated: Path, out: Path | None) -> None:
    """How far each table of REGENERATED moved from COMMITTED: the summary's verdicts on the paper's claims,
    numeric and text cells changed, the largest relative change, and how many estimates with a 95% interval
    still lie inside the committed interval.

    \b
    Examples:
      modiff reproduce --reports /tmp/reports
      modiff report-diff reports/quick /tmp/reports/quick
      modiff report-diff reports/quick /tmp/reports/quick --out /tmp/quick-diff.md
    """
    from modiff.pipelines.report_diff import compare_reports, compare_verdicts, render

    from modiff.utils.runs import write_bytes_atomic

    if out is not None and not out.parent.is_dir():
        raise click.BadParameter(f"the folder {out.parent} does not exist: create it first, or write elsewhere",
                                 param_hint="--out")
    try:
        table = compare_reports(committed, regenerated)
        verdicts = compare_verdicts(committed, regenerated)
        text = render(table, verdicts, committed, regenerated).markdown()
        if out is not None:  # each file whole or not at all
            write_bytes_atomic(out, text.encode())
            write_bytes_atomic(out.with_suffix(".csv"), table.to_csv(index=False).encode())
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from err
    click.echo(text, nl=False)
