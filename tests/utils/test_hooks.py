"""The one hook mechanism: named, removable, stateful hooks; removal on errors; module selection."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from modiff.utils.hooks import Capture, HookRegistry, ModelHook, attach
from modiff.utils.selection import module_types, select_modules


class Counter(ModelHook):
    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.calls += 1

    def reset_state(self) -> None:
        self.calls = 0


class Double(ModelHook):
    def post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        output.mul_(2)


def test_named_hooks_register_run_reset_and_remove() -> None:
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    plain = layer(x)
    registry = HookRegistry.of(layer)
    counter = Counter()
    registry.register("count", counter)
    registry.register("double", Double())
    assert registry.names() == ["count", "double"] and registry.get("count") is counter
    assert len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1  # only what a hook overrides
    torch.testing.assert_close(layer(x), 2 * plain, rtol=0, atol=0)
    layer(x)
    assert counter.calls == 2
    HookRegistry.of(layer).reset_state()
    assert counter.calls == 0
    with pytest.raises(ValueError, match="already has a hook named 'count'"):
        registry.register("count", Counter())
    assert registry.remove("count") is counter
    registry.remove("double")
    assert not layer._forward_pre_hooks and not layer._forward_hooks and "_modiff_hooks" not in layer.__dict__
    with pytest.raises(KeyError, match="no hook named 'count'"):
        registry.remove("count")
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=0)


def test_attach_removes_every_hook_after_an_error() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with attach("count", [(a, Counter()), (b, Counter())]):
            assert HookRegistry.of(a).names() == ["count"] and HookRegistry.of(b).names() == ["count"]
            raise RuntimeError("boom")
    assert not a._forward_pre_hooks and not b._forward_pre_hooks
    with pytest.raises(ValueError, match="already has a hook"):  # the second registration on `a` fails ...
        with attach("count", [(a, Counter()), (a, Counter())]):
            pass
    assert not a._forward_pre_hooks  # ... and the first is removed again


def test_a_hook_must_act() -> None:
    with pytest.raises(TypeError, match="overrides neither"):
        HookRegistry.of(nn.Linear(2, 2)).register("idle", ModelHook())
    with pytest.raises(TypeError, match="must be a ModelHook"):
        HookRegistry.of(nn.Linear(2, 2)).register("fn", lambda *a: None)  # type: ignore[arg-type]


def test_capture_keeps_inputs_and_outputs_per_call() -> None:
    layer = nn.Linear(2, 2)
    inputs, outputs = Capture("input"), Capture("output", keep=lambda out: out.sum().item())
    xs = [torch.randn(1, 2), torch.randn(1, 2)]
    with attach("in", [(layer, inputs)]), attach("out", [(layer, outputs)]):
        ys = [layer(x) for x in xs]
    assert all(torch.equal(a, b) for a, b in zip(inputs.values, xs))
    assert outputs.values == [y.sum().item() for y in ys]
    inputs.reset_state()
    assert inputs.values == []
    with pytest.raises(ValueError, match="'input' or 'output'"):
        Capture("both")  # type: ignore[arg-type]


def test_select_modules_by_type_and_pattern() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Conv1d(2, 2, 1))
    assert module_types(net[0]) == {"Conv2d"}
    assert select_modules(net, ("Conv1d", "Conv2d", "Linear")) == ["0", "1.0", "2"]
    assert select_modules(net, ("Conv2d", "Linear"), exclude=("1.*",)) == ["0"]
    assert select_modules(net, None, include=("1*",)) == ["1", "1.0", "1.1"]  # any type; never the root
    assert select_modules(net, ("Linear",), include=("0", "1.0")) == ["1.0"]
    with pytest.raises(ValueError, match=r"\['0'\] matched no module of type Linear"):
        select_modules(net, ("Linear",), include=("0", "1.0"), every_pattern_hits=True)
