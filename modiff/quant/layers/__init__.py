"""Quantized layers: `direct` (QuantLayer, the activation quantizer, the attention core), `modulated`
(ModulatedLayer: MoDiff and caching, state across steps) and `state` (the per-layer state and phases)."""
