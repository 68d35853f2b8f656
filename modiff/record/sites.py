"""Recording sites: which modules of a model the recorder observes.

Grammar of a site spec (a comma-separated string, or a list of the same tokens):

    spec    := token ("," token)*
    token   := type | pattern | "!" pattern
    type    := "conv"  (Conv1d and Conv2d) | "conv1d" | "conv2d" | "linear"
             | "all"   (any module)         | "type:ClassName"   (exact class name, e.g. type:GroupNorm)
    pattern := an fnmatch pattern on fully qualified module names, e.g. net.mid.*, net.up.0.block.0.conv1

A module is a site when its type matches one of the type tokens (none given: Conv1d, Conv2d, Linear,
i.e. what a quantizer sees), its name matches one of the include patterns (none given: every name) and
no "!" pattern (`modiff.utils.selection.select_modules`, which quantization uses too). The root module (name "") is never a site, and a Denoiser offers only its network
(`network_modules()`: a latent model's first stage is never a site). Quantized wrappers (modiff QuantLayer /
ModulatedLayer) count as the layer they wrap: their `.kind` ("Conv2d", "Linear") is their type.
Every include pattern must select at least one module, so a typo fails loudly.
"""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from modiff.utils.selection import select_modules

__all__ = ["SiteSpec", "select_sites", "parse_site_spec"]

SiteSpec = Union[str, Sequence[str]]

_TYPE_KEYWORDS: dict[str, frozenset[str]] = {
    "conv": frozenset({"Conv1d", "Conv2d"}),
    "conv1d": frozenset({"Conv1d"}),
    "conv2d": frozenset({"Conv2d"}),
    "linear": frozenset({"Linear"}),
}
_DEFAULT_TYPES = frozenset({"Conv1d", "Conv2d", "Linear"})
_ALL = "all"


def parse_site_spec(spec: SiteSpec) -> tuple[frozenset[str] | None, list[str], list[str]]:
    """(type names or None for any type, include patterns, exclude patterns) of a site spec."""
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    if not all(isinstance(t, str) for t in tokens):
        raise TypeError(f"sites must be a string or a list of strings, got {spec!r}")
    tokens = [t.strip() for t in tokens if t.strip()]
    if not tokens:
        raise ValueError(f"empty site spec {spec!r}; use e.g. 'conv,linear' or 'net.mid.*'")
    types: set[str] = set()
    any_type = False
    include: list[str] = []
    exclude: list[str] = []
    for token in tokens:
        lower = token.lower()
        if lower in _TYPE_KEYWORDS:
            types |= _TYPE_KEYWORDS[lower]
        elif lower == _ALL:
            any_type = True
        elif token.startswith("type:"):
            types.add(token[len("type:"):])
        elif token.startswith("!"):
            exclude.append(token[1:])
        else:
            include.append(token)
    if any_type:
        return None, include, exclude
    return (frozenset(types) or _DEFAULT_TYPES), include, exclude


def select_sites(model: nn.Module, spec: SiteSpec = "conv,linear") -> list[str]:
    """Qualified names of the modules of `model` that `spec` selects, in `model.named_modules()` order.

        select_sites(denoiser, "conv,linear")          # every Conv/Linear (the default)
        select_sites(denoiser, "net.mid.*")             # Conv/Linear layers of the middle block
        select_sites(denoiser, "all,net.mid")           # the middle block container itself
        select_sites(denoiser, "linear,!net.temb.*")    # Linear layers except the time embedding
    """
    types, include, exclude = parse_site_spec(spec)
    names = select_modules(model, types, include, exclude, every_pattern_hits=True)
    if not names:
        raise ValueError(f"site spec {spec!r} selects no module of {type(model).__name__}")
    return names
