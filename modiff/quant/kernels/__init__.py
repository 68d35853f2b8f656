"""Kernels of the quantized layers: MoDiff's per-sample modulation step (`modulate`, registered as a torch op;
`modulate_triton`, its two Triton kernels)."""
