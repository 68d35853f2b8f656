"""Loading a state_dict into a model built from its config, with errors that say what does not match."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["load_state_dict_strict"]


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, config: Mapping[str, Any]) -> None:
    """load_state_dict(strict=True) with an error naming the first mismatches and the expected config."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        lines = [f"{what} does not match the model built from its config {dict(config)}:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                more = f" (and {len(items) - 5} more)" if len(items) > 5 else ""
                lines.append(f"  {label} ({len(items)}): {', '.join(items[:5])}{more}")
        lines.append("Check that the checkpoint and the YAML config belong together.")
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=True)
