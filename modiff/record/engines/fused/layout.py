"""The descriptor table shared by the fused engine (which fills it) and its kernels (which read it).

One row per (site call, row) for the summary, count and add_counts kernels, int64 fields named by
`DESCRIPTOR`; the Triton kernels read them by position and the CUDA C source gets them as #defines.
"""
from __future__ import annotations

__all__ = ["DESCRIPTOR", "STATE", "FIRST", "N_OLD", "NEW_SITE", "DATA", "PARTIAL_AT", "COUNTS"]

# int64 fields of a descriptor: one (site call, row) for the summary, count and add_counts kernels. Addresses
# point at the row's own part: partials (B, T, 2), channel extremes (B, C), the key state, the site's
# histogram ranges (grids, 2), grid table, edges, bin approximations, outlier bounds, the buffer row, and the
# key's count slots; partial_at: the first scratch row of its count programs.
DESCRIPTOR = ("part", "chmin", "chmax", "state", "first", "n_old", "n_new", "site_range", "new_site", "grid", "edges",
              "approx", "bounds", "samples", "channels", "inner", "tiles", "per_program", "data", "programs",
              "partial_at", "counts")
STATE, FIRST, N_OLD, NEW_SITE, DATA, PARTIAL_AT, COUNTS = (
    DESCRIPTOR.index(f) for f in ("state", "first", "n_old", "new_site", "data", "partial_at", "counts"))
