"""Exponential moving average of network weights (Polyak averaging), as used for every sample in the paper."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    # Only trained parameters are averaged; fixed ones (e.g. Fourier-feature W) never change.
    return [p for p in model.parameters() if p.requires_grad]


class ExponentialMovingAverage:
    """shadow <- decay * shadow + (1 - decay) * param after each optimizer step.

    With use_num_updates the effective decay is min(decay, (1 + n) / (10 + n)) at the n-th update,
    so early averages are not dominated by the random initialization (reference convention).
    The shadow list follows the order of the model's trainable parameters.
    """

    def __init__(self, model: nn.Module, decay: float, use_num_updates: bool = True):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in _trainable(model)]
        self.collected_params: list[torch.Tensor] = []

    def _params(self, model: nn.Module) -> list[torch.nn.Parameter]:
        params = _trainable(model)
        if len(params) != len(self.shadow_params) or any(
                p.shape != s.shape for p, s in zip(params, self.shadow_params)):
            raise ValueError("model parameters do not match the EMA's shadow parameters")
        return params

    def current_decay(self) -> float:
        """Decay the next update will use."""
        if self.num_updates is None:
            return self.decay
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards the model's current weights."""
        decay = self.current_decay()
        if self.num_updates is not None:
            self.num_updates += 1
        params = [p.detach() for p in self._params(model)]
        # shadow + (1 - decay) (param - shadow) = decay shadow + (1 - decay) param
        torch._foreach_lerp_(self.shadow_params, params, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model`."""
        for s, p in zip(self.shadow_params, self._params(model)):
            p.copy_(s)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Save the model's current weights so `restore` can bring them back after `copy_to`."""
        self.collected_params = [p.detach().clone() for p in self._params(model)]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by `store`."""
        if not self.collected_params:
            raise RuntimeError("EMA.restore called without a preceding store")
        for c, p in zip(self.collected_params, self._params(model)):
            p.copy_(c)
        self.collected_params = []

    def to(self, device=None, dtype=None) -> "ExponentialMovingAverage":
        """Move the shadow weights (floating point dtype changes only apply to floating tensors)."""
        self.shadow_params = [s.to(device=device, dtype=dtype if s.is_floating_point() else None)
                              for s in self.shadow_params]
        return self

    def state_dict(self) -> dict[str, Any]:
        """decay, num_updates and the shadow weights (in trainable-parameter order)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow_params": list(self.shadow_params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output; shapes must match the current shadow weights."""
        shadow, num_updates = state["shadow_params"], state["num_updates"]
        if not isinstance(shadow, (list, tuple)) or not all(isinstance(a, torch.Tensor) for a in shadow):
            raise ValueError("EMA state: shadow_params must be a list of tensors")
        if len(shadow) != len(self.shadow_params) or any(
                a.shape != b.shape for a, b in zip(shadow, self.shadow_params)):
            raise ValueError("EMA state does not match the model's parameters")
        if num_updates is not None and (isinstance(num_updates, bool) or not isinstance(num_updates, int)):
            raise ValueError(f"EMA state: num_updates must be an integer or None, got {num_updates!r}")
        self.decay = float(state["decay"])
        self.num_updates = num_updates
        self.shadow_params = [s.detach().clone().to(device=b.device, dtype=b.dtype)
                              for s, b in zip(shadow, self.shadow_params)]
