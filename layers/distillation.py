"""Knowledge distillation from FeatherFace V1 (teacher) to V2 (student).

What is distilled, exactly. Student and teacher are run on the same batch and therefore
produce outputs on the *same* anchors, each a tuple
``(loc (B, N, 4), conf (B, N, 2), landm (B, N, 10))`` as returned by ``model(x)``:

1. ``kd_cls`` -- the class distribution of every anchor (all B*N anchors, positives and
   background alike): ``KL(softmax(t / T) || softmax(s / T))`` over the two classes,
   summed over classes, averaged over anchors and batch, and multiplied by ``T**2`` so
   its gradient scale does not shrink as T grows (Hinton et al., 2015).
2. ``kd_box`` -- the 4 encoded box offsets, only on anchors where the teacher is
   confident: ``softmax(t)[..., 1] > conf_threshold`` (face probability at T = 1).
   Smooth-L1 (beta 1) summed over the 4 coordinates, divided by the number of
   confident anchors in the batch; exactly 0 when there are none.
3. ``kd_landm`` -- the 10 encoded landmark offsets on the same confident anchors, with
   the same smooth-L1 and normalisation.

``distill = cls_weight * kd_cls + box_weight * kd_box + landm_weight * kd_landm``.
Nothing from the feature maps is distilled; only the three head outputs are.

The teacher outputs are detached inside the loss, so no gradient ever reaches the
teacher. ``conf`` must be raw logits for the student. For the teacher, pass logits
(default) or, with ``teacher_is_prob=True``, the softmax probabilities an eval-mode model
returns: ``log(p)`` differs from the logits only by a per-anchor constant, which softmax
ignores, so both give the same loss (up to a 1e-12 clamp).

The training objective mixes the two losses with ``combine``:
``alpha * distill + (1 - alpha) * task`` (alpha from ``layers.alpha_schedule``).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HEAD_WIDTHS = (("loc", 4), ("conf", 2), ("landm", 10))


def combine(task_loss: Tensor, distill_loss: Tensor, alpha: float) -> Tensor:
    """Total objective ``alpha * distill + (1 - alpha) * task``."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * distill_loss + (1.0 - alpha) * task_loss


def _check_outputs(outputs: Sequence[Tensor], who: str) -> None:
    if len(outputs) != 3:
        raise ValueError(f"{who} outputs must be (loc, conf, landm), got {len(outputs)} tensors")
    batch_anchors = None
    for (name, width), t in zip(_HEAD_WIDTHS, outputs):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{who} {name} must have shape (B, N, {width}), got {shape}")
        if batch_anchors is None:
            batch_anchors = t.shape[:2]
        elif t.shape[:2] != batch_anchors:
            raise ValueError(f"{who} outputs disagree on (B, N): {tuple(batch_anchors)} vs {tuple(t.shape[:2])}")


class DistillationLoss(nn.Module):
    """Response-based KD on class logits plus box/landmark regression on confident anchors."""

    def __init__(
        self,
        temperature: float = 4.0,
        conf_threshold: float = 0.5,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
        landm_weight: float = 1.0,
        teacher_is_prob: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= conf_threshold < 1.0:
            raise ValueError(f"conf_threshold must be in [0, 1), got {conf_threshold}")
        self.temperature = float(temperature)
        self.conf_threshold = float(conf_threshold)
        self.cls_weight = float(cls_weight)
        self.box_weight = float(box_weight)
        self.landm_weight = float(landm_weight)
        self.teacher_is_prob = bool(teacher_is_prob)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, conf_threshold={self.conf_threshold}, "
            f"weights=(cls {self.cls_weight}, box {self.box_weight}, landm {self.landm_weight}), "
            f"teacher_is_prob={self.teacher_is_prob}"
        )

    def _teacher_logits(self, conf: Tensor) -> Tensor:
        """The teacher's (detached) conf as float32 logits, or log-probabilities with teacher_is_prob."""
        logits = conf.float()
        if not self.teacher_is_prob:
            return logits
        # A softmax's rows sum to 1 only up to rounding in its own dtype (bf16: eps 2**-7).
        atol = max(1e-3, torch.finfo(conf.dtype).eps)
        sums = logits.sum(-1)
        if (logits.min() < 0) or not torch.allclose(sums, torch.ones_like(sums), atol=atol):
            raise ValueError("teacher_is_prob=True but the teacher conf is not a softmax (rows must be >= 0 and sum to 1)")
        return logits.clamp_min(1e-12).log()

    def forward(self, student_outputs: Sequence[Tensor], teacher_outputs: Sequence[Tensor]) -> Dict[str, Tensor]:
        """Returns {"distill": total (with grad), "kd_cls", "kd_box", "kd_landm": detached parts}."""
        _check_outputs(student_outputs, "student")
        _check_outputs(teacher_outputs, "teacher")
        if student_outputs[0].shape[:2] != teacher_outputs[0].shape[:2]:
            raise ValueError(
                f"student and teacher must use the same anchors: (B, N) {tuple(student_outputs[0].shape[:2])} "
                f"vs {tuple(teacher_outputs[0].shape[:2])}"
            )
        # float32 so the loss is stable under AMP autocast.
        s_loc, s_conf, s_landm = (t.float() for t in student_outputs)
        t_loc, t_landm = (t.detach().float() for t in (teacher_outputs[0], teacher_outputs[2]))
        t_conf = self._teacher_logits(teacher_outputs[1].detach())

        T = self.temperature
        log_p_s = F.log_softmax(s_conf / T, dim=-1)
        log_p_t = F.log_softmax(t_conf / T, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)  # (B, N)
        kd_cls = kl.mean() * (T * T)

        confident = F.softmax(t_conf, dim=-1)[..., 1] > self.conf_threshold  # (B, N)
        # clamp keeps the division finite; with no confident anchor the sums are 0 anyway.
        denom = confident.sum().clamp_min(1).float()
        # torch.where rather than boolean indexing: fixed shapes, no host sync on GPU.
        box = F.smooth_l1_loss(s_loc, t_loc, reduction="none").sum(-1)  # (B, N)
        landm = F.smooth_l1_loss(s_landm, t_landm, reduction="none").sum(-1)  # (B, N)
        kd_box = torch.where(confident, box, torch.zeros_like(box)).sum() / denom
        kd_landm = torch.where(confident, landm, torch.zeros_like(landm)).sum() / denom

        distill = self.cls_weight * kd_cls + self.box_weight * kd_box + self.landm_weight * kd_landm
        return {
            "distill": distill,
            "kd_cls": kd_cls.detach(),
            "kd_box": kd_box.detach(),
            "kd_landm": kd_landm.detach(),
        }

    combine = staticmethod(combine)
