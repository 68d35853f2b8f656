"""Selecting modules of a model: one function for quantization, recording and counting.

A module is selected when one of its type names is in `types` (None: any type), its fully qualified
name matches one of the `include` fnmatch patterns (empty: every name) and none of the `exclude`
patterns. The type names of a module are its class name, the Conv/Linear base it derives from, and for a
quantized wrapper (a module with a `kind` string and a `weight` parameter) the layer it wraps. Only a
model's network is searched (`network_modules`): a latent model's first stage is never selected, nor
is the root module.
"""
from __future__ import annotations

import fnmatch
from typing import Collection, Iterator, Optional, Sequence

from torch import nn

__all__ = ["module_types", "network_modules", "select_modules"]


def network_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules quantization, recording and counting may touch: a Denoiser's network
    (`model.network_modules()`, which leaves a latent model's first stage out), or every module of any
    other model."""
    own = getattr(model, "network_modules", None)
    return own() if callable(own) else model.named_modules()


def module_types(module: nn.Module) -> frozenset[str]:
    """The type names a module answers to: its class name, the layer it wraps, and its Conv/Linear base."""
    names = {type(module).__name__}
    kind = getattr(module, "kind", None)
    if isinstance(kind, str) and isinstance(getattr(module, "weight", None), nn.Parameter):
        names.add(kind)  # a QuantLayer-like wrapper of a Conv/Linear
    for base in (nn.Conv1d, nn.Conv2d, nn.Linear):
        if isinstance(module, base):
            names.add(base.__name__)
    return frozenset(names)


def select_modules(model: nn.Module, types: Optional[Collection[str]], include: Sequence[str] = (),
                   exclude: Sequence[str] = (), *, every_pattern_hits: bool = False) -> list[str]:
    """Qualified names of the selected modules of `model`, in `named_modules()` order.

    every_pattern_hits: raise a ValueError naming the include patterns that selected nothing (a typo
    fails loudly instead of selecting less).
    """
    wanted = None if types is None else frozenset(types)
    names: list[str] = []
    used = dict.fromkeys(include, False)
    for name, module in network_modules(model):
        if not name or (wanted is not None and not (module_types(module) & wanted)):
            continue
        hits = [p for p in include if fnmatch.fnmatchcase(name, p)]
        if include and not hits:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        used.update(dict.fromkeys(hits, True))
        names.append(name)
    unused = [p for p, hit in used.items() if not hit]
    if every_pattern_hits and unused:
        what = "any type" if wanted is None else ", ".join(sorted(wanted))
        raise ValueError(
            f"pattern(s) {unused} matched no module of type {what}; names look like "
            f"{[n for n, _ in network_modules(model) if n][:5]}. Add 'all' to the spec to select modules "
            f"of any type (containers, norms)."
        )
    return names
