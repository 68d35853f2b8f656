"""Kernels of the quantized layers: MoDiff's per-sample modulation step (`modulate`, registered as a torch op;
`modulate_triton`, its two Triton kernels) and the real W8A8 backend (`real`, two torch ops; `real_triton`, its
three Triton kernels)."""
