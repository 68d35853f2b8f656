"""The fused recording engine: `engine` (FusedEngine, arenas and site plans), `triton_kernels` (scan,
summary, count, add_counts) and `cuda_count` (the count pass in CUDA C with shared-memory histograms)."""
