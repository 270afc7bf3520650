"""RetinaFace MultiBox loss: box + landmark smooth-L1 and classification with hard negatives.

Targets per image are a (K, 15) tensor [x1, y1, x2, y2, l0x, l0y, ..., l4x, l4y, label],
coordinates normalised to [0, 1], label 1 for a face with landmarks and -1 for a face
without (its landmark values are ignored). An optional 16th column is a per-box weight
(default 1): it multiplies every loss term of the priors matched to that box (box,
landmark and the positive classification terms), e.g. the mix ratio of the image a box
came from under MixUp. Negatives always weigh 1, and the normalisers stay plain counts,
so a weight of 0.5 halves that box's contribution.

Malformed targets raise ValueError naming the image rather than poisoning training silently:
non-finite boxes, boxes with x2 < x1 or y2 < y1 (either would knock other faces' priors out
of the matching), labels other than 1 / -1, non-finite landmarks on a face with landmarks,
and negative or non-finite weights. A zero-area box is allowed: it overlaps no prior and is
ignored, as RetinaFace ignores every face whose best prior IoU is below 0.2.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from data.config import ModelConfig
from layers.box_utils import match

TARGET_COLUMNS = 15  # 4 box + 10 landmark + label
WEIGHTED_TARGET_COLUMNS = 16  # ... + per-box weight


def _check_target(index: int, target: torch.Tensor) -> None:
    """Raise ValueError if the (K, 15|16) float target of image `index` is malformed (see the
    module docstring). One host sync when it is fine."""
    boxes, landmarks, labels = target[:, :4], target[:, 4:14], target[:, 14]
    finite_box = torch.isfinite(boxes).all(dim=1)
    has_landmarks = labels == 1
    checks = {  # per check, (K,) True where the row is fine
        "non-finite box coordinates": finite_box,
        "boxes with x2 < x1 or y2 < y1": (boxes[:, 2:] >= boxes[:, :2]).all(dim=1) | ~finite_box,
        "labels other than 1 (landmarks) / -1 (none)": has_landmarks | (labels == -1),
        "non-finite landmarks on a face with landmarks": torch.isfinite(landmarks).all(dim=1) | ~has_landmarks,
    }
    if target.shape[1] == WEIGHTED_TARGET_COLUMNS:
        weights = target[:, 15]
        checks["a negative or non-finite weight"] = torch.isfinite(weights) & (weights >= 0)
    ok = torch.stack(list(checks.values()))  # (checks, K)
    if bool(ok.all()):
        return
    problems = [f"{what} (rows {(~row).nonzero().flatten().tolist()})" for what, row in zip(checks, ok) if not row.all()]
    raise ValueError(f"targets[{index}] is malformed: " + "; ".join(problems))


class MultiBoxLoss(nn.Module):
    """Matches faces to priors and scores the three head outputs (RetinaFace recipe)."""

    def __init__(self, num_classes: int = 2, overlap_thresh: float = 0.35, neg_pos_ratio: int = 7,
                 variances: Sequence[float] = ModelConfig.variance, loc_weight: float = 2.0,
                 landm_weight: float = 1.0) -> None:
        super().__init__()
        if num_classes != 2:
            raise ValueError(f"MultiBoxLoss handles face/background only (num_classes=2), got {num_classes}")
        self.num_classes = num_classes
        self.overlap_thresh = overlap_thresh
        self.neg_pos_ratio = neg_pos_ratio
        self.variances = tuple(float(v) for v in variances)
        self.loc_weight = loc_weight
        self.landm_weight = landm_weight

    @torch.no_grad()
    def build_targets(self, targets: Sequence[torch.Tensor], priors: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-prior targets for a batch: loc_t (B, N, 4), conf_t (B, N) long in {-1, 0, 1},
        landm_t (B, N, 10), weight_t (B, N) (box weight on positives, 1 elsewhere)."""
        batch, num_priors = len(targets), priors.shape[0]
        device, dtype = priors.device, priors.dtype
        loc_t = priors.new_zeros(batch, num_priors, 4)
        landm_t = priors.new_zeros(batch, num_priors, 10)
        conf_t = torch.zeros(batch, num_priors, dtype=torch.long, device=device)
        weight_t = priors.new_ones(batch, num_priors)
        for i, target in enumerate(targets):
            if target.numel() == 0:
                continue
            if target.ndim != 2 or target.shape[1] not in (TARGET_COLUMNS, WEIGHTED_TARGET_COLUMNS):
                raise ValueError(f"targets[{i}] must be (K, {TARGET_COLUMNS}) [box, landmarks, label] or "
                                 f"(K, {WEIGHTED_TARGET_COLUMNS}) [..., weight], got {tuple(target.shape)}")
            target = target.to(device=device, dtype=dtype)
            _check_target(i, target)
            weights = target[:, 15] if target.shape[1] == WEIGHTED_TARGET_COLUMNS else None
            loc_t[i], conf_t[i], landm_t[i], weight_t[i] = match(
                self.overlap_thresh, target[:, :4], priors, self.variances, target[:, 14], target[:, 4:14], weights)
        return loc_t, conf_t, landm_t, weight_t

    def sums(self, predictions: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], priors: torch.Tensor,
             targets: Union[Sequence[torch.Tensor], List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The unnormalised loss sums of a batch, {"loc", "conf", "landm"} (with grad), and the
        counts that normalise them, {"num_pos", "num_pos_landm"}. Every term is per image, so
        sums and counts add up over batches: validation divides the totals of a whole set."""
        loc_p, conf_p, landm_p = predictions
        batch, num_priors = loc_p.shape[:2]
        if (loc_p.shape != (batch, num_priors, 4) or conf_p.shape != (batch, num_priors, self.num_classes)
                or landm_p.shape != (batch, num_priors, 10) or priors.shape != (num_priors, 4)):
            raise ValueError(f"shape mismatch: loc {tuple(loc_p.shape)}, conf {tuple(conf_p.shape)}, "
                             f"landm {tuple(landm_p.shape)}, priors {tuple(priors.shape)}; expected "
                             f"(B, N, 4), (B, N, {self.num_classes}), (B, N, 10), (N, 4)")
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} target tensors for a batch of {batch}")
        priors = priors.to(device=loc_p.device, dtype=torch.float32)
        loc_t, conf_t, landm_t, weight_t = self.build_targets(targets, priors)

        pos = conf_t != 0  # every matched face
        pos_landm = conf_t > 0  # matched faces that have landmarks

        # Losses in float32 even under autocast.
        loc_terms = F.smooth_l1_loss(loc_p[pos].float(), loc_t[pos], reduction="none").sum(-1)
        landm_terms = F.smooth_l1_loss(landm_p[pos_landm].float(), landm_t[pos_landm], reduction="none").sum(-1)
        ce = F.cross_entropy(conf_p.reshape(-1, self.num_classes).float(), pos.reshape(-1).long(),
                             reduction="none").view(batch, num_priors)
        neg = self._hard_negatives(ce.detach(), pos)
        return {
            "loc": (loc_terms * weight_t[pos]).sum(),
            "conf": (ce * weight_t)[pos | neg].sum(),
            "landm": (landm_terms * weight_t[pos_landm]).sum(),
            "num_pos": pos.sum(),
            "num_pos_landm": pos_landm.sum(),
        }

    def combine(self, loc: torch.Tensor, conf: torch.Tensor, landm: torch.Tensor) -> torch.Tensor:
        """The total loss from its normalised parts."""
        return self.loc_weight * loc + conf + self.landm_weight * landm

    def forward(self, predictions: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], priors: torch.Tensor,
                targets: Union[Sequence[torch.Tensor], List[torch.Tensor]]) -> Dict[str, Union[torch.Tensor, int]]:
        """predictions = (loc (B, N, 4), conf logits (B, N, 2), landm (B, N, 10)), priors (N, 4),
        targets: B tensors (K_i, 15|16). Returns {"loss" (with grad), "loc", "conf", "landm"
        (detached), "num_pos" (int, matched priors in the batch)}: the sums of `sums` normalised
        by the batch's counts, as RetinaFace does."""
        s = self.sums(predictions, priors, targets)
        loss_loc = s["loc"] / s["num_pos"].clamp(min=1)
        loss_conf = s["conf"] / s["num_pos"].clamp(min=1)
        loss_landm = s["landm"] / s["num_pos_landm"].clamp(min=1)
        return {
            "loss": self.combine(loss_loc, loss_conf, loss_landm),
            "loc": loss_loc.detach(),
            "conf": loss_conf.detach(),
            "landm": loss_landm.detach(),
            "num_pos": int(s["num_pos"]),
        }

    def _hard_negatives(self, ce: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Per image, the min(ratio * num_pos, N - 1) background priors with the largest CE."""
        num_priors = ce.shape[1]
        mining = ce.masked_fill(pos, float("-inf"))  # positives rank last
        order = mining.argsort(dim=1, descending=True)  # hardest first
        num_neg = (self.neg_pos_ratio * pos.sum(dim=1, keepdim=True)).clamp(max=num_priors - 1)
        selected = torch.arange(num_priors, device=ce.device)[None] < num_neg  # (B, N) in rank order
        return torch.zeros_like(pos).scatter_(1, order, selected) & ~pos
