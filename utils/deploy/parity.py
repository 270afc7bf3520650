"""Parity of exported graphs with PyTorch: raw outputs per input shape, and detections per image."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from data.config import MEAN_BGR
from data.preprocess import preprocess
from utils.deploy.export import (DEFAULT_KEEP_TOP_K, DEFAULT_NMS_THRESHOLD, DEFAULT_SCORE_THRESHOLD, DEFAULT_TOP_K,
                                 DETECTION_KEY, FACES_NAME, SCORE_THRESHOLD_NAME, ExportError, PathLike, ort_session,
                                 read_metadata)
from utils.inference.detector import INPUT_NAME, OUTPUT_NAMES

# Parity limits (max |ORT - PyTorch|): scores are probabilities, boxes/landmarks regressions.
TOLERANCES: Dict[str, float] = {"bbox_regressions": 1e-3, "classifications": 1e-4, "landmarks": 1e-3}
# (batch, height, width) checked by `--test_sizes`: squares, a non-square and a size that is
# not a multiple of 32, then batches 1-8 at a small size.
PARITY_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (1, 320, 320), (1, 416, 416), (1, 640, 640), (1, 832, 832), (1, 1024, 1024),
    (1, 480, 640), (1, 375, 500), (1, 256, 256), (2, 256, 256), (4, 256, 256), (8, 256, 256),
)


@dataclass(frozen=True)
class ParityRow:
    """Max |ORT - PyTorch| per output for one input shape."""

    shape: Tuple[int, int, int]  # batch, height, width
    diffs: Dict[str, float]

    @property
    def ok(self) -> bool:
        return all(self.diffs[name] <= TOLERANCES[name] for name in OUTPUT_NAMES)


def check_parity(model: nn.Module, path: PathLike, shapes: Iterable[Tuple[int, int, int]] = PARITY_SHAPES,
                 seed: int = 0, session=None) -> List[ParityRow]:
    """Run the raw graph and the model on the same random inputs (pixel-like range) per shape."""
    session = session or ort_session(path)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    model = model.eval()
    for batch, h, w in shapes:
        # Mean-subtracted pixels lie in about [-123, 151]; uniform noise covers that range.
        x = torch.rand(batch, 3, h, w, generator=generator) * 255 - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
        with torch.inference_mode():
            expected = model(x)
        try:
            got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run {path} on input {(batch, 3, h, w)}: {exc}") from exc
        diffs = {}
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if tuple(g.shape) != tuple(e.shape):
                raise ExportError(f"{path}: output {name} has shape {g.shape} at input {(batch, 3, h, w)}, "
                                  f"PyTorch gives {tuple(e.shape)}")
            diffs[name] = float(np.abs(g - e.numpy()).max())
        rows.append(ParityRow((batch, h, w), diffs))
    return rows


def format_parity(rows: Sequence[ParityRow]) -> str:
    """A table of per-output max differences with the tolerances."""
    head = f"{'input (B,H,W)':>18}  " + "  ".join(f"{n:>17}" for n in OUTPUT_NAMES) + "  status"
    lines = [head]
    for row in rows:
        cells = "  ".join(f"{row.diffs[n]:>17.2e}" for n in OUTPUT_NAMES)
        lines.append(f"{str(row.shape):>18}  {cells}  {'ok' if row.ok else 'FAIL'}")
    lines.append("tolerances: " + ", ".join(f"{n} {TOLERANCES[n]:.0e}" for n in OUTPUT_NAMES))
    return "\n".join(lines)


def match_detections(reference: np.ndarray, candidate: np.ndarray, iou: float = 0.5
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching by IoU (reference rows in score order).

    Returns (ref_index, cand_index, iou) of the matched pairs with IoU >= `iou`.
    """
    if len(reference) == 0 or len(candidate) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    ious = box_iou(torch.from_numpy(reference[:, :4]), torch.from_numpy(candidate[:, :4])).numpy()
    ref_idx, cand_idx, values = [], [], []
    taken = np.zeros(len(candidate), dtype=bool)
    for i in range(len(reference)):
        row = np.where(taken, -1.0, ious[i])
        j = int(row.argmax())
        if row[j] >= iou:
            taken[j] = True
            ref_idx.append(i), cand_idx.append(j), values.append(row[j])
    return np.asarray(ref_idx, np.int64), np.asarray(cand_idx, np.int64), np.asarray(values, np.float32)


@dataclass(frozen=True)
class DetectionDiff:
    """How one image's detections differ between a reference and another pipeline."""

    name: str
    reference: int  # faces found by the reference
    candidate: int  # faces found by the other pipeline
    matched: int  # one-to-one pairs with IoU >= 0.5
    max_coord_diff: float  # max |diff| over boxes + landmarks of matched pairs (pixels)
    max_score_diff: float
    min_iou: float
    mean_iou: float

    def line(self) -> str:
        return (f"{self.name}: reference {self.reference} faces, other {self.candidate}, matched {self.matched}, "
                f"max coord diff {self.max_coord_diff:.2e} px, max score diff {self.max_score_diff:.2e}, "
                f"IoU min {self.min_iou:.4f} mean {self.mean_iou:.4f}")


def compare_detections(name: str, reference: np.ndarray, candidate: np.ndarray) -> DetectionDiff:
    ref_i, cand_i, ious = match_detections(reference, candidate)
    if len(ref_i):
        coords = np.abs(np.delete(reference[ref_i], 4, 1) - np.delete(candidate[cand_i], 4, 1)).max()
        scores = np.abs(reference[ref_i, 4] - candidate[cand_i, 4]).max()
        min_iou, mean_iou = float(ious.min()), float(ious.mean())
    else:
        coords = scores = 0.0
        min_iou = mean_iou = 1.0 if len(reference) == len(candidate) == 0 else 0.0
    return DetectionDiff(name, len(reference), len(candidate), len(ref_i), float(coords), float(scores), min_iou,
                         mean_iou)


def run_detection_graph(session, image_bgr: np.ndarray, score_threshold: float) -> np.ndarray:
    """faces (K, 15) of one image at its own size (scale 1), from a detection-graph session."""
    x = preprocess(image_bgr).unsqueeze(0).numpy()
    return session.run([FACES_NAME], {INPUT_NAME: x, SCORE_THRESHOLD_NAME: np.array(score_threshold, np.float32)})[0]


def check_detection_parity(model: nn.Module, path: PathLike, images: Dict[str, np.ndarray],
                           score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> List[DetectionDiff]:
    """Detection graph vs the PyTorch pipeline (FaceDetector: preprocess, decode + NMS) per image."""
    from utils.inference.detector import FaceDetector

    settings = json.loads(read_metadata(path).get(DETECTION_KEY, "{}"))
    detector = FaceDetector(model, backend="torch", conf=score_threshold,
                            nms=settings.get("nms_threshold", DEFAULT_NMS_THRESHOLD),
                            top_k=settings.get("top_k", DEFAULT_TOP_K),
                            keep_top_k=settings.get("keep_top_k", DEFAULT_KEEP_TOP_K))
    session = ort_session(path)
    return [compare_detections(name, detector.detect_array(image), run_detection_graph(session, image, score_threshold))
            for name, image in images.items()]


def detection_graph_ok(diff: DetectionDiff, coord_tol: float = 1e-2, score_tol: float = 1e-4) -> bool:
    """Same faces (count and one-to-one matches) with coordinates/scores within tolerance."""
    return (diff.reference == diff.candidate == diff.matched and diff.max_coord_diff <= coord_tol
            and diff.max_score_diff <= score_tol)
