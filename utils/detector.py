"""FaceDetector: the one inference path behind the Python API, detect.py, test_widerface.py
and the benchmark.

    from utils.detector import FaceDetector
    detector = FaceDetector("weights/v1_original.pth")        # or an exported .onnx file
    faces = detector.detect(cv2.imread("photo.jpg"))          # [Face(box, score, landmarks)]

Preprocessing (data/preprocess.py), priors (cached per input size), decode and NMS
(utils/postprocess.py) are shared with training, evaluation and the exported package; only
the network call differs between the PyTorch and ONNX Runtime backends.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from data.config import ModelConfig
from data.preprocess import preprocess_batch, resize_scale
from layers.prior_box import prior_boxes_for
from utils.errors import FeatherFaceError
from utils.postprocess import detect_faces

ONNX_CONFIG_KEY = "featherface_model_config"  # metadata_props entry holding ModelConfig JSON


@dataclass(frozen=True)
class Face:
    """One detection in original-image pixels."""

    box: Tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    landmarks: Tuple[Tuple[float, float], ...]  # 5 (x, y): left eye, right eye, nose, mouth left, mouth right

    @classmethod
    def from_row(cls, row: np.ndarray) -> "Face":
        return cls(tuple(float(v) for v in row[:4]), float(row[4]),
                   tuple((float(row[5 + 2 * i]), float(row[6 + 2 * i])) for i in range(5)))


class TorchBackend:
    """Runs a FeatherFace nn.Module (eval mode, inference_mode)."""

    def __init__(self, model: nn.Module, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config: ModelConfig = model.config

    def __call__(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return self.model(batch.to(self.device))


class OnnxBackend:
    """Runs an exported raw-output graph with ONNX Runtime (CPU unless providers say otherwise)."""

    def __init__(self, path: Union[str, Path], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_CONFIG_KEY not in meta:
            raise FeatherFaceError(f"{path} has no FeatherFace model config in its metadata; export it with export_dynamic_onnx.py")
        self.config = ModelConfig.from_dict(json.loads(meta[ONNX_CONFIG_KEY]))
        self.device = torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = self.session.run(["bbox_regressions", "classifications", "landmarks"], {"input": batch.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)


class FaceDetector:
    """Find faces with a FeatherFace checkpoint (.pth), an exported .onnx file or a model.

    image_size: None runs each image at its own size; an int resizes so the shorter side is
    that many pixels (longer side capped at `max_size` when given). Boxes and landmarks are
    returned in original-image pixels.
    """

    def __init__(self, weights: Union[str, Path, nn.Module], backend: str = "torch", device: str = "cpu",
                 image_size: Optional[int] = None, conf: float = 0.5, nms: float = 0.4, top_k: int = 5000,
                 keep_top_k: int = 750, max_size: Optional[int] = None, threads: Optional[int] = None) -> None:
        if backend == "torch":
            if isinstance(weights, nn.Module):
                model = weights
            else:
                from utils.checkpoint import load_model

                model, _ = load_model(weights)
            self.backend = TorchBackend(model, device)
        elif backend == "onnx":
            self.backend = OnnxBackend(weights, threads=threads)
        else:
            raise FeatherFaceError(f"unknown backend {backend!r}; use 'torch' or 'onnx'")
        self.config = self.backend.config
        self.image_size, self.max_size = image_size, max_size
        self.conf, self.nms, self.top_k, self.keep_top_k = conf, nms, top_k, keep_top_k

    def scale_for(self, image: np.ndarray) -> float:
        return resize_scale(image.shape[0], image.shape[1], self.image_size, self.max_size)

    def detect_arrays(self, images: Sequence[np.ndarray], scale: Optional[float] = None) -> List[np.ndarray]:
        """Detections per image as (K, 15) float32 arrays [x1, y1, x2, y2, score, 10 landmark
        coords] in original pixels, sorted by score. Each image is resized by its own scale
        (or by `scale` when given), and the batch is zero-padded bottom/right to a common size."""
        if len(images) == 0:
            return []
        for image in images:
            if image is None or image.ndim != 3 or image.shape[2] != 3:
                raise FeatherFaceError("expected BGR images of shape HxWx3 (cv2.imread returns None for unreadable files)")
        scales = [self.scale_for(im) if scale is None else scale for im in images]
        batch, (height, width) = preprocess_batch(images, scales)
        loc, conf, landm = self.backend(batch)
        priors = prior_boxes_for(self.config, (height, width), device=loc.device)
        return [
            detect_faces(loc[i], conf[i], landm[i], priors, self.config.variance, (height, width), s,
                         self.conf, self.nms, self.top_k, self.keep_top_k)
            for i, s in enumerate(scales)
        ]

    def detect_array(self, image: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
        return self.detect_arrays([image], scale)[0]

    def detect(self, image: np.ndarray) -> List[Face]:
        """Faces in one BGR image, highest score first."""
        return [Face.from_row(row) for row in self.detect_array(image)]

    def detect_batch(self, images: Sequence[np.ndarray]) -> List[List[Face]]:
        """Faces per image for several BGR images (one network call)."""
        return [[Face.from_row(r) for r in rows] for rows in self.detect_arrays(images)]
