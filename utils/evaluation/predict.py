"""Run a FaceDetector over WIDER FACE val images and evaluate the result (used by
test_widerface.py and test_v1_v2_comparison.py).

Predictions go to `<save_folder>/<event>/<image>.txt` in the official layout. A run is
resumable: images whose prediction file already exists (and parses) are skipped. The settings
that shape the predictions are kept beside the folder (`<save_folder>_settings.json`) so a
resumed run with other settings stops instead of mixing two runs' files.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from tqdm import tqdm

from data.preprocess import IMAGE_SUFFIXES
from utils.errors import FeatherFaceError
from utils.evaluation.tta import detect_with_tta
from utils.evaluation.widerface_eval import (WiderFaceEvalError, WiderFaceResult, evaluate_predictions, load_ground_truth,
                                  prediction_path, read_prediction_file, read_predictions, write_prediction_file)

PathLike = Union[str, Path]


def list_images(dataset_folder: PathLike, image_list: Optional[PathLike] = None) -> List[str]:
    """Relative paths `event/name.jpg`: the lines of `image_list`, or every image one folder
    below `dataset_folder` (the WIDER layout `<event>/<image>.jpg`), sorted."""
    root = Path(dataset_folder)
    if image_list is not None:
        images = []
        for number, line in enumerate(Path(image_list).read_text().splitlines(), start=1):
            entry = line.strip().lstrip("/")  # some published lists start lines with "/"
            if not entry:
                continue
            parts = entry.split("/")
            if len(parts) != 2 or not all(parts) or Path(entry).suffix.lower() not in IMAGE_SUFFIXES:
                raise FeatherFaceError(f"{image_list}:{number}: expected 'event/name.jpg', got {line.strip()!r}")
            images.append(entry)
        if not images:
            raise FeatherFaceError(f"{image_list} lists no images")
        return images
    if not root.is_dir():
        raise FeatherFaceError(f"dataset folder {root} does not exist")
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise FeatherFaceError(f"{root} holds images directly ({stray[0]}, ...); expected the WIDER layout "
                               f"<event>/<image>.jpg (point --dataset_folder at WIDER_val/images)")
    images = sorted(f"{event.name}/{p.name}" for event in root.iterdir() if event.is_dir()
                    for p in event.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FeatherFaceError(f"no <event>/<image>.jpg images under {root}")
    return images


def image_key(relative_path: str) -> Tuple[str, str]:
    """`event/name.jpg` -> (event, name): the ground truth's and the prediction file's key."""
    event, file_name = relative_path.split("/")
    return event, Path(file_name).stem


def to_xywh_score(detections: np.ndarray, integer: bool = False) -> np.ndarray:
    """(K, 15) detector rows -> (K, 5) float64 x, y, w, h, score, w = x2 - x1.

    integer=True truncates the corners first, w = int(x2) - int(x1), as RetinaFace's
    test_widerface.py (biubug6/Pytorch_Retinaface) writes its files.
    """
    boxes = np.asarray(detections, dtype=np.float64)[:, :5].copy()
    if integer:
        boxes[:, :4] = np.trunc(boxes[:, :4])
    boxes[:, 2:4] -= boxes[:, 0:2]
    return boxes


def file_digest(path: PathLike) -> str:
    """First 16 hex digits of a file's sha256 (identifies the weights in the settings)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def detection_settings(detector, model_id: str, flip: bool = False, scales: Optional[Sequence[float]] = None,
                       integer_boxes: bool = False) -> Dict[str, object]:
    """Everything that changes the prediction files of a run."""
    return {"model": model_id, "config": detector.config.name, "image_size": detector.image_size,
            "max_size": detector.max_size, "confidence_threshold": detector.conf, "nms_threshold": detector.nms,
            "top_k": detector.top_k, "keep_top_k": detector.keep_top_k, "flip": bool(flip),
            "scales": [float(s) for s in scales] if scales else None, "integer_boxes": bool(integer_boxes)}


