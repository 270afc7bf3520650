"""Training augmentation as RetinaFace trains, and the deterministic validation transform.

TrainTransform: random square crop (side = scale x short side, scale from CROP_SCALES,
faces kept when their centre is inside; up to 250 tries, else the whole image) ->
photometric distortion (brightness, contrast, saturation, hue) -> pad to square with the
mean colour -> random horizontal flip (landmark pairs swapped) -> resize with a random
interpolation -> mean subtraction. Faces smaller than `min_face_size` pixels at the
output size are dropped. Every random choice comes from one numpy Generator.

Coordinates are continuous pixels: a box x1..x2 covers [x1, x2), so mirroring maps
x -> width - x and flipping twice is the identity.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.utils.data

from data.config import MEAN_BGR
from data.preprocess import letterbox, preprocess

__all__ = [
    "CROP_SCALES", "LANDMARK_FLIP_ORDER", "as_generator", "landmark_labels", "make_targets",
    "random_crop", "distort", "mirror", "pad_to_square", "TrainTransform", "ValTransform",
]

RngLike = Union[None, int, np.random.Generator]

# RetinaFace's crop scales (fraction of the short side) and its retry budget.
CROP_SCALES: Tuple[float, ...] = (0.3, 0.45, 0.6, 0.8, 1.0)
MAX_CROP_TRIES = 250
# RetinaFace picks the resize interpolation at random, a cheap extra augmentation.
INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)
# Landmark order is left eye, right eye, nose, left mouth, right mouth (image left/right);
# a mirror image turns each left point into the right one.
LANDMARK_FLIP_ORDER = (1, 0, 2, 4, 3)


def as_generator(rng: RngLike) -> np.random.Generator:
    """A Generator as given, or a new one seeded from an int / OS entropy."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def landmark_labels(landmarks: np.ndarray) -> np.ndarray:
    """(K, 10) landmarks -> (K,) float32 labels: 1 with landmarks, -1 without (all -1)."""
    absent = np.all(landmarks == -1, axis=1)
    return np.where(absent, -1.0, 1.0).astype(np.float32)


def _present(landmarks: np.ndarray) -> np.ndarray:
    return ~np.all(landmarks == -1, axis=1)


def make_targets(boxes: np.ndarray, landmarks: np.ndarray, labels: np.ndarray,
                 width: float, height: float) -> np.ndarray:
    """Pixel boxes/landmarks of a width x height image -> (K, 15) float32 targets in [0, 1].

    Row: x1, y1, x2, y2, lx0, ly0, ..., lx4, ly4, label; absent landmarks stay -1.
    """
    count = len(boxes)
    target = np.empty((count, 15), dtype=np.float32)
    target[:, 0:4] = np.asarray(boxes, dtype=np.float32).reshape(count, 4) / np.float32([width, height] * 2)
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(count, 10)
    target[:, 4:14] = np.where(_present(landmarks)[:, None], landmarks / np.float32([width, height] * 5), -1.0)
    target[:, 14] = np.asarray(labels, dtype=np.float32).reshape(count)
    return target


