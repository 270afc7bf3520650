"""V2 distillation on the shared Trainer: MultiBox task loss mixed with knowledge distillation
from a frozen V1-family teacher (layers/distillation.py says exactly what is distilled), with the
dynamic alpha schedule, smart early stopping, the training monitor and MixUp/CutMix."""
from __future__ import annotations

import argparse
import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from data.mixing import cutmix, mixup
from layers.alpha_schedule import DynamicAlpha
from layers.distillation import DistillationLoss, combine
from layers.early_stopping import SmartEarlyStopping
from utils.checkpoint import load_model
from utils.errors import CheckpointError
from utils.training.trainer import Trainer


def load_teacher(path: str, student_config, device: torch.device) -> torch.nn.Module:
    """A frozen, eval-mode V1-family teacher whose anchors match the student's."""
    teacher, _ = load_model(path, expected="v1", map_location="cpu")
    tc = teacher.config
    if (tc.min_sizes, tc.steps, tc.variance) != (student_config.min_sizes, student_config.steps, student_config.variance):
        raise CheckpointError(f"teacher {path} uses other anchors ({tc.min_sizes}, {tc.steps}) than the student")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


class DistillationTrainer(Trainer):
    """Trainer whose loss mixes the MultiBox task loss with distillation from a frozen teacher."""

    task_loss_key = "task"  # without validation, best.pth follows this, not the alpha-weighted total

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module) -> None:
        self.kd = DistillationLoss(args.temperature, args.kd_conf_threshold, teacher_is_prob=True)
        self.alpha = DynamicAlpha(args.alpha_initial, args.alpha_final, args.epochs, late_cap=args.alpha_late_cap)
        self.stopper = SmartEarlyStopping(args.early_stopping_patience, args.min_epoch)
        # Loaded before the Trainer seeds (or, on resume, restores) the RNGs: building the teacher
        # draws random initial weights, which would shift a resumed run's DropBlock draws.
        teacher = load_teacher(args.teacher_model, model.config, torch.device("cpu"))
        super().__init__(args, model)
        self.teacher = teacher.to(self.device)
        self.stopper.metric = self.selection.key  # what best.pth follows is what early stopping watches

    def compute_loss(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        args, state = self.args, self.state
        rng = np.random.default_rng([args.seed, state.epoch, state.iteration, self.rank])
        if args.mixup_alpha > 0 and rng.random() < args.mixup_prob:
            images, targets = mixup(images, targets, args.mixup_alpha, rng)
        elif args.cutmix_prob > 0:
            images, targets = cutmix(images, targets, args.cutmix_prob, rng)
        with torch.no_grad():
            teacher_out = self.teacher(images)  # eval mode: softmax scores
        student_out = self.model(images)
        task = self.criterion(student_out, self.priors, targets)
        kd = self.kd(student_out, teacher_out)
        alpha = self.alpha.value(state.epoch)
        return {
            "loss": combine(task["loss"], kd["distill"], alpha),
            "task": task["loss"].detach(), "loc": task["loc"], "conf": task["conf"], "landm": task["landm"],
            "distill": kd["distill"].detach(), "kd_cls": kd["kd_cls"], "kd_box": kd["kd_box"],
            "kd_landm": kd["kd_landm"], "alpha": torch.tensor(alpha, dtype=torch.float64),
        }

    def on_step(self, parts: Dict[str, float]) -> None:
        self.monitor.log_step(self.state.iteration, parts["grad_norm"], {}, self.optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, metrics: Dict[str, float]) -> Optional[str]:
        # Under DDP the metrics are reduced over ranks and rank 0's decisions (alpha, early
        # stopping) are broadcast by Trainer.share_decisions, so every rank agrees.
        epoch = self.state.epoch
        # One declared metric (Trainer.selection, the one best.pth follows): val AP@0.5, else the
        # val loss, else the training task loss. Epochs between validations change nothing.
        value = self.selection.value(metrics)
        watched = None if value is None else self.selection.as_loss(value)
        if watched is not None and self.alpha.step_validation(watched):
            self.log(f"validation plateau: alpha x{self.alpha.plateau_factor} (plateaus so far {self.alpha.num_plateaus})")
        metrics["alpha_next"] = self.alpha.value(epoch + 1)
        if watched is None:
            return None
        if self.selection.higher_is_better:
            stop = self.stopper.step(epoch, math.inf, value)  # the AP alone decides
        else:
            stop = self.stopper.step(epoch, value)
        metrics["watched_loss"] = watched  # the Trainer's monitor logs the epoch line
        return self.stopper.reason if stop else None

    def extra_state(self) -> Dict[str, Any]:
        return {"teacher": self.args.teacher_model, "alpha_schedule": self.alpha.state_dict(),
                "early_stopping": self.stopper.state_dict(), "stop_reason": self.state.stop_reason}

    def load_extra_state(self, blob: Dict[str, Any]) -> None:
        self.alpha.load_state_dict(blob["alpha_schedule"])
        self.stopper.load_state_dict(blob["early_stopping"])
