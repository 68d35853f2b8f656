"""Progress bars: tqdm's text bar everywhere, Jupyter kernels included.

`tqdm.auto` picks the widget bar inside a Jupyter kernel and, where ipywidgets is missing, warns
(`TqdmWarning: IProgress not found`) into the output of every executed notebook. The text bar needs no
widgets, and its output reads the same in a terminal, a notebook and the notebook's HTML.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from tqdm.std import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Optional[Iterable[Any]] = None, desc: Optional[str] = None, enabled: bool = True,
                 **options: Any) -> tqdm:
    """A text progress bar over ``iterable`` (or updated by hand, with ``total=``); ``enabled=False``
    shows nothing. ``options`` go to tqdm (``total``, ``unit``, ``initial``, ``mininterval``, ...)."""
    return tqdm(iterable, desc=desc, disable=not enabled, **options)
