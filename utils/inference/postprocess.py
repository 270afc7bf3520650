"""The one decode + NMS step, shared by evaluation, the API, the demo and the ONNX package.

Network outputs for one image (regressions, softmaxed scores, landmark regressions) become
an (K, 15) float32 array [x1, y1, x2, y2, score, l0x, l0y, ..., l4x, l4y] in pixels of the
original image, sorted by score (highest first).
Steps (RetinaFace's detect.py): decode against the priors, scale to the network input
size, divide by the resize `scale`, drop scores <= conf_threshold, keep the top_k best,
NMS at nms_threshold (torchvision), keep the first keep_top_k.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from layers.box_utils import decode, decode_landmarks, torchvision_ops
from utils.errors import FeatherFaceError

ArrayLike = Union[torch.Tensor, np.ndarray]
Scale = Union[float, Tuple[float, float]]

DETECTION_COLUMNS = 15


@dataclass(frozen=True)
class PostProcessConfig:
    """Decode + NMS settings: the one home of these numbers for the API, the scripts, evaluation
    and the ONNX detection graph.

    Checked when built (FeatherFaceError): both thresholds finite numbers from 0 to 1; top_k and
    keep_top_k None or an integer >= 0, where 0 means no limit as in the evaluation scripts'
    --top_k 0 (utils/evaluation/predict.py) and is stored as None."""

    conf_threshold: float = 0.5  # scores <= this are dropped
    nms_threshold: float = 0.4  # NMS IoU
    top_k: Optional[int] = 5000  # best-scoring boxes kept before NMS (None or 0: all)
    keep_top_k: Optional[int] = 750  # boxes kept after NMS (None or 0: all)
    # IoU over inclusive pixel areas (x2 - x1 + 1) * (y2 - y1 + 1), as Fast R-CNN's py_cpu_nms
    # used by the published test_widerface.py; False: torchvision's continuous-coordinate IoU.
    pixel_inclusive_nms: bool = False

    def __post_init__(self) -> None:
        for name in ("conf_threshold", "nms_threshold"):
            value = getattr(self, name)
            if not _is_a(numbers.Real, value) or not 0 <= value <= 1:  # NaN fails the comparison too
                raise FeatherFaceError(f"{name} must be a number from 0 to 1, got {value!r}")
        for name in ("top_k", "keep_top_k"):
            value = getattr(self, name)
            if value is not None and (not _is_a(numbers.Integral, value) or value < 0):
                raise FeatherFaceError(f"{name} must be None or an integer >= 0 (0 or None: no limit), got {value!r}")
            object.__setattr__(self, name, int(value) if value else None)  # the dataclass is frozen


def _is_a(kind: type, value: object) -> bool:
    """isinstance for numbers, where True and False do not count."""
    return isinstance(value, kind) and not isinstance(value, bool)


# The demo, FaceDetector and the deployment package: RetinaFace's demo values.
DEMO_POSTPROCESS = PostProcessConfig()
# The published FeatherFace test_widerface.py (read and run, see tests/goldens/README.md):
# scores > 0.02, no top-k and no keep-top-k (both lines are commented out there), NMS 0.4 with
# inclusive-pixel IoU. The paper's WIDER numbers come from this protocol.
WIDER_POSTPROCESS = PostProcessConfig(conf_threshold=0.02, top_k=None, keep_top_k=None, pixel_inclusive_nms=True)


def nms_order(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, pixel_inclusive: bool = False
              ) -> torch.Tensor:
    """Indices kept by greedy NMS, highest score first (torchvision's kernel). `pixel_inclusive`
    grows boxes by one pixel right and bottom, which is exactly py_cpu_nms's inclusive IoU."""
    if pixel_inclusive:
        boxes = boxes.clone()
        boxes[:, 2:] += 1
    return torchvision_ops().nms(boxes, scores, threshold)


def _as_tensor(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.to(device=device, dtype=torch.float32)


def _pixel_factors(image_size: Sequence[int], scale: Scale, device: torch.device) -> torch.Tensor:
    """(x, y) multipliers taking normalised coordinates to original-image pixels."""
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W), got {tuple(image_size)}")
    height, width = image_size
    sx, sy = (scale, scale) if isinstance(scale, numbers.Real) else scale
    if sx <= 0 or sy <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return torch.tensor([width / sx, height / sy], dtype=torch.float32, device=device)


@torch.no_grad()
def detect_faces(loc: ArrayLike, conf: ArrayLike, landm: ArrayLike, priors: ArrayLike,
                 variances: Sequence[float], image_size: Sequence[int], scale: Scale = 1.0,
                 conf_threshold: float = WIDER_POSTPROCESS.conf_threshold,
                 nms_threshold: float = WIDER_POSTPROCESS.nms_threshold,
                 top_k: Optional[int] = WIDER_POSTPROCESS.top_k, keep_top_k: Optional[int] = WIDER_POSTPROCESS.keep_top_k,
                 pixel_inclusive_nms: bool = WIDER_POSTPROCESS.pixel_inclusive_nms) -> np.ndarray:
    """Detections of one image -> float32 (K, 15) [x1, y1, x2, y2, score, 10 landmark coords].

    The thresholds are a `PostProcessConfig`'s fields (default: the WIDER protocol's) and are checked
    as it checks them; top_k / keep_top_k None or 0 keep every box.

    loc (N, 4), conf (N, 2) softmaxed, landm (N, 10) (a leading batch dim of 1 is accepted);
    priors (N, 4); image_size (H, W) of the network input; `scale` is the resize factor
    applied to the original image (or (sx, sy)); coordinates are divided by it.
    """
    device = loc.device if isinstance(loc, torch.Tensor) else torch.device("cpu")
    loc, conf, landm = (_as_tensor(x, n, device) for x, n in ((loc, "loc"), (conf, "conf"), (landm, "landm")))
    priors = _as_tensor(priors, "priors", device)
    if loc.ndim == 3 and loc.shape[0] == 1 and conf.ndim == 3 and landm.ndim == 3:
        loc, conf, landm = loc[0], conf[0], landm[0]
    num = priors.shape[0]
    if (loc.shape != (num, 4) or conf.ndim != 2 or conf.shape[0] != num or conf.shape[1] < 2
            or landm.shape != (num, 10) or priors.shape != (num, 4)):
        raise ValueError(f"detect_faces expects loc (N, 4), conf (N, 2), landm (N, 10), priors (N, 4); got "
                         f"{tuple(loc.shape)}, {tuple(conf.shape)}, {tuple(landm.shape)}, {tuple(priors.shape)} "
                         f"(use detect_faces_batch for a batch)")
    factors = _pixel_factors(image_size, scale, device)
    settings = PostProcessConfig(conf_threshold, nms_threshold, top_k, keep_top_k, pixel_inclusive_nms)
    top_k, keep_top_k = settings.top_k, settings.keep_top_k  # 0 became None

    scores = conf[:, 1]
    keep = torch.nonzero(scores > conf_threshold).squeeze(1)
    if top_k is not None and keep.numel() > top_k:
        keep = keep[scores[keep].topk(top_k).indices]
    if keep.numel() == 0:
        return np.zeros((0, DETECTION_COLUMNS), dtype=np.float32)
    scores = scores[keep]
    boxes = decode(loc[keep], priors[keep], variances) * factors.repeat(2)
    points = decode_landmarks(landm[keep], priors[keep], variances) * factors.repeat(5)

    kept = nms_order(boxes, scores, nms_threshold, pixel_inclusive_nms)[:keep_top_k]  # best first
    dets = torch.cat([boxes[kept], scores[kept, None], points[kept]], dim=1)
    return dets.cpu().numpy().astype(np.float32, copy=False)


@torch.no_grad()
def detect_faces_batch(loc: ArrayLike, conf: ArrayLike, landm: ArrayLike, priors: ArrayLike,
                       variances: Sequence[float], image_size: Sequence[int],
                       scale: Union[Scale, Sequence[Scale]] = 1.0,
                       conf_threshold: float = WIDER_POSTPROCESS.conf_threshold,
                       nms_threshold: float = WIDER_POSTPROCESS.nms_threshold,
                       top_k: Optional[int] = WIDER_POSTPROCESS.top_k,
                       keep_top_k: Optional[int] = WIDER_POSTPROCESS.keep_top_k,
                       pixel_inclusive_nms: bool = WIDER_POSTPROCESS.pixel_inclusive_nms) -> List[np.ndarray]:
    """`detect_faces` for each image of loc (B, N, 4), conf (B, N, 2), landm (B, N, 10).

    `scale` is one float for the whole batch, or a sequence with one entry (a float or
    (sx, sy)) per image.
    """
    if loc.ndim != 3:
        raise ValueError(f"detect_faces_batch expects loc (B, N, 4), got {tuple(loc.shape)}")
    batch = loc.shape[0]
    if isinstance(scale, numbers.Real):
        scales = [scale] * batch
    else:
        scales = list(scale)
        if len(scales) != batch:
            raise ValueError(f"got {len(scales)} scales for a batch of {batch}")
    return [detect_faces(loc[i], conf[i], landm[i], priors, variances, image_size, scales[i], conf_threshold,
                         nms_threshold, top_k, keep_top_k, pixel_inclusive_nms) for i in range(batch)]
