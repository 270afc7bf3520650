"""Early stopping on validation loss and (optionally) validation mAP.

Rules, checked once per validated epoch (epochs are the caller's numbers, 0-based):

* an epoch *improves* if the val loss drops below the best so far by more than
  ``min_delta``, or the val mAP (when given) rises above the best so far by more than
  ``min_delta``; an improvement in either metric resets the bad-epoch counter. ``val_map``
  may be None on epochs where mAP was not evaluated; only the loss counts then;
* before ``min_epoch`` it never stops (the counter still runs, so at ``min_epoch`` it may
  stop at once if nothing improved during the preceding epochs);
* inside the strict window ``strict_window[0] <= epoch < strict_window[1]`` (half-open,
  default epochs 100..119) it stops after ``patience // 2`` epochs without improvement;
* from ``strict_window[1]`` on it stops after ``patience`` epochs without improvement.

``reason`` tells why it stopped, in the 1-based epoch numbers of the training log, e.g. "no
val-loss/mAP improvement in 10 validated epochs in the strict window [100, 120) (epoch 113; best
at epoch 103)"; ``metric`` names what is watched. The decision is taken afresh at every step,
so a resumed run (``load_state_dict``) with more patience goes on until its own limit.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple


class SmartEarlyStopping:
    """Stops training when neither val loss nor val mAP has improved for long enough."""

    def __init__(
        self,
        patience: int = 20,
        min_epoch: int = 100,
        strict_window: Tuple[int, int] = (100, 120),
        min_delta: float = 0.0,
        metric: str = "val-loss/mAP",
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_epoch < 0:
            raise ValueError(f"min_epoch must be >= 0, got {min_epoch}")
        if len(strict_window) != 2 or strict_window[0] > strict_window[1]:
            raise ValueError(f"strict_window must be (start, end) with start <= end, got {strict_window}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.patience = int(patience)
        self.min_epoch = int(min_epoch)
        self.strict_window = (int(strict_window[0]), int(strict_window[1]))
        self.min_delta = float(min_delta)
        self.metric = metric
        self.best_loss = math.inf
        self.best_map = -math.inf
        self.best_epoch = -1
        self.num_bad_epochs = 0
        self.should_stop = False
        self.reason = ""

    def patience_at(self, epoch: int) -> int:
        """Bad epochs tolerated at ``epoch`` (halved inside the strict window)."""
        start, end = self.strict_window
        return max(1, self.patience // 2) if start <= epoch < end else self.patience

    def stops_at(self, epoch: int) -> bool:
        """Whether the bad epochs counted so far stop training at ``epoch`` under this patience
        and ``min_epoch`` (a resumed run asks this with its own settings)."""
        return epoch >= self.min_epoch and self.num_bad_epochs >= self.patience_at(epoch)

    def step(self, epoch: int, val_loss: float, val_map: Optional[float] = None) -> bool:
        """Record one validation; returns True when training should stop now."""
        val_loss = float(val_loss)
        if math.isnan(val_loss):
            raise ValueError(f"validation loss is NaN at epoch {epoch}")
        improved = False
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss = val_loss
            improved = True
        if val_map is not None:
            val_map = float(val_map)
            if math.isnan(val_map):
                raise ValueError(f"validation mAP is NaN at epoch {epoch}")
            if val_map > self.best_map + self.min_delta:
                self.best_map = val_map
                improved = True
        if improved:
            self.best_epoch = epoch
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1

        self.should_stop = self.stops_at(epoch)
        self.reason = ""
        if self.should_stop:
            start, end = self.strict_window
            where = (f"in the strict window [{start}, {end})" if start <= epoch < end else
                     "before the strict window" if epoch < start else "after the strict window")
            self.reason = (f"no {self.metric} improvement in {self.num_bad_epochs} validated epochs {where} "
                           f"(epoch {epoch + 1}; best at epoch {self.best_epoch + 1})")
        return self.should_stop

    def state_dict(self) -> Dict[str, Any]:
        return {
            "best_loss": self.best_loss,
            "best_map": self.best_map,
            "best_epoch": self.best_epoch,
            "num_bad_epochs": self.num_bad_epochs,
            "should_stop": self.should_stop,
            "reason": self.reason,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_map = float(state["best_map"])
        self.best_epoch = int(state["best_epoch"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.should_stop = bool(state["should_stop"])
        self.reason = str(state["reason"])
