"""Per-step gradient warnings and per-epoch summaries (time, ETA, memory, TensorBoard).

``log_step`` is meant to be called after clipping with the *pre-clip* norm
(``layers.gradient_clipper``). A norm above ``grad_high`` suggests exploding gradients,
one below ``grad_low`` vanishing ones (or a detached graph); a non-finite norm is also
reported. Warnings go to ``logger`` and are counted in ``warnings``, which ``state_dict`` /
``load_state_dict`` carry over a resume.

``end_epoch``, called once per epoch (the trainer calls ``start_epoch`` before the first
batch and ``end_epoch`` after validation, before writing checkpoints):

* measures the epoch from the previous ``start_epoch`` (without one, from the previous
  ``end_epoch`` or the construction);
* estimates the ETA as the mean epoch time times the epochs left (epochs are 0-based, so
  after epoch ``e`` there are ``total_epochs - e - 1``);
* reports peak memory: CUDA max allocated during the epoch when CUDA is initialised, else
  the process' peak RSS;
* writes every metric to TensorBoard under ``epoch/<name>`` and returns the summary line
  (also passed to ``logger``).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def peak_memory_mb() -> Optional[float]:
    """Peak CUDA memory allocated (if CUDA is in use) else peak process RSS, in MiB; None if unknown."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but bytes on macOS.
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class TrainingMonitor:
    """Collects warnings and epoch timings; optionally writes to a TensorBoard SummaryWriter."""

    def __init__(
        self,
        total_epochs: int,
        writer: Any = None,
        logger: Callable[[str], Any] = print,
        grad_high: float = 10.0,
        grad_low: float = 1e-6,
        step_scalars: bool = True,
    ) -> None:
        """`step_scalars=False`: `log_step` only warns; the caller writes per-step scalars."""
        if total_epochs <= 0:
            raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
        if not 0 <= grad_low < grad_high:
            raise ValueError(f"need 0 <= grad_low < grad_high, got {grad_low}, {grad_high}")
        self.total_epochs = int(total_epochs)
        self.writer = writer
        self.logger = logger
        self.grad_high = float(grad_high)
        self.grad_low = float(grad_low)
        self.step_scalars = bool(step_scalars)
        self.warnings = 0
        self.epoch_times: List[float] = []
        self._epoch_start = time.perf_counter()

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to go on counting (the warnings so far)."""
        return {"warnings": self.warnings}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.warnings = int(state.get("warnings", 0))

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def start_epoch(self) -> None:
        """Mark the start of an epoch (also resets the CUDA peak-memory counter)."""
        self._epoch_start = time.perf_counter()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    def log_step(self, step: int, grad_norm: float, losses: Mapping[str, Any], lr: float) -> Optional[str]:
        """Record one optimiser step; returns the warning text if the grad norm is suspicious."""
        grad_norm = _as_float(grad_norm)
        if self.step_scalars:
            self._scalar("train/grad_norm", grad_norm, step)
            self._scalar("train/lr", float(lr), step)
            for name, value in losses.items():
                self._scalar(f"train/{name}", _as_float(value), step)

        if not math.isfinite(grad_norm):
            problem = "is not finite"
        elif grad_norm > self.grad_high:
            problem = f"> {self.grad_high:g} (exploding?)"
        elif grad_norm < self.grad_low:
            problem = f"< {self.grad_low:g} (vanishing?)"
        else:
            return None
        self.warnings += 1
        message = f"warning: step {step}: gradient norm {grad_norm:.3g} {problem}"
        self.logger(message)
        return message

    def end_epoch(self, epoch: int, metrics: Mapping[str, Any], step: Optional[int] = None) -> str:
        """Close epoch ``epoch`` (0-based): TensorBoard scalars (at ``step``, default ``epoch``)
        plus a one-line summary."""
        now = time.perf_counter()
        elapsed = now - self._epoch_start
        self._epoch_start = now
        self.epoch_times.append(elapsed)
        remaining = max(self.total_epochs - epoch - 1, 0)
        eta = sum(self.epoch_times) / len(self.epoch_times) * remaining
        memory = peak_memory_mb()

        step = epoch if step is None else step
        values = {name: _as_float(v) for name, v in metrics.items()}
        for name, value in values.items():
            self._scalar(f"epoch/{name}", value, step)
        self._scalar("epoch/time_s", elapsed, step)
        self._scalar("epoch/eta_s", eta, step)
        self._scalar("epoch/grad_warnings", self.warnings, step)
        if memory is not None:
            self._scalar("epoch/memory_mb", memory, step)

        parts = [
            f"epoch {epoch + 1}/{self.total_epochs}",
            f"time {elapsed:.1f}s",
            f"eta {_format_duration(eta)}",
            f"mem {memory:.0f} MiB" if memory is not None else "mem n/a",
        ]
        parts += [f"{name} {value:.4g}" for name, value in values.items()]
        if self.warnings:
            parts.append(f"grad warnings {self.warnings}")
        line = " | ".join(parts)
        self.logger(line)
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()
        return line
