"""The one image preprocessing used by training, evaluation, export and the demo.

FeatherFace (like RetinaFace) takes BGR pixels with the per-channel mean subtracted and
no scaling: input = float32(BGR) - (104, 117, 123), laid out CHW.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch

from data.config import MEAN_BGR

# File suffixes read as images everywhere (training data, evaluation, the demo, INT8 calibration).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_MEAN = np.asarray(MEAN_BGR, dtype=np.float32)
_MEAN_CHW = torch.tensor(MEAN_BGR, dtype=torch.float32).view(3, 1, 1)


# A JPEG marker: FF followed by neither a stuffed 00, a restart code (D0-D7) nor a fill FF.
_JPEG_MARKER = re.compile(b"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_STANDALONE = (0x01, 0xD8)  # markers without a length field (besides RSTn and EOI)


def _jpeg_has_end(data: bytes) -> bool:
    """True when the JPEG's own end-of-image marker (FF D9) follows its image data.

    Walks the segments from the start: header segments (APPn, with EXIF thumbnails that have
    their own FF D9, DQT, ...) are skipped by their length, scan data up to the next marker
    (inside it an FF byte is always stuffed, so no marker occurs by accident). Bytes after the
    end marker (a phone's motion-photo video, a second MPF image) are not looked at.
    """
    pos = 2
    while True:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            return False
        code, pos = data[found.start() + 1], found.end()
        if code == 0xD9:
            return True
        if code not in _JPEG_STANDALONE:
            if pos + 2 > len(data):
                return False
            pos += int.from_bytes(data[pos:pos + 2], "big")


def truncation_problem(data: bytes) -> Optional[str]:
    """Why a JPEG or PNG file is cut short, or None.

    Decoders fill a truncated image with grey and return it with only a warning on stderr,
    so the file's structure is checked: a JPEG must reach its end-of-image marker (FF D9)
    after its image data (`_jpeg_has_end`), a PNG must have its IEND chunk. Other formats: None.
    """
    if data[:2] == b"\xff\xd8":
        if not _jpeg_has_end(data):
            return "JPEG is truncated (no end-of-image marker after the image data)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(b"IEND") < 0:
            return "PNG is truncated (no IEND chunk)"
    return None


def read_image(path: Union[str, Path]) -> Tuple[Optional[np.ndarray], str]:
    """(HxWx3 BGR uint8 image, "") decoded as cv2.imread decodes it (EXIF orientation applied), or
    (None, why) for a file that cannot be read, is empty, cannot be decoded or is cut short:
    cv2.imread returns a truncated JPEG or PNG filled with grey and says so only on stderr. The
    file is read once; training's pre-flight check (data/check.py), the demo, evaluation and INT8
    calibration all use this."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror or exc})"
    except ValueError as exc:  # a path the OS cannot take (a NUL byte, unencodable characters)
        return None, f"cannot read the file ({exc})"
    if not data:
        return None, "image file is empty (0 bytes)"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    truncated = truncation_problem(data)
    if image is None or image.size == 0:
        why = f"; {truncated}" if truncated else ""
        return None, f"image cannot be decoded (corrupt or not an image{why})"
    if truncated:
        return None, truncated
    return image, ""


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

    `scale` resizes first (bilinear, on float32 pixels as the published test_widerface.py and
    RetinaFace's detect.py resize: a uint8 resize would round every pixel to an integer, up to
    0.5 away, which moved the published model's scores by up to 2e-2); boxes found on the tensor
    are divided by `scale` to return to the original image.
    """
    if scale != 1.0:
        _check_bgr(image_bgr)
        height, width = image_bgr.shape[:2]
        # OpenCV sizes the output by rounding each side half to even, and maps pixels by `scale`
        # itself only when it sizes the output (an explicit dsize redefines the scale). A side
        # that would round to 0 (a thin strip scaled down) keeps 1 pixel instead of failing.
        size = (round(width * scale), round(height * scale))
        dsize = None if min(size) >= 1 else (max(1, size[0]), max(1, size[1]))
        resized = cv2.resize(image_bgr.astype(np.float32, copy=False), dsize, fx=scale, fy=scale,
                             interpolation=cv2.INTER_LINEAR)
        chw = torch.from_numpy(np.ascontiguousarray(resized.reshape(resized.shape[0], resized.shape[1], 3)
                                                    .transpose(2, 0, 1)))
        return chw.sub_(_MEAN_CHW)
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
