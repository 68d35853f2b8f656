"""Quantized layers: `direct` (QuantLayer, the activation quantizer, the attention core), `modulated`
(ModulatedLayer: MoDiff and caching, state across steps), `state` (the per-layer state and phases) and `real`
(the real W8A8 backend's layers: the kernels on CUDA, the simulator elsewhere)."""
