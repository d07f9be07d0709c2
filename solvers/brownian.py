"""A per-sample Brownian path that stays consistent when an adaptive SDE solver rejects a step.

Adaptive SDE solvers try a step, and on rejection retry a shorter one. If the retry drew new noise, or kept
only the part of the rejected increment that the shorter step covers and then forgot the rest, the accepted
increments would be conditioned on the rejections (large increments are rejected more often) and the samples
biased, with a bias that does not vanish as the tolerance tightens. Here every value W(s) ever drawn stays
part of the path until the solver has moved past it (Rackauckas & Nie 2017, "Adaptive methods for stochastic
differential equations via natural embeddings and rejection sampling with memory", RSwM): a new point
between known ones is drawn from the Brownian bridge between its neighbours,

    W(s) | W(a), W(b) ~ N(W(a) + (s - a) / (b - a) (W(b) - W(a)),  (s - a)(b - s) / (b - a)),   a < s <= b,

and a point beyond all known ones from W(s) ~ N(W(a), s - a). So the increments of accepted steps are exact
Brownian increments whatever the accept/reject decisions were.

Each sample has its own time (the adaptive solver's per-sample step sizes), so the path is kept as tensors:
the current point (s_cur, W(s_cur)) and a sorted, +inf-padded table of the future points already drawn.
torchsde's `BrownianInterval` does the same for one shared time axis, which per-sample steps do not have.
"""
from __future__ import annotations

import torch

from solvers.common import gaussian_like


class BrownianMemory:
    """Brownian paths W_b(s), s >= 0, one per batch row, drawn lazily and kept consistent under rejection."""

    def __init__(self, batch: int, dim: int, like: torch.Tensor, generator: torch.Generator | None):
        self.generator = generator
        self.s_cur = torch.zeros(batch, device=like.device, dtype=like.dtype)
        self.w_cur = torch.zeros(batch, dim, device=like.device, dtype=like.dtype)
        self.times = torch.full((batch, 1), float("inf"), device=like.device, dtype=like.dtype)  # future points
        self.values = torch.zeros(batch, 1, dim, device=like.device, dtype=like.dtype)
        self.s_query, self.w_query = self.s_cur, self.w_cur

    def increment(self, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """W(s_cur + h) - W(s_cur) per row; the new point joins the path for rows where `active`."""
        batch, width = self.times.shape
        s_new = self.s_cur + h
        k = (self.times < s_new[:, None]).sum(1)  # known points strictly before s_new
        rows = torch.arange(batch, device=k.device)
        left = (k - 1).clamp_min(0)
        has_left = (k > 0)[:, None]
        s_left = torch.where(k > 0, self.times[rows, left], self.s_cur)
        w_left = torch.where(has_left, self.values[rows, left], self.w_cur)
        right = k.clamp_max(width - 1)
        s_right = self.times[rows, right]
        has_right = (k < width) & torch.isfinite(s_right)
        span = torch.where(has_right, s_right - s_left, torch.ones_like(s_left))
        frac = torch.where(has_right, ((s_new - s_left) / span).clamp(0.0, 1.0), torch.zeros_like(s_left))
        var = torch.where(has_right, (s_new - s_left) * (s_right - s_new) / span, s_new - s_left).clamp_min(0.0)
        w_right = torch.where(has_right[:, None], self.values[rows, right], w_left)
        z = gaussian_like(self.w_cur, self.generator)
        w_new = w_left + frac[:, None] * (w_right - w_left) + var.sqrt()[:, None] * z
        self._insert(k, s_new, w_new, active)
        self.s_query, self.w_query = s_new, w_new
        return w_new - self.w_cur

    def _insert(self, k: torch.Tensor, s_new: torch.Tensor, w_new: torch.Tensor, active: torch.Tensor) -> None:
        """Put (s_new, w_new) at sorted position k of each active row (inactive rows get +inf at the end)."""
        batch, width = self.times.shape
        k = torch.where(active, k, torch.full_like(k, width))
        s_new = torch.where(active, s_new, torch.full_like(s_new, float("inf")))
        pos = torch.arange(width + 1, device=k.device)[None, :]
        src = (pos - (pos > k[:, None]).long()).clamp(0, width - 1)
        at_k = pos == k[:, None]
        self.times = torch.where(at_k, s_new[:, None], self.times.gather(1, src))
        gathered = self.values.gather(1, src[:, :, None].expand(-1, -1, self.values.shape[2]))
        self.values = torch.where(at_k[:, :, None], w_new[:, None, :], gathered)

    def advance(self, accept: torch.Tensor) -> None:
        """Rows where `accept` move to the last queried point and forget the points up to it."""
        width = self.times.shape[1]
        self.s_cur = torch.where(accept, self.s_query, self.s_cur)
        self.w_cur = torch.where(accept[:, None], self.w_query, self.w_cur)
        passed = (self.times <= self.s_query[:, None]).sum(1) * accept.long()
        src = torch.arange(width, device=passed.device)[None, :] + passed[:, None]
        valid = src < width
        src = src.clamp_max(width - 1)
        self.times = torch.where(valid, self.times.gather(1, src), torch.full_like(self.times, float("inf")))
        self.values = self.values.gather(1, src[:, :, None].expand(-1, -1, self.values.shape[2]))

    def stored(self) -> torch.Tensor:
        """0-dim tensor: the largest number of future points any row holds (read it with other host syncs)."""
        return torch.isfinite(self.times).sum(1).max()

    def trim(self, width: int) -> None:
        """Drop table columns beyond `width` (>= `stored()`, so they hold only +inf padding)."""
        width = max(1, int(width))
        self.times, self.values = self.times[:, :width], self.values[:, :width]