def _keep_large(boxes: np.ndarray, scale: float, min_face_size: float) -> np.ndarray:
    """Mask of faces at least `min_face_size` wide and high after scaling by `scale`."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return (w > 0) & (h > 0) & (np.minimum(w, h) * scale >= min_face_size)


def _clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    return np.clip(boxes, 0, np.float32([width, height, width, height])).astype(np.float32)


def random_crop(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, labels: np.ndarray,
                rng: np.random.Generator, *, scales: Sequence[float] = CROP_SCALES,
                max_tries: int = MAX_CROP_TRIES, output_size: Optional[int] = None,
                min_face_size: float = 0.0
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Optional[Tuple[int, int, int, int]]]:
    """Random square crop keeping the faces whose centre lies inside it.

    A crop is accepted when at least one face lies fully inside it and at least one kept
    face is >= `min_face_size` pixels once the crop is resized to `output_size` (RetinaFace
    rule). Returns (image, boxes, landmarks, labels, roi); roi = (x1, y1, x2, y2) of the
    crop, or None when no crop was found and the whole image is returned (to be padded to
    square, so sizes are judged against its long side).
    """
    height, width = image.shape[:2]
    boxes = _clip_boxes(boxes, width, height)
    landmarks = np.asarray(landmarks, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    short_side = min(height, width)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    has_points = _present(landmarks)
    for _ in range(max_tries):
        side = max(1, int(float(rng.choice(scales)) * short_side))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        roi = (left, top, left + side, top + side)
        if len(boxes):
            fully_inside = np.all((boxes[:, :2] >= roi[:2]) & (boxes[:, 2:] <= roi[2:]), axis=1)
            if not fully_inside.any():
                continue
        keep = np.all((centres >= roi[:2]) & (centres < roi[2:]), axis=1)
        kept = np.clip(boxes[keep], np.float32(roi[:2] * 2), np.float32(roi[2:] * 2)) - np.float32(roi[:2] * 2)
        scale = 1.0 if output_size is None else output_size / side
        large = _keep_large(kept, scale, min_face_size)
        if len(boxes) and not large.any():
            continue
        points = landmarks[keep].copy()
        shift = has_points[keep]
        points[shift] -= np.float32(roi[:2] * 5)
        crop = image[top:top + side, left:left + side]
        return crop, kept[large], points[large], labels[keep][large], roi
    scale = 1.0 if output_size is None else output_size / max(height, width)
    large = _keep_large(boxes, scale, min_face_size)
    return image, boxes[large], landmarks[large].copy(), labels[large], None


def _affine_lut(lut: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return np.clip(lut * alpha + beta, 0, 255)


def distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, each applied with probability 1/2.

    Ranges as RetinaFace: brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18
    (OpenCV's 0..179 hue scale); contrast goes before or after the HSV part at random.
    """
    contrast_first = rng.random() < 0.5
    brightness = rng.uniform(-32, 32) if rng.random() < 0.5 else None
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    saturation = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    hue = int(rng.integers(-18, 19)) if rng.random() < 0.5 else None

    identity = np.arange(256, dtype=np.float32)
    # Brightness and contrast are per-value maps, so they are composed into one lookup table.
    lut = identity
    if brightness is not None:
        lut = _affine_lut(lut, 1.0, brightness)
    if contrast is not None and contrast_first:
        lut = _affine_lut(lut, contrast, 0.0)
    out = image if lut is identity else cv2.LUT(image, np.round(lut).astype(np.uint8))
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        h, s, v = cv2.split(hsv)
        if saturation is not None:
            s = cv2.LUT(s, np.round(_affine_lut(identity, saturation, 0.0)).astype(np.uint8))
        if hue is not None:
            h = cv2.LUT(h, ((identity + hue) % 180).astype(np.uint8))
        out = cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2BGR)
    if contrast is not None and not contrast_first:
        out = cv2.LUT(out, np.round(_affine_lut(identity, contrast, 0.0)).astype(np.uint8))
    return out if out is not image else image.copy()


def mirror(image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray
           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal flip of image, boxes and landmarks, swapping left/right landmark points."""
    width = image.shape[1]
    flipped = np.ascontiguousarray(image[:, ::-1])
    boxes = np.asarray(boxes, dtype=np.float32)
    new_boxes = boxes.copy()
    new_boxes[:, 0] = width - boxes[:, 2]
    new_boxes[:, 2] = width - boxes[:, 0]
    landmarks = np.asarray(landmarks, dtype=np.float32)
    points = landmarks.reshape(-1, 5, 2)[:, LANDMARK_FLIP_ORDER].copy()
    points[..., 0] = width - points[..., 0]
    new_landmarks = np.where(_present(landmarks)[:, None], points.reshape(-1, 10), landmarks)
    return flipped, new_boxes, new_landmarks.astype(np.float32)


def pad_to_square(image: np.ndarray, fill: Sequence[float] = MEAN_BGR) -> np.ndarray:
    """Pad bottom/right to a square of the long side with `fill` (coordinates unchanged)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=image.dtype)
    out[:] = np.asarray(fill, dtype=np.float32).round().astype(image.dtype)
    out[:height, :width] = image
    return out


