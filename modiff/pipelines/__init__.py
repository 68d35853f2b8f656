"""Pipelines: library calls composed into whole jobs that write run directories.

`generate` (sampling into a run directory, one PNG per seed), `evaluate` (metrics of a run against full
precision), `record` (sampling under a recorder into a recording, `record_sampling`), `train` and
`train_ldm` (the shipped models), `cuda_graphs` (sampling steps replayed as CUDA graphs), `reproduce`
(the report notebooks), `distributed` (sampling over the ranks of torch.distributed), `summary` (small
folders that stand in for finished runs).
"""
