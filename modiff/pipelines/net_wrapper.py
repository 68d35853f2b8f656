"""`NetWrapper`: the base of modules that wrap a denoiser's network for a run (`CompiledNet`, `PaddedBatch`,
`CUDAGraphed`), so that code written for the network (`net.sample_shape`, ...) works on the wrapper."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["NetWrapper"]


class NetWrapper(nn.Module):
    """Attributes the wrapper lacks are read from ``self.net``. ``_inner`` names the attribute that holds the
    wrapped module: while it is missing (during ``__init__``) its lookup fails instead of recursing."""

    _inner = "net"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner:
                raise
            return getattr(self.net, name)
