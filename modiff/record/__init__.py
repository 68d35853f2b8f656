"""Activation recording: per-(site, step, call) statistics and full tensors of real sampling runs.

    import modiff as md
    from modiff.record import record, load_recording, Quantiles, Histogram, TensorSpec

    with record(model, sites="conv,linear", reducers=[Quantiles(), Histogram(256)], out_dir="rec") as rec:
        md.sample_ddim(model, x_T, ts, callback=rec.on_step)
    recording = load_recording("rec")
    recording.stats                    # DataFrame: site, capture, kind (raw|diff), step, t, call, reducer, statistic, value

What is measured: `recorder` (keys, memory), `sites` (the site grammar), `reducers` (statistics), `results`
(observations and result batches), `tensors` (shards and the memory budget) and `store` (the directory
layout). How it is computed: `engines` (`engines.reference`, the torch path; `engines.fused`, Triton and
CUDA C). Sampling seeds under a recorder into a directory is a pipeline: `modiff.pipelines.record`.
"""
from modiff.record.recorder import Capture, Recorder, record
from modiff.record.reducers import ChannelAbsMax, Histogram, Outliers, Quantiles, Reducer, Stats, default_reducers
from modiff.record.sites import select_sites
from modiff.record.store import Recording, load_recording
from modiff.record.tensors import TensorSpec

__all__ = [
    "Capture",
    "ChannelAbsMax",
    "Histogram",
    "Outliers",
    "Quantiles",
    "Recorder",
    "Recording",
    "Reducer",
    "Stats",
    "TensorSpec",
    "default_reducers",
    "load_recording",
    "record",
    "select_sites",
]
