"""One hook mechanism for the whole toolkit: named, removable, stateful hooks on modules.

As diffusers' `hooks.py`: a `ModelHook` acts before a module's forward (`pre_forward(module, args)`)
and/or after it (`post_forward(module, args, output)`), and keeps state across calls that
`reset_state()` clears. `HookRegistry.of(module)` holds a module's hooks by name (one hook per name and
module); `attach(name, pairs)` registers hooks for the length of a `with` block and removes them on exit,
also after an exception. Only the methods a hook class overrides become torch hooks, so a module with a
post-forward hook alone has no pre-hook (`modiff.pipelines.cuda_graphs` reads torch's hook dicts to
decide whether a network call may be replayed). Hooks run in the order they were registered.

Users: `trajectory()` (the MoDiff step bookkeeping, a pre-hook on the model), the recorder (model calls,
site inputs and outputs), BOP counting (`modiff.quant.cost`), calibration (`modiff.quant.ptq`) and
feature capture (`Capture`, also used by `analysis`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Capture", "HookRegistry", "ModelHook", "attach"]

_ATTRIBUTE = "_modiff_hooks"


class ModelHook:
    """Base class: override `pre_forward`, `post_forward` or both; `reset_state` clears what the hook keeps."""

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Called before `module.forward` with its positional arguments."""

    def post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Called after `module.forward` with its positional arguments and output."""

    def reset_state(self) -> None:
        """Forget what the hook kept (called by `HookRegistry.reset_state`)."""


def _overrides(hook: ModelHook, method: str) -> bool:
    return getattr(type(hook), method) is not getattr(ModelHook, method)


class HookRegistry:
    """The named hooks of one module. Kept on the module itself while it has any."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._hooks: dict[str, tuple[ModelHook, list[RemovableHandle]]] = {}

    @classmethod
    def of(cls, module: nn.Module) -> "HookRegistry":
        """The registry of `module` (an empty one, attached on the first `register`, if it has none)."""
        registry = module.__dict__.get(_ATTRIBUTE)
        return registry if registry is not None else cls(module)

    def register(self, name: str, hook: ModelHook) -> None:
        if not isinstance(hook, ModelHook):
            raise TypeError(f"hook must be a ModelHook, got {type(hook).__name__}")
        if name in self._hooks:
            raise ValueError(f"{type(self.module).__name__} already has a hook named {name!r}; remove it first")
        if not (_overrides(hook, "pre_forward") or _overrides(hook, "post_forward")):
            raise TypeError(f"{type(hook).__name__} overrides neither pre_forward nor post_forward")
        handles = []
        if _overrides(hook, "pre_forward"):
            handles.append(self.module.register_forward_pre_hook(hook.pre_forward))
        if _overrides(hook, "post_forward"):
            handles.append(self.module.register_forward_hook(hook.post_forward))
        self._hooks[name] = (hook, handles)
        self.module.__dict__[_ATTRIBUTE] = self

    def remove(self, name: str) -> ModelHook:
        """Remove the hook `name` (a KeyError if there is none) and return it."""
        if name not in self._hooks:
            raise KeyError(f"{type(self.module).__name__} has no hook named {name!r}; it has {sorted(self._hooks)}")
        hook, handles = self._hooks.pop(name)
        for handle in handles:
            handle.remove()
        if not self._hooks:
            self.module.__dict__.pop(_ATTRIBUTE, None)
        return hook

    def get(self, name: str) -> Optional[ModelHook]:
        entry = self._hooks.get(name)
        return None if entry is None else entry[0]

    def names(self) -> list[str]:
        return list(self._hooks)

    def reset_state(self) -> None:
        for hook, _ in self._hooks.values():
            hook.reset_state()


@contextlib.contextmanager
def attach(name: str, pairs: Iterable[tuple[nn.Module, ModelHook]]) -> Iterator[None]:
    """Register each hook on its module under `name` inside the block; all are removed on exit."""
    registered: list[nn.Module] = []
    try:
        for module, hook in pairs:
            HookRegistry.of(module).register(name, hook)
            registered.append(module)
        yield
    finally:
        for module in reversed(registered):
            HookRegistry.of(module).remove(name)


def _first_detached(args: tuple[Any, ...]) -> Any:
    return args[0].detach() if isinstance(args[0], torch.Tensor) else args[0]


def _detached(output: Any) -> Any:
    return output.detach() if isinstance(output, torch.Tensor) else output


class Capture(ModelHook):
    """Keeps what a module sees at every call, in `values`: `keep(args)` of its positional inputs
    (`what="input"`; default the first one, detached) or `keep(output)` (`what="output"`; default the
    output, detached)."""

    def __init__(self, what: Literal["input", "output"] = "output", keep: Optional[Callable[[Any], Any]] = None):
        if what not in ("input", "output"):
            raise ValueError(f"what must be 'input' or 'output', got {what!r}")
        self.what = what
        self.keep = keep or (_first_detached if what == "input" else _detached)
        self.values: list[Any] = []

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.what == "input":
            self.values.append(self.keep(args))

    def post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.what == "output":
            self.values.append(self.keep(output))

    def reset_state(self) -> None:
        self.values.clear()
