"""Test-time augmentation for FaceDetector: horizontal flip and multi-scale, merged by NMS.

Every pass goes through `FaceDetector.detect_array` (same preprocessing, decode and NMS as
everywhere else); the passes' (K, 15) detections are pooled and NMS is run once more over the
pool with the detector's own threshold and keep_top_k.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np
import torch

from data.augment import LANDMARK_FLIP_ORDER
from utils.errors import FeatherFaceError
from utils.inference.postprocess import DETECTION_COLUMNS, nms_order


def mirror_detections(detections: np.ndarray, width: int) -> np.ndarray:
    """Detections found on `cv2.flip(image, 1)` -> the same faces in `image` (width W pixels).

    Coordinates are continuous (pixel j spans [j, j + 1)), so the mirror is x -> W - x; boxes
    swap x1/x2 and landmarks swap left/right points.
    """
    detections = np.asarray(detections, dtype=np.float32).reshape(-1, DETECTION_COLUMNS)
    out = detections.copy()
    out[:, 0] = width - detections[:, 2]
    out[:, 2] = width - detections[:, 0]
    points = detections[:, 5:].reshape(-1, 5, 2)[:, LANDMARK_FLIP_ORDER].copy()
    points[:, :, 0] = width - points[:, :, 0]
    out[:, 5:] = points.reshape(-1, 10)
    return out


def merge_detections(parts: Sequence[np.ndarray], nms_threshold: float, keep_top_k: Optional[int],
                     pixel_inclusive_nms: bool = False) -> np.ndarray:
    """Pool (K_i, 15) detections of several passes and keep the NMS survivors, best first."""
    pooled = [np.asarray(p, dtype=np.float32).reshape(-1, DETECTION_COLUMNS) for p in parts]
    detections = np.concatenate(pooled) if pooled else np.zeros((0, DETECTION_COLUMNS), np.float32)
    if len(detections) == 0:
        return detections
    rows = torch.from_numpy(detections)
    kept = nms_order(rows[:, :4], rows[:, 4], nms_threshold, pixel_inclusive_nms)[:keep_top_k]  # best first
    return detections[kept.numpy()]


def detect_with_tta(detector, image: np.ndarray, flip: bool = False,
                    scales: Optional[Sequence[float]] = None) -> np.ndarray:
    """(K, 15) detections of one BGR image with optional flip and multi-scale passes.

    `scales` are factors on the detector's own resize (1.0 = its usual input; `image_size` /
    `max_size` decide that base); None or [1.0] is a single scale. Without flip and with one
    scale this is exactly `detector.detect_array(image)`.
    """
    factors = [1.0] if not scales else [float(s) for s in scales]
    if any(f <= 0 for f in factors):
        raise FeatherFaceError(f"TTA scales must be positive, got {list(factors)}")
    if not flip and factors == [1.0]:
        return detector.detect_array(image)
    fixed_size = getattr(detector, "fixed_size", None)
    if fixed_size is not None and factors != [1.0]:
        raise FeatherFaceError(f"multi-scale TTA (--scales) needs a dynamic-size model: this detector letterboxes "
                               f"every image into one fixed input size {fixed_size[0]}x{fixed_size[1]} "
                               f"(--flip alone works)")
    # A fixed-size detector chooses its own letterbox scale (scale=None); otherwise the factors
    # multiply the detector's usual scale for this image.
    scales_asked = [None] if fixed_size is not None else [detector.scale_for(image) * f for f in factors]
    mirrored = cv2.flip(image, 1) if flip else None
    parts = []
    for scale in scales_asked:
        parts.append(detector.detect_array(image, scale=scale))
        if flip:
            parts.append(mirror_detections(detector.detect_array(mirrored, scale=scale), image.shape[1]))
    settings = detector.postprocess
    return merge_detections(parts, settings.nms_threshold, settings.keep_top_k, settings.pixel_inclusive_nms)
