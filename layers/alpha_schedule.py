"""Distillation weight alpha over a training run (``loss = alpha*distill + (1-alpha)*task``).

The value at epoch ``e`` (0-based) is, in this order:

1. linear: ``alpha_initial + (alpha_final - alpha_initial) * min(e / total_epochs, 1)``;
   with the defaults 0.8 -> 0.5 over 400 epochs: e=0 -> 0.8, 100 -> 0.725, 200 -> 0.65,
   399 -> 0.50075 (the final value is reached at ``e = total_epochs``, one past the end);
2. times ``plateau_factor ** k``, where ``k`` counts the plateaus seen so far by
   ``step_validation``: a plateau is ``plateau_patience + 1`` consecutive validation checks
   (i.e. *more than* ``plateau_patience``) without a new best loss; each one multiplies
   alpha by 0.9 once more and restarts the count, so the student leans on the ground
   truth sooner when learning stalls;
3. capped at ``late_cap`` once ``e / total_epochs >= late_fraction`` (from epoch 320 of 400),
   so the last fifth of training is driven mainly by the task loss.

With the defaults, epoch 330 gives ``min(0.5525, 0.4) = 0.4``.
"""
from __future__ import annotations

import math
from typing import Any, Dict


class DynamicAlpha:
    """Linear alpha decay, shrunk on validation plateaus and capped late in training."""

    def __init__(
        self,
        alpha_initial: float = 0.8,
        alpha_final: float = 0.5,
        total_epochs: int = 400,
        plateau_patience: int = 10,
        plateau_factor: float = 0.9,
        late_fraction: float = 0.8,
        late_cap: float = 0.4,
        min_delta: float = 0.0,
    ) -> None:
        for name, v in (("alpha_initial", alpha_initial), ("alpha_final", alpha_final), ("late_cap", late_cap)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if total_epochs <= 0:
            raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
        if plateau_patience < 0:
            raise ValueError(f"plateau_patience must be >= 0, got {plateau_patience}")
        if not 0.0 < plateau_factor <= 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1], got {plateau_factor}")
        if not 0.0 <= late_fraction <= 1.0:
            raise ValueError(f"late_fraction must be in [0, 1], got {late_fraction}")
        self.alpha_initial = float(alpha_initial)
        self.alpha_final = float(alpha_final)
        self.total_epochs = int(total_epochs)
        self.plateau_patience = int(plateau_patience)
        self.plateau_factor = float(plateau_factor)
        self.late_fraction = float(late_fraction)
        self.late_cap = float(late_cap)
        self.min_delta = float(min_delta)
        self.best_loss = math.inf
        self.num_bad_checks = 0
        self.num_plateaus = 0

    def linear(self, epoch: int) -> float:
        """The plain linear part of the schedule (step 1)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        progress = min(epoch / self.total_epochs, 1.0)
        return self.alpha_initial + (self.alpha_final - self.alpha_initial) * progress

    def value(self, epoch: int) -> float:
        """Alpha to use for ``epoch`` (0-based)."""
        alpha = self.linear(epoch) * self.plateau_factor**self.num_plateaus
        # e / total >= fraction, not e >= fraction * total: 0.55 * 100 rounds to 55.000000000000007.
        if epoch / self.total_epochs >= self.late_fraction:
            alpha = min(alpha, self.late_cap)
        return alpha

    def step_validation(self, val_loss: float) -> bool:
        """Record one validation loss; returns True when this check completes a plateau."""
        val_loss = float(val_loss)
        if math.isnan(val_loss):
            raise ValueError("validation loss is NaN")
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss = val_loss
            self.num_bad_checks = 0
            return False
        self.num_bad_checks += 1
        if self.num_bad_checks > self.plateau_patience:
            self.num_plateaus += 1
            self.num_bad_checks = 0
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"best_loss": self.best_loss, "num_bad_checks": self.num_bad_checks, "num_plateaus": self.num_plateaus}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.num_bad_checks = int(state["num_bad_checks"])
        self.num_plateaus = int(state["num_plateaus"])
