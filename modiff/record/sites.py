"""Recording sites: which modules of a model the recorder observes.

Grammar of a site spec (a comma-separated string, or a list of the same tokens):

    spec    := token ("," token)*
    token   := type | pattern | "!" pattern
    type    := "conv"  (Conv1d and Conv2d) | "conv1d" | "conv2d" | "linear"
             | "all"   (any module)         | "type:ClassName"   (exact class name, e.g. type:GroupNorm)
    pattern := an fnmatch pattern on fully qualified module names, e.g. net.mid.*, net.up.0.block.0.conv1

A module is a site when its type matches one of the type tokens (none given: Conv1d, Conv2d, Linear,
i.e. what a quantizer sees), its name matches one of the include patterns (none given: every name) and
no "!" pattern. The root module (name "") is never a site, and a Denoiser offers only its network
(`network_modules()`: a latent model's first stage is never a site). Quantized wrappers (modiff QuantLayer /
ModulatedLayer) count as the layer they wrap: their `.kind` ("Conv2d", "Linear") is their type.
Every include pattern must select at least one module, so a typo fails loudly.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence, Union

from torch import nn

from modiff.quant.api import network_modules

__all__ = ["SiteSpec", "select_sites", "site_types", "parse_site_spec"]

SiteSpec = Union[str, Sequence[str]]

_TYPE_KEYWORDS: dict[str, frozenset[str]] = {
    "conv": frozenset({"Conv1d", "Conv2d"}),
    "conv1d": frozenset({"Conv1d"}),
    "conv2d": frozenset({"Conv2d"}),
    "linear": frozenset({"Linear"}),
}
_DEFAULT_TYPES = frozenset({"Conv1d", "Conv2d", "Linear"})
_ALL = "all"


def site_types(module: nn.Module) -> frozenset[str]:
    """The type names a module answers to: its class name, the layer it wraps, and its Conv/Linear base."""
    names = {type(module).__name__}
    kind = getattr(module, "kind", None)
    if isinstance(kind, str) and isinstance(getattr(module, "weight", None), nn.Parameter):
        names.add(kind)  # a QuantLayer-like wrapper of a Conv/Linear
    for base in (nn.Conv1d, nn.Conv2d, nn.Linear):
        if isinstance(module, base):
            names.add(base.__name__)
    return frozenset(names)


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
    names: list[str] = []
    used = {p: False for p in include}
    for name, module in network_modules(model):
        if not name or (types is not None and not (site_types(module) & types)):
            continue
        hits = [p for p in include if fnmatch.fnmatchcase(name, p)]
        if include and not hits:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        used.update({p: True for p in hits})
        names.append(name)
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        what = "any type" if types is None else ", ".join(sorted(types))
        raise ValueError(
            f"site pattern(s) {unused} matched no module of type {what}; names look like "
            f"{[n for n, _ in network_modules(model) if n][:5]}. Add 'all' to the spec to select modules "
            f"of any type (containers, norms)."
        )
    if not names:
        raise ValueError(f"site spec {spec!r} selects no module of {type(model).__name__}")
    return names
