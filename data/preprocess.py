"""The one image preprocessing used by training, evaluation, export and the demo.

FeatherFace (like RetinaFace) takes BGR pixels with the per-channel mean subtracted and
no scaling: input = float32(BGR) - (104, 117, 123), laid out CHW.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from data.config import MEAN_BGR

# File suffixes read as images everywhere (training data, evaluation, the demo, INT8 calibration).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_MEAN = np.asarray(MEAN_BGR, dtype=np.float32)
_MEAN_CHW = torch.tensor(MEAN_BGR, dtype=torch.float32).view(3, 1, 1)


def _check_bgr(image_bgr: np.ndarray) -> None:
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {tuple(image_bgr.shape)}")


def subtract_mean(image_bgr: np.ndarray) -> np.ndarray:
    """uint8/float HxWx3 BGR -> float32 HxWx3 with the BGR mean removed."""
    _check_bgr(image_bgr)
    return image_bgr.astype(np.float32) - _MEAN


def resize_scale(height: int, width: int, target_size: Optional[int], max_size: Optional[int] = None) -> float:
    """Scale that makes the shorter side `target_size`, capped so the longer side <= max_size.

    `target_size=None` keeps the original size (scale 1.0).
    """
    if target_size is None:
        scale = 1.0
    else:
        scale = float(target_size) / min(height, width)
    if max_size is not None and round(max(height, width) * scale) > max_size:
        scale = float(max_size) / max(height, width)
    return scale


def preprocess(image_bgr: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """HxWx3 BGR image -> (3, H', W') float32 tensor ready for the network.

    `scale` resizes first (bilinear); boxes found on the tensor are divided by `scale`
    to return to the original image.
    """
    if scale != 1.0:
        image_bgr = cv2.resize(image_bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    _check_bgr(image_bgr)
    # Transpose the uint8 image first, then convert and subtract in place: same values as
    # subtract_mean(...).transpose, about 3x faster at 640x640.
    chw = torch.from_numpy(np.ascontiguousarray(image_bgr.transpose(2, 0, 1))).float()
    return chw.sub_(_MEAN_CHW)


def letterbox(image_bgr: np.ndarray, size: Tuple[int, int], scale: Optional[float] = None
              ) -> Tuple[torch.Tensor, float]:
    """HxWx3 BGR image -> ((3, H, W) tensor, scale) for a network of fixed input size (H, W): the image
    resized by `scale` (default: the largest scale that fits it inside (H, W); what exceeds (H, W) is
    cut off), then zero-padded bottom/right after mean removal (as preprocess_batch pads), so box
    coordinates divided by `scale` are original pixels."""
    height, width = size
    if scale is None:
        scale = min(height / image_bgr.shape[0], width / image_bgr.shape[1])
    chw = preprocess(image_bgr, scale)
    out = chw.new_zeros(3, height, width)
    out[:, : chw.shape[1], : chw.shape[2]] = chw[:, :height, :width]
    return out, scale


def preprocess_batch(images_bgr: Sequence[np.ndarray], scale: Union[float, Sequence[float]] = 1.0
                     ) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Several images -> one (B, 3, H, W) tensor, zero-padded (after mean removal) to the
    largest H and W, bottom/right, so box coordinates are unchanged. `scale` is one factor
    for all images or one per image. Returns the batch and its (H, W)."""
    scales = [scale] * len(images_bgr) if isinstance(scale, (int, float)) else list(scale)
    tensors = [preprocess(im, s) for im, s in zip(images_bgr, scales)]
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    batch = torch.zeros(len(tensors), 3, height, width)
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
    return batch, (height, width)
