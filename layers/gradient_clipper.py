"""Gradient-norm clipping that remembers the norms it saw.

Call it between ``backward()`` and ``optimizer.step()``. With AMP the gradients are still
multiplied by the loss scale at that point, so the caller must unscale them first::

    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)          # otherwise the norm is the *scaled* norm
    norm = clipper(model.parameters())
    scaler.step(optimizer)              # skips the step itself if the grads hold inf/NaN
    scaler.update()

A non-finite norm (an AMP overflow step) leaves the gradients untouched (scaling them by
``max_norm / norm`` would turn every one into 0 or NaN) and is counted in ``nonfinite_steps``
but kept out of the history, so one overflow does not poison the mean. The caller must then
skip ``optimizer.step()``: ``GradScaler.step`` does so by itself, and the trainer checks the
returned norm, which also covers runs without AMP.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Deque, Dict, Iterable, Union

import torch
from torch import Tensor


class GradientClipper:
    """Clips the total gradient norm to ``max_norm`` and keeps the last ``history`` pre-clip norms."""

    def __init__(self, max_norm: float = 1.0, history: int = 1000, norm_type: float = 2.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if history <= 0:
            raise ValueError(f"history must be > 0, got {history}")
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self.norms: Deque[float] = deque(maxlen=int(history))
        self.total_steps = 0
        self.clipped_steps = 0
        self.nonfinite_steps = 0

    def __call__(self, parameters: Union[Tensor, Iterable[Tensor]]) -> float:
        """Clip in place; returns the total norm *before* clipping."""
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=self.norm_type)
        norm = float(total)
        self.total_steps += 1
        if not math.isfinite(norm):
            self.nonfinite_steps += 1
            return norm
        torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, total)
        self.norms.append(norm)
        if norm > self.max_norm:
            self.clipped_steps += 1
        return norm

    def stats(self) -> Dict[str, float]:
        """Mean/max/last of the remembered norms and the clipping counts (over all steps)."""
        n = len(self.norms)
        return {
            "count": float(n),
            "mean": sum(self.norms) / n if n else 0.0,
            "max": max(self.norms) if n else 0.0,
            "last": self.norms[-1] if n else 0.0,
            "clipped_steps": float(self.clipped_steps),
            "clipped_fraction": self.clipped_steps / self.total_steps if self.total_steps else 0.0,
            "nonfinite_steps": float(self.nonfinite_steps),
        }

    def state_dict(self) -> Dict[str, Any]:
        return {
            "norms": list(self.norms),
            "total_steps": self.total_steps,
            "clipped_steps": self.clipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.norms.clear()
        self.norms.extend(float(v) for v in state["norms"])
        self.total_steps = int(state["total_steps"])
        self.clipped_steps = int(state["clipped_steps"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
