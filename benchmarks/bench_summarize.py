"""`modiff summarize` over a folder of runs, one run at a time against --jobs N, side by side in one process.

    python benchmarks/bench_summarize.py data/runs/paper-fmnist-ldm --jobs 1,2 --out benchmarks/results/summarize_cpu.json

A paper-scale sitting samples a Table 1 row in 8-100 s on one GPU; summarizing it (classifier features of
10,000 images, 300 bootstrap FIDs, per-seed distances to fp) takes a CPU process about as long, so a watcher
that summarizes one run at a time falls behind the sampler. Each setting writes into a fresh folder (nothing
reused); the seconds include the worker processes' start.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from modiff.metrics.bootstrap import BootstrapConfig
from modiff.pipelines.summary import SummarySettings, find_runs, summarize
from modiff.utils.runs import environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a folder of finished runs (with their fp run)")
    parser.add_argument("--jobs", default="1,2", help="comma-separated job counts, timed in this order")
    parser.add_argument("--bootstrap-resamples", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = parser.parse_args()
    settings = SummarySettings(bootstrap=BootstrapConfig(resamples=args.bootstrap_resamples))
    rows = []
    for jobs in (int(j) for j in args.jobs.split(",")):
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            made, refused = summarize([args.runs], out, settings=settings, jobs=jobs)
            seconds = time.perf_counter() - started
        rows.append({"jobs": jobs, "runs": len(made), "refused": len(refused), "seconds": round(seconds, 2),
                     "seconds_per_run": round(seconds / max(1, len(made)), 2)})
        print(rows[-1], flush=True)
    for row in rows:
        row["speedup_vs_first"] = round(rows[0]["seconds"] / row["seconds"], 2)
    result = {"runs_folder": str(args.runs), "runs_found": len(find_runs(args.runs)), "cpu_count": os.cpu_count(),
              "bootstrap_resamples": args.bootstrap_resamples, "rows": rows, "environment": environment()}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