class TrainTransform:
    """(BGR uint8 image, boxes (K,4) xyxy px, landmarks (K,10) px, labels (K,)) ->
    (tensor (3, S, S) float32, targets (K', 15) float32 normalised to [0, 1]).

    `rgb_mean` is the padding colour (BGR, as the name in RetinaFace's code); with the
    default it becomes 0 after the shared mean subtraction. In DataLoader workers the
    generator is re-derived from the worker's seed, so workers do not repeat each other.
    """

    def __init__(self, image_size: int = 640, rgb_mean: Sequence[float] = MEAN_BGR, rng: RngLike = None,
                 min_face_size: float = 2.0, crop_scales: Sequence[float] = CROP_SCALES,
                 max_crop_tries: int = MAX_CROP_TRIES, flip_probability: float = 0.5,
                 photometric: bool = True) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.rgb_mean = tuple(float(v) for v in rgb_mean)
        self.rng = as_generator(rng)
        self.min_face_size = float(min_face_size)
        self.crop_scales = tuple(crop_scales)
        self.max_crop_tries = int(max_crop_tries)
        self.flip_probability = float(flip_probability)
        self.photometric = photometric
        self._worker_entropy = int(self.rng.integers(2**62))
        self._worker_seed: Optional[int] = None

    def _generator(self) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            # Each worker holds a copy of this object with the same generator state.
            self._worker_seed = info.seed
            self.rng = np.random.default_rng([self._worker_entropy, info.seed % 2**62])
        return self.rng

    def __call__(self, image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray,
                 labels: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, np.ndarray]:
        return self.apply(image, boxes, landmarks, labels, self._generator())

    def apply(self, image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray,
              labels: Optional[np.ndarray], rng: np.random.Generator) -> Tuple[torch.Tensor, np.ndarray]:
        """The transform with an explicit generator (the trainer seeds one per (epoch, image))."""
        if labels is None:
            labels = landmark_labels(np.asarray(landmarks))
        image, boxes, landmarks, labels, _ = random_crop(
            image, boxes, landmarks, labels, rng, scales=self.crop_scales, max_tries=self.max_crop_tries,
            output_size=self.image_size, min_face_size=self.min_face_size)
        if self.photometric:
            image = distort(image, rng)
        image = pad_to_square(image, self.rgb_mean)
        if rng.random() < self.flip_probability:
            image, boxes, landmarks = mirror(image, boxes, landmarks)
        side = image.shape[0]
        interpolation = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
        image = cv2.resize(image, (self.image_size, self.image_size), interpolation=interpolation)
        return preprocess(image), make_targets(boxes, landmarks, labels, side, side)


class ValTransform:
    """Deterministic: resize so the longer side is `image_size`, pad bottom/right to a square
    with the mean colour (0 after normalisation), normalise (data.preprocess.letterbox). Same
    geometry as padding to a square first, without building the padded full-size image (a
    100x16000 panorama would need a 16000x16000 one).

    Boxes are clipped to the image; faces with no area left are dropped.
    """

    def __init__(self, image_size: int = 640, min_face_size: float = 0.0) -> None:
        self.image_size = int(image_size)
        self.min_face_size = float(min_face_size)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray,
                 labels: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, np.ndarray]:
        height, width = image.shape[:2]
        landmarks = np.asarray(landmarks, dtype=np.float32)
        labels = landmark_labels(landmarks) if labels is None else np.asarray(labels, dtype=np.float32)
        boxes = _clip_boxes(np.asarray(boxes, dtype=np.float32), width, height)
        side = max(height, width)
        keep = _keep_large(boxes, self.image_size / side, self.min_face_size)
        tensor, _ = letterbox(image, (self.image_size, self.image_size), scale=self.image_size / side)
        return tensor, make_targets(boxes[keep], landmarks[keep], labels[keep], side, side)
