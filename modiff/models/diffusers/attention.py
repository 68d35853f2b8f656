"""MACs of the attention matmuls of a diffusers network, counted on a real (or meta-device) forward.

diffusers computes attention inside processors (scaled_dot_product_attention), with no module around the
matmuls, so the counting hooks sit on the `Attention` modules and read their inputs: N query tokens
(``hidden_states``: (B, N, C) or a (B, C, H, W) map), M key tokens (``encoder_hidden_states`` for
cross-attention, else N). Per image: q k^T costs N M d_q and attn v costs N M d_v multiply-adds, d the
projected width (heads x head dim): the convention of `modiff.quant.cost` (2 N^2 C for the DDIM UNet's
single-head self-attention).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["AttentionMacs", "attention_modules"]


def attention_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The diffusers `Attention` modules of `net` (anything with to_q, to_k, to_v and a processor)."""
    return [(name, m) for name, m in net.named_modules()
            if all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "processor"))]


def _tokens(x: torch.Tensor) -> int:
    return x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]


class AttentionMacs:
    """``with AttentionMacs(net) as counter: net(...)``; then ``counter.macs`` holds the MACs per image
    (per row of the batch: under classifier-free guidance, per branch)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.macs = 0
        self._handles: list[RemovableHandle] = []

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context: Optional[torch.Tensor] = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        queries = _tokens(hidden)
        keys = queries if context is None else _tokens(context)
        self.macs += queries * keys * (module.to_q.weight.shape[0] + module.to_v.weight.shape[0])  # also quantized

    def __enter__(self) -> "AttentionMacs":
        self.macs = 0
        for _, module in attention_modules(self.net):
            self._handles.append(module.register_forward_pre_hook(self._count, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
