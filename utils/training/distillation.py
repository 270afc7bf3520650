"""V2 distillation on the shared Trainer: MultiBox task loss mixed with knowledge distillation
from a frozen V1-family teacher (layers/distillation.py says exactly what is distilled), with the
dynamic alpha schedule, smart early stopping, the training monitor and MixUp/CutMix.

A run's checkpoints record its teacher: the path and a sha256 of its weights. A resumed run
distils from the recorded path unless --teacher_model says otherwise, and refuses a teacher whose
weights differ from the recorded ones unless --new_teacher says that is meant."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from data.config import get_config
from data.mixing import cutmix, mixup
from layers.alpha_schedule import DynamicAlpha
from layers.distillation import DistillationLoss, combine
from layers.early_stopping import SmartEarlyStopping
from models import build_model
from utils.checkpoint import load_checkpoint, load_model, show_keys
from utils.errors import CheckpointError
from utils.training.trainer import Trainer

DEFAULT_TEACHER = "weights/featherface_v1/last.pth"  # where train.py writes its V1 run


def fill_resumed_flags(args: argparse.Namespace) -> argparse.Namespace:
    """--teacher_model and --dropblock_prob left out: the resumed run's own (as its checkpoint
    recorded them), else the defaults."""
    saved: Dict[str, Any] = {}
    if args.resume and (args.teacher_model is None or args.dropblock_prob is None):
        saved = load_checkpoint(args.resume)
    if args.teacher_model is None:
        args.teacher_model = saved.get("teacher", DEFAULT_TEACHER)
        if saved.get("teacher") and not Path(args.teacher_model).is_file():
            raise CheckpointError(f"{args.resume} was distilled from {args.teacher_model}, which is not there any "
                                  f"more: give the teacher's new place with --teacher_model")
    if args.dropblock_prob is None:
        args.dropblock_prob = saved.get("model_config", {}).get("dropblock_prob", get_config("v2").dropblock_prob)
    return args


def build_student(args: argparse.Namespace) -> torch.nn.Module:
    """V2 with the run's DropBlock probability in its frozen config (no weights: the parameter
    count is V2's whatever the probability)."""
    fill_resumed_flags(args)
    return build_model(dataclasses.replace(get_config("v2"), dropblock_prob=args.dropblock_prob))


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: what the network computes, not
    how its file was written."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_teacher(path: str, student_config, device: torch.device) -> torch.nn.Module:
    """A frozen, eval-mode V1-family teacher whose anchors match the student's and whose weights
    and BN statistics are finite."""
    teacher, _ = load_model(path, expected="v1", map_location="cpu")
    bad = [k for k, v in teacher.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"teacher {path} holds non-finite values (NaN/inf) in {len(bad)} tensor(s), first "
                              f"{show_keys(bad, 3)}: it cannot teach; give a teacher checkpoint with finite weights")
    tc = teacher.config
    if (tc.min_sizes, tc.steps, tc.variance) != (student_config.min_sizes, student_config.steps, student_config.variance):
        raise CheckpointError(f"teacher {path} uses other anchors ({tc.min_sizes}, {tc.steps}) than the student")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


class DistillationTrainer(Trainer):
    """Trainer whose loss mixes the MultiBox task loss with distillation from a frozen teacher."""

    task_loss_key = "task"  # without validation, best.pth follows this, not the alpha-weighted total
    script = "train_v2.py"

    def __init__(self, args: argparse.Namespace, model: torch.nn.Module) -> None:
        fill_resumed_flags(args)
        self.kd = DistillationLoss(args.temperature, args.kd_conf_threshold, teacher_is_prob=True)
        self.alpha = DynamicAlpha(args.alpha_initial, args.alpha_final, args.epochs, late_cap=args.alpha_late_cap)
        self.stopper = SmartEarlyStopping(args.early_stopping_patience, args.min_epoch)
        # Loaded before the Trainer seeds (or, on resume, restores) the RNGs: building the teacher
        # draws random initial weights, which would shift a resumed run's DropBlock draws.
        teacher = load_teacher(args.teacher_model, model.config, torch.device("cpu"))
        self.teacher_sha256 = weights_digest(teacher.state_dict())
        super().__init__(args, model)  # on resume, load_extra_state checks the teacher
        self.teacher = teacher.to(self.device)
        self.stopper.metric = self.selection.key  # what best.pth follows is what early stopping watches
        self.log(f"teacher {args.teacher_model} (weights sha256 {self.teacher_sha256[:12]}); best.pth, early "
                 f"stopping and the alpha plateaus follow {self.selection.describe()}")

    def compute_loss(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        args, state = self.args, self.state
        rng = np.random.default_rng([args.seed, state.epoch, state.iteration, self.rank])
        if not args.no_augment:  # --no_augment: plain images, no batch mixing either
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
        return self.stopper.reason if stop else None  # the watched metric is in the epoch line by its name

    def nothing_to_train(self) -> Optional[str]:
        """A resumed run that had stopped early takes no step while its bad epochs still stop it
        under this run's --early_stopping_patience and --min_epoch."""
        if self.saved_stop_reason and self.stopper.should_stop and self.stopper.stops_at(self.state.epoch - 1):
            self.state.stop_reason = self.saved_stop_reason
            return (f"the run stopped early at epoch {self.state.epoch} ({self.saved_stop_reason}); a larger "
                    f"--early_stopping_patience goes on")
        return super().nothing_to_train()

    def extra_state(self) -> Dict[str, Any]:
        return {"teacher": self.args.teacher_model, "teacher_sha256": self.teacher_sha256,
                "alpha_schedule": self.alpha.state_dict(), "early_stopping": self.stopper.state_dict(),
                "stop_reason": self.state.stop_reason}

    def load_extra_state(self, blob: Dict[str, Any]) -> None:
        saved = blob.get("teacher_sha256")
        if saved is None:
            self.log(f"note: the checkpoint does not record its teacher's weights; distilling from "
                     f"{self.args.teacher_model} unchecked")
        elif saved != self.teacher_sha256:
            where = f"{blob.get('teacher')}, sha256 {saved[:12]}"
            if not self.args.new_teacher:
                raise CheckpointError(
                    f"teacher {self.args.teacher_model} (sha256 {self.teacher_sha256[:12]}) is not the one the "
                    f"resumed run was distilled from ({where}): give that teacher with --teacher_model, or "
                    f"pass --new_teacher to go on distilling from this one")
            self.log(f"--new_teacher: distilling from {self.args.teacher_model} from now on, not from {where}")
        self.alpha.load_state_dict(blob["alpha_schedule"])
        self.stopper.load_state_dict(blob["early_stopping"])
