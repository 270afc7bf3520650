"""Validation during training: loss and AP@0.5 over a label file, plus the official WIDER
easy / medium / hard AP when the val ground truth is given, and the one metric that picks
`best.pth` and drives early stopping.

* Images go through the deterministic `ValTransform` (pad to square, resize to the training
  size), so the val loss is the training loss's counterpart and the AP is measured at the
  training scale. Detections are decoded and NMS'd by the shared post-processing with the
  WIDER protocol's settings (score > 0.02, NMS 0.4) and mapped back to original pixels.
* AP@0.5 over the label file is the official protocol run by the repository's evaluator
  (`utils.evaluation.widerface_eval.evaluate_predictions`) on ground truth built from the
  label file: faces flagged invalid are ignored (a detection on one is neither a hit nor a
  false positive), every other face counts.
* With the WIDER val ground truth folder (`--val_gt_dir`), the same detections are also
  scored with the official easy / medium / hard keep lists, on the val images listed.
* `SelectionMetric`: one declared metric per run, never a mix: val AP@0.5 when the val set
  is scored, else the val loss, else the training task loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.augment import ValTransform
from data.wider_face import LabelFormatError, PathLike, WiderFaceDataset, detection_collate
from utils.errors import FeatherFaceError
from utils.evaluation.predict import to_xywh_score
from utils.evaluation.widerface_eval import SETTINGS, GroundTruthImage, evaluate_predictions, load_ground_truth
from utils.inference.postprocess import WIDER_POSTPROCESS, detect_faces

LABEL_EVENT = "labels"  # event name of the ground truth built from a label file


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] -= out[:, :2]
    return out


def wider_key(image: str) -> Tuple[str, str]:
    """`event/name.jpg` as written in a WIDER label file -> (event, name), the keys of the
    official ground truth."""
    path = Path(image)
    return path.parent.name, path.stem


class ValidationSet(Dataset):
    """Val images for the loss and the AP.

    Item: (image (3, S, S), loss target (K, 15) of the usable faces as training builds it,
    (index, resize factor from original pixels to the network input)). Ground truth for the
    AP stays in `records` (original pixels, invalid flags).
    """

    def __init__(self, label_file: PathLike, image_root: Optional[PathLike], image_size: int) -> None:
        try:
            self.dataset = WiderFaceDataset(label_file, image_root, keep_invalid=True)
        except LabelFormatError as exc:  # a user error: one sentence, exit 2 (utils.errors.run_cli)
            raise FeatherFaceError(f"--val_dataset: {exc}") from None
        self.records = self.dataset.records
        self.transform = ValTransform(image_size)
        self.image_size = image_size
        if not any(len(r.boxes) and not r.invalid.all() for r in self.records):
            raise FeatherFaceError(f"--val_dataset {label_file} has no usable face to validate on")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, boxes, landmarks, labels = self.dataset.load(index)
        valid = ~self.records[index].invalid
        tensor, target = self.transform(image, boxes[valid], landmarks[valid], labels[valid])
        return tensor, target, (index, self.image_size / max(image.shape[:2]))


def collate(batch):
    images, targets = detection_collate([(image, target) for image, target, _ in batch])
    return images, targets, [where for _, _, where in batch]


def label_ground_truth(records: Sequence) -> Tuple[GroundTruthImage, ...]:
    """Ground truth for the official evaluator from label-file records: every face counts in
    every setting except the invalid-flagged ones, which are ignored."""
    images = []
    for i, record in enumerate(records):
        keep = ~np.asarray(record.invalid, dtype=bool)
        keep.setflags(write=False)
        images.append(GroundTruthImage(LABEL_EVENT, str(i), _xyxy_to_xywh(record.boxes), {s: keep for s in SETTINGS}))
    return tuple(images)


def ap50_over_labels(detections: Sequence[np.ndarray], records: Sequence) -> float:
    """AP at IoU 0.5 of per-image detections ((K, >=5) x1 y1 x2 y2 score, original pixels)
    against label-file records, by the official protocol (invalid faces ignored)."""
    preds = {LABEL_EVENT: {str(i): to_xywh_score(d, integer=False) for i, d in enumerate(detections)}}
    return float(evaluate_predictions(preds, label_ground_truth(records))[SETTINGS[0]])


class WiderSubset:
    """The official val ground truth of the images a label file lists (for easy/medium/hard)."""

    def __init__(self, gt_dir: PathLike, records: Sequence) -> None:
        wanted = [wider_key(r.image) for r in records]
        by_key = {(g.event, g.name): g for g in load_ground_truth(gt_dir)}
        unknown = [k for k in wanted if k not in by_key]
        if unknown:
            raise FeatherFaceError(f"{len(unknown)} val image(s) are not in the WIDER val ground truth of "
                                   f"{gt_dir} (e.g. {'/'.join(unknown[0])}); --val_gt_dir only fits WIDER val images")
        self.keys = wanted
        self.images = tuple(by_key[k] for k in dict.fromkeys(wanted))

    def evaluate(self, detections: Sequence[np.ndarray]) -> Dict[str, float]:
        preds: Dict[str, Dict[str, np.ndarray]] = {}
        for (event, name), d in zip(self.keys, detections):
            preds.setdefault(event, {})[name] = to_xywh_score(d, integer=False)
        ap = evaluate_predictions(preds, self.images).ap
        return {s: float(ap[s]) for s in SETTINGS}  # NaN: no face of that setting among these images


@torch.no_grad()
def run_validation(net: nn.Module, val_set: ValidationSet, criterion: nn.Module, priors: torch.Tensor,
                   device: torch.device, batch_size: int, num_workers: int = 0, compute_ap: bool = True,
                   wider: Optional[WiderSubset] = None) -> Dict[str, float]:
    """Val loss parts (`val_loss`, `val_loc`, ...) and, with `compute_ap`, `val_ap50` and with
    `wider` also `val_easy`, `val_medium`, `val_hard`. The model is put back in its mode.

    The loss is the training loss's normalisation over the whole set, not a mean of per-batch
    losses: each part's sum over every image divided by the matched faces (anchors) of every
    image, so it does not depend on the batch size."""
    loader = DataLoader(val_set, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))  # never draw from the global RNG
    was_training = net.training
    net.train(False)
    totals = dict.fromkeys(("loc", "conf", "landm", "num_pos", "num_pos_landm"), 0.0)
    detections: List[np.ndarray] = [np.zeros((0, 15), np.float32)] * len(val_set)
    size = (val_set.image_size, val_set.image_size)
    variance = net.config.variance
    try:
        for images, targets, indices in loader:
            images = images.to(device)
            feats = net.features(images)
            loc, logits, landm = net.bbox_head(feats), net.class_head(feats), net.landmark_head(feats)
            sums = criterion.sums((loc, logits, landm), priors, [t.to(device) for t in targets])
            for k in totals:
                totals[k] += float(sums[k])
            if compute_ap:
                scores = F.softmax(logits, dim=-1)
                for row, (index, scale) in enumerate(indices):
                    detections[index] = detect_faces(
                        loc[row], scores[row], landm[row], priors, variance, size, scale,
                        WIDER_POSTPROCESS.conf_threshold, WIDER_POSTPROCESS.nms_threshold,
                        WIDER_POSTPROCESS.top_k, WIDER_POSTPROCESS.keep_top_k)
    finally:
        net.train(was_training)
    parts = {"loc": totals["loc"] / max(totals["num_pos"], 1), "conf": totals["conf"] / max(totals["num_pos"], 1),
             "landm": totals["landm"] / max(totals["num_pos_landm"], 1)}
    metrics = {"val_loss": float(criterion.combine(**parts)), **{f"val_{k}": v for k, v in parts.items()},
               "val_num_pos": totals["num_pos"]}
    if compute_ap:
        metrics["val_ap50"] = ap50_over_labels(detections, val_set.records)
        if wider is not None:
            metrics.update({f"val_{s}": v for s, v in wider.evaluate(detections).items()})
    return metrics


@dataclass(frozen=True)
class SelectionMetric:
    """The one metric that picks best.pth and drives early stopping / the alpha plateaus."""

    key: str  # name in the epoch metrics
    higher_is_better: bool

    def value(self, metrics: Mapping[str, float]) -> Optional[float]:
        """The metric this epoch, or None on an epoch that did not compute it."""
        value = metrics.get(self.key)
        return None if value is None or math.isnan(value) else float(value)

    def as_loss(self, value: float) -> float:
        """Lower-is-better form (what RunState.best_metric and the schedules compare)."""
        return -value if self.higher_is_better else value

    def describe(self) -> str:
        return f"{self.key} ({'higher' if self.higher_is_better else 'lower'} is better)"


def selection_metric(has_val: bool, val_ap: bool, task_loss_key: str) -> SelectionMetric:
    """Val AP@0.5 when the val set is scored, else the val loss, else the training task loss."""
    if has_val and val_ap:
        return SelectionMetric("val_ap50", True)
    if has_val:
        return SelectionMetric("val_loss", False)
    return SelectionMetric(task_loss_key, False)