def settings_path(save_folder: PathLike) -> Path:
    folder = Path(save_folder).resolve()
    return folder.with_name(folder.name + "_settings.json")


def check_settings(save_folder: PathLike, settings: Dict[str, object], overwrite: bool) -> None:
    """Record the run's settings; refuse to resume a folder written with other settings."""
    path = settings_path(save_folder)
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise FeatherFaceError(
                f"{save_folder} holds predictions made with other settings ({', '.join(changed)} differ, see {path}); "
                f"pass --overwrite to redo them or choose another --save_folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _is_complete(path: Path) -> bool:
    """A prediction file that parses (a run killed mid-write leaves one that does not)."""
    try:
        read_prediction_file(path)
    except WiderFaceEvalError:
        return False
    return True


@dataclass
class PredictionSummary:
    written: int = 0
    skipped: int = 0
    unreadable: List[str] = field(default_factory=list)  # relative paths cv2 could not read
    seconds: float = 0.0  # wall time of the written images: read, detect, write

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.written if self.written else float("nan")

    def to_dict(self) -> Dict[str, object]:
        return {**asdict(self), "seconds_per_image": self.seconds_per_image}


def predict_images(detector, dataset_folder: PathLike, images: Sequence[str], save_folder: PathLike,
                   overwrite: bool = False, flip: bool = False, scales: Optional[Sequence[float]] = None,
                   model_id: Optional[str] = None, integer_boxes: bool = False,
                   progress: bool = True) -> PredictionSummary:
    """Write one prediction file per image (0 boxes included); unreadable images get none.

    With `model_id` the settings are checked against the folder's previous run (check_settings).
    """
    if model_id is not None:
        check_settings(save_folder, detection_settings(detector, model_id, flip, scales, integer_boxes), overwrite)
    summary = PredictionSummary()
    bar = tqdm(images, desc="predict", unit="img", disable=None if progress else True)
    for relative in bar:
        event, name = image_key(relative)
        out = prediction_path(save_folder, event, name)
        if not overwrite and out.is_file() and _is_complete(out):
            summary.skipped += 1
            continue
        start = time.perf_counter()
        image = cv2.imread(str(Path(dataset_folder) / relative), cv2.IMREAD_COLOR)
        if image is None:
            summary.unreadable.append(relative)
            tqdm.write(f"warning: cannot read image {Path(dataset_folder) / relative}; no prediction file written")
            continue
        detections = detect_with_tta(detector, image, flip, scales)
        write_prediction_file(out, name, to_xywh_score(detections, integer_boxes))
        summary.seconds += time.perf_counter() - start
        summary.written += 1
    return summary


def evaluate_images(pred_dir: PathLike, gt_dir: PathLike, images: Optional[Sequence[str]] = None,
                    allow_missing: bool = False) -> Tuple[WiderFaceResult, int, int]:
    """Easy / medium / hard AP of a prediction folder -> (result, images evaluated, val images).

    `images` (relative paths) restricts the ground truth to those images; None evaluates all.
    """
    gt = load_ground_truth(gt_dir)
    total = len(gt)
    if images is not None:
        wanted = {image_key(r) for r in images}
        gt = tuple(g for g in gt if (g.event, g.name) in wanted)
        unknown = sorted(wanted - {(g.event, g.name) for g in gt})
        if unknown:
            raise WiderFaceEvalError(f"{len(unknown)} listed image(s) are not in the ground truth of {gt_dir}, "
                                     f"e.g. {'/'.join(unknown[0])}")
    missing = [g for g in gt if not prediction_path(pred_dir, g.event, g.name).is_file()]
    if missing and not allow_missing:
        raise WiderFaceEvalError(
            f"{len(missing)} of {len(gt)} images have no prediction file in {pred_dir} (e.g. {missing[0].event}/"
            f"{missing[0].name}); predict them, give --image_list to evaluate a subset, or pass --allow_missing "
            f"to count them as no detections")
    preds = read_predictions(pred_dir, gt, allow_missing=True)
    return evaluate_predictions(preds, gt, allow_missing=True), len(gt), total
