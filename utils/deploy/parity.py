"""Parity of exported graphs with PyTorch: raw outputs per input shape, and detections per image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from data.config import MEAN_BGR
from data.preprocess import letterbox, preprocess
from layers.box_utils import box_iou
from utils.deploy.export import (FACES_NAME, SCORE_THRESHOLD_NAME, ExportError, PathLike, detection_settings,
                                 fixed_input_size, ort_session)
from utils.inference.detector import INPUT_NAME, OUTPUT_NAMES, session_input_size
from utils.inference.postprocess import DEMO_POSTPROCESS

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


# Two pipelines that agree to float32 rounding can still keep different faces where scores tie:
# at the keep-top-k cut, and between overlapping boxes in NMS. Scores this close count as tied.
TIE_SCORE_TOLERANCE = 1e-4
SWAP_PIXELS = 0.5  # matched boxes further apart than this are different anchors, not rounding


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
    ties: int = 0  # unmatched faces explained by a score tie (keep-top-k cut or NMS between overlapping boxes)

    @property
    def unexplained(self) -> int:
        """Unmatched faces (either side) that no score tie explains."""
        return self.reference + self.candidate - 2 * self.matched - self.ties

    def line(self) -> str:
        ties = f" ({self.ties} unmatched at tied scores)" if self.ties else ""
        return (f"{self.name}: reference {self.reference} faces, other {self.candidate}, matched {self.matched}{ties}, "
                f"max coord diff {self.max_coord_diff:.2e} px, max score diff {self.max_score_diff:.2e}, "
                f"IoU min {self.min_iou:.4f} mean {self.mean_iou:.4f}")


def _tied(faces: np.ndarray, unmatched: np.ndarray, other: np.ndarray, cut: Optional[float],
          nms_threshold: Optional[float], tolerance: float) -> int:
    """How many `unmatched` rows of `faces` are explained by a tie: a score within `tolerance` of
    the keep-top-k cut, or an overlapping face (IoU > nms_threshold) of the other pipeline whose
    score is within `tolerance` (NMS kept one of two near-equal boxes)."""
    if len(unmatched) == 0:
        return 0
    scores = faces[unmatched, 4]
    tied = np.zeros(len(unmatched), dtype=bool)
    if cut is not None:
        tied |= scores <= cut + tolerance
    if nms_threshold is not None and len(other):
        ious = box_iou(torch.from_numpy(faces[unmatched, :4]), torch.from_numpy(other[:, :4])).numpy()
        close = np.abs(scores[:, None] - other[None, :, 4]) <= tolerance
        tied |= ((ious > nms_threshold) & close).any(axis=1)
    return int(tied.sum())


def compare_detections(name: str, reference: np.ndarray, candidate: np.ndarray, keep_top_k: Optional[int] = None,
                       nms_threshold: Optional[float] = None,
                       tie_tolerance: float = TIE_SCORE_TOLERANCE) -> DetectionDiff:
    """Match faces one-to-one (IoU >= 0.5) and measure the matched pairs' differences.

    With `keep_top_k`, a pipeline that returned that many faces was cut at its lowest score, and
    unmatched faces scoring within `tie_tolerance` of the cut are ties, not errors; with
    `nms_threshold`, so are unmatched faces overlapping a near-equal-score face of the other side,
    and matched pairs that are different anchors (apart by more than SWAP_PIXELS) with tied scores
    (both faces of such a pair count as ties; the pair leaves `matched` and the max differences).
    """
    ref_i, cand_i, ious = match_detections(reference, candidate)
    pair_coords = np.abs(np.delete(reference[ref_i], 4, 1) - np.delete(candidate[cand_i], 4, 1)).max(axis=1, initial=0)
    pair_scores = np.abs(reference[ref_i, 4] - candidate[cand_i, 4])
    # A pair of different anchors (boxes apart by more than rounding) with tied scores: NMS kept
    # the other one of two overlapping boxes. A tie, not a coordinate error.
    swapped = ((pair_coords > SWAP_PIXELS) & (pair_scores <= tie_tolerance) & (ious > nms_threshold)
               if nms_threshold is not None else np.zeros(len(ref_i), dtype=bool))
    kept = ~swapped
    coords = float(pair_coords[kept].max(initial=0.0))
    scores = float(pair_scores[kept].max(initial=0.0))
    if len(ref_i):
        min_iou, mean_iou = float(ious.min()), float(ious.mean())
    else:
        min_iou = mean_iou = 1.0 if len(reference) == len(candidate) == 0 else 0.0
    capped = [f[:, 4].min() for f in (reference, candidate) if keep_top_k and len(f) >= keep_top_k]
    cut = float(max(capped)) if capped else None
    ties = (_tied(reference, np.setdiff1d(np.arange(len(reference)), ref_i), candidate, cut, nms_threshold,
                  tie_tolerance)
            + _tied(candidate, np.setdiff1d(np.arange(len(candidate)), cand_i), reference, cut, nms_threshold,
                    tie_tolerance))
    return DetectionDiff(name, len(reference), len(candidate), len(ref_i) - int(swapped.sum()), coords, scores, min_iou,
                         mean_iou, ties + 2 * int(swapped.sum()))


def run_detection_graph(session, image_bgr: np.ndarray, score_threshold: float) -> np.ndarray:
    """faces (K, 15) of one image, in its pixels, from a detection-graph session: the image at its own
    size (scale 1), or letterboxed into a graph of fixed input size (--static_size)."""
    fixed_size = session_input_size(session)
    x, scale = letterbox(image_bgr, fixed_size) if fixed_size else (preprocess(image_bgr), 1.0)
    faces = session.run([FACES_NAME], {INPUT_NAME: x.unsqueeze(0).numpy(),
                                       SCORE_THRESHOLD_NAME: np.array(score_threshold, np.float32)})[0]
    faces[:, :4] /= scale
    faces[:, 5:] /= scale
    return faces


def check_detection_parity(model: nn.Module, path: PathLike, images: Dict[str, np.ndarray],
                           score_threshold: float = DEMO_POSTPROCESS.conf_threshold) -> List[DetectionDiff]:
    """Detection graph vs the PyTorch pipeline (FaceDetector: preprocess, decode + NMS) per image."""
    from utils.inference.detector import FaceDetector

    settings = detection_settings(path)
    session = ort_session(path)
    detector = FaceDetector(model, backend="torch", conf=score_threshold, nms=settings.nms_threshold,
                            top_k=settings.top_k, keep_top_k=settings.keep_top_k,
                            fixed_size=session_input_size(session))
    return [compare_detections(name, detector.detect_array(image), run_detection_graph(session, image, score_threshold),
                               keep_top_k=detector.keep_top_k, nms_threshold=detector.nms)
            for name, image in images.items()]


def detection_graph_ok(diff: DetectionDiff, coord_tol: float = 1e-2, score_tol: float = 1e-4) -> bool:
    """Same faces (one-to-one matches; unmatched ones only at tied scores, see compare_detections)
    with coordinates/scores within tolerance."""
    return diff.unexplained == 0 and diff.max_coord_diff <= coord_tol and diff.max_score_diff <= score_tol


def verify_export(model: nn.Module, raw: PathLike, detection: Optional[PathLike], images: Dict[str, np.ndarray],
                  score_threshold: float = DEMO_POSTPROCESS.conf_threshold, detections_decide: bool = True,
                  log=print) -> Tuple[List[str], str]:
    """The export's checks: the raw graph vs PyTorch at PARITY_SHAPES (a graph of fixed input size:
    that size at batches 1, 2 and 4), and the detection graph (when given) vs the PyTorch pipeline on
    `images`, logged as they run. Returns (failures, parity table); detection mismatches count as
    failures only if `detections_decide`."""
    fixed_size = fixed_input_size(raw)
    shapes = [(b, *fixed_size) for b in (1, 2, 4)] if fixed_size else PARITY_SHAPES
    rows = check_parity(model, raw, shapes)
    table = format_parity(rows)
    log(table)
    failures = [f"raw graph at {r.shape}" for r in rows if not r.ok]
    if detection and images:
        note = "" if detections_decide else " (untrained: tied scores, informational only)"
        log(f"detection graph vs PyTorch decode + NMS (score > {score_threshold}){note}:")
        for diff in check_detection_parity(model, detection, images, score_threshold):
            log("  " + diff.line())
            if detections_decide and not detection_graph_ok(diff):
                failures.append(f"detection graph on {diff.name}")
    return failures, table
