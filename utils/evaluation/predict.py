"""Run a FaceDetector over WIDER FACE val images and evaluate the result (used by
test_widerface.py and test_v1_v2_comparison.py).

The post-processing is the published FeatherFace test_widerface.py's (dohun-mat/FeatherFace;
read and run to confirm, see tests/goldens/README.md): every anchor scoring above the
confidence threshold (its top-k line is commented out), NMS whose IoU counts pixels inclusively
(Fast R-CNN's py_cpu_nms), every survivor kept (its keep-top-k line is commented out too), and
boxes truncated to integers, x = int(x1), w = int(x2) - int(x1). `published_protocol_detector`
(a FaceDetector with WIDER_POSTPROCESS) does the first three, `to_xywh_score` the last; top-k,
keep-top-k and exact float boxes are opt-in.

Predictions go to `<save_folder>/<event>/<image>.txt` in the official layout. A run is
resumable: images whose prediction file already exists (and parses) are skipped; every file is
written under a temporary name and then renamed, so a killed run leaves none cut short. The settings
that shape the predictions are kept beside the folder (`<save_folder>_settings.json`) so a
resumed run with other settings stops instead of mixing two runs' files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from data.preprocess import IMAGE_SUFFIXES, read_image
from utils.errors import FeatherFaceError
from utils.evaluation.tta import detect_with_tta
from utils.evaluation.widerface_eval import (WiderFaceEvalError, WiderFaceResult, evaluate_predictions, image_key,
                                             load_ground_truth, prediction_path, read_image_list, read_prediction_file,
                                             read_predictions, select_images, write_prediction_file,
                                             write_text_atomically)
from utils.inference.detector import FaceDetector
from utils.inference.postprocess import WIDER_POSTPROCESS

PathLike = Union[str, Path]

NO_LIMIT = 0  # top_k / keep_top_k value meaning "keep every box", as the published script does


def list_images(dataset_folder: PathLike, image_list: Optional[PathLike] = None) -> List[str]:
    """Relative paths `event/name.jpg`: the lines of `image_list`, or every image one folder
    below `dataset_folder` (the WIDER layout `<event>/<image>.jpg`), sorted.

    An entry named like an image that is no readable file (a dangling symlink, a folder named
    x.jpg) is listed like any other image, so predict_images reports it with the unreadable
    images (a warning and PredictionSummary.unreadable) instead of it vanishing from the run."""
    root = Path(dataset_folder)
    if image_list is not None:
        return read_image_list(image_list, IMAGE_SUFFIXES)
    if not root.is_dir():
        raise FeatherFaceError(f"dataset folder {root} does not exist")
    stray = sorted(p.name for p in root.iterdir()
                   if not p.is_dir() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if stray:
        raise FeatherFaceError(f"{root} holds images directly ({stray[0]}, ...); expected the WIDER layout "
                               f"<event>/<image>.jpg (point --dataset_folder at WIDER_val/images)")
    # Hidden entries are no WIDER images: macOS copies' AppleDouble files (._x.jpg), .ipynb_checkpoints.
    events = [event for event in root.iterdir() if event.is_dir() and not event.name.startswith(".")]
    images = sorted(f"{event.name}/{p.name}" for event in events
                    for p in event.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise FeatherFaceError(f"no <event>/<image>.jpg images under {root}")
    deeper = sorted(p for event in events for sub in event.iterdir() if sub.is_dir()
                    for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if deeper:
        print(f"warning: {len(deeper)} image(s) in sub-folders of an event are not predicted (e.g. {deeper[0]}); "
              f"the WIDER layout is <event>/<image>.jpg")
    return images


def find_image(dataset_folder: PathLike, relative: str) -> Path:
    """The file of a listed image `event/name.jpg`: that path, or where no such file exists, the
    one image of the event folder with the same name and another suffix (.JPG, .png copies; the
    prediction file is named without the suffix anyway). Otherwise the listed path, unreadable."""
    path = Path(dataset_folder) / relative
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return path
    same_name = [p for p in path.parent.iterdir() if p.stem == path.stem and p.suffix.lower() in IMAGE_SUFFIXES]
    return same_name[0] if len(same_name) == 1 else path


def to_xywh_score(detections: np.ndarray, integer: bool = True) -> np.ndarray:
    """(K, 15) detector rows -> (K, 5) float64 x, y, w, h, score.

    integer=True (the published protocol) truncates the corners toward zero first, as the
    published test_widerface.py does with int(): x = int(x1), w = int(x2) - int(x1).
    integer=False keeps exact floats, w = x2 - x1.
    """
    boxes = np.asarray(detections, dtype=np.float64)[:, :5].copy()
    if integer:
        boxes[:, :4] = np.trunc(boxes[:, :4])
    boxes[:, 2:4] -= boxes[:, 0:2]
    return boxes


def published_protocol_detector(weights, backend: str = "auto", device: str = "cpu",
                                image_size: Optional[int] = None, max_size: Optional[int] = None,
                                conf: float = WIDER_POSTPROCESS.conf_threshold,
                                nms_threshold: float = WIDER_POSTPROCESS.nms_threshold, top_k: int = NO_LIMIT,
                                keep_top_k: int = NO_LIMIT, threads: Optional[int] = None) -> FaceDetector:
    """A FaceDetector post-processing as the published script does (WIDER_POSTPROCESS, with
    inclusive-pixel NMS); defaults are its settings (original size, confidence 0.02, NMS 0.4, no
    top-k, no keep-top-k). top_k / keep_top_k 0 = no limit."""
    if top_k < 0 or keep_top_k < 0:
        raise FeatherFaceError(f"top_k and keep_top_k must be >= 0 (0 = no limit), got {top_k} and {keep_top_k}")
    settings = dataclasses.replace(WIDER_POSTPROCESS, conf_threshold=conf, nms_threshold=nms_threshold,
                                   top_k=top_k or None, keep_top_k=keep_top_k or None)
    return FaceDetector.with_settings(weights, settings, backend=backend, device=device, image_size=image_size,
                                      max_size=max_size, threads=threads)


def file_digest(path: PathLike) -> str:
    """First 16 hex digits of a file's sha256 (identifies the weights in the settings)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def detection_settings(detector, model_id: str, flip: bool = False, scales: Optional[Sequence[float]] = None,
                       integer_boxes: bool = True) -> Dict[str, object]:
    """Everything that changes the prediction files of a run (None = no limit)."""
    return {"model": model_id, "config": detector.config.name, "image_size": detector.image_size,
            "max_size": detector.max_size, "confidence_threshold": detector.conf, "nms_threshold": detector.nms,
            "nms_iou": "pixel_inclusive" if detector.postprocess.pixel_inclusive_nms else "standard",
            "top_k": detector.top_k, "keep_top_k": detector.keep_top_k, "flip": bool(flip),
            "scales": [float(s) for s in scales] if scales else None, "integer_boxes": bool(integer_boxes)}


def settings_path(save_folder: PathLike) -> Path:
    folder = Path(save_folder).resolve()
    return folder.with_name(folder.name + "_settings.json")


def check_settings(save_folder: PathLike, settings: Dict[str, object], overwrite: bool,
                   rewritten: Sequence[Path] = (), folder_flag: str = "--save_folder") -> None:
    """Record the run's settings; refuse to resume a folder written with other settings, and
    refuse to overwrite only part of one (`rewritten`: the files this run writes), which would
    leave files of the old settings under the new record. A record beside a folder without
    prediction files (a run that failed before its first image) binds nothing and is replaced.
    `folder_flag`: the calling script's flag that chooses the folder (the refusals suggest changing it)."""
    path = settings_path(save_folder)
    if not path.is_file() or not any(Path(save_folder).glob("*/*.txt")):
        changed: List[str] = []
    else:
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = {}  # unreadable record: the folder's settings are unknown
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
    if changed and not overwrite:
        raise FeatherFaceError(
            f"{save_folder} holds predictions made with other settings ({', '.join(changed)} differ, see {path}); "
            f"pass --overwrite to redo them or choose another {folder_flag}")
    if changed:
        redone = {p.resolve() for p in rewritten}
        stale = sorted(p for p in Path(save_folder).glob("*/*.txt") if p.resolve() not in redone)
        if stale:
            raise FeatherFaceError(
                f"--overwrite with other settings ({', '.join(changed)} differ, see {path}) would leave {len(stale)} "
                f"prediction file(s) of the earlier settings in {save_folder} that this run does not redo (e.g. "
                f"{stale[0]}); predict those images too, delete the files, or choose another {folder_flag}")
    write_text_atomically(path, json.dumps(settings, indent=2) + "\n")


def prediction_files(save_folder: PathLike, images: Sequence[str]) -> List[Path]:
    """The prediction file of each image; two images that would share one (same event and
    name, different extension) are an error rather than one silently skipping the other."""
    owner: Dict[Path, str] = {}
    for relative in images:
        out = prediction_path(save_folder, *image_key(relative))
        if out in owner and owner[out] == relative:
            raise FeatherFaceError(f"{relative} is listed twice")
        if out in owner:
            raise FeatherFaceError(f"{owner[out]} and {relative} would both write {out} (the official layout names a "
                                   f"prediction by event and image name without extension); rename one of them")
        owner[out] = relative
    return list(owner)


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
        """For JSON: seconds_per_image is None when nothing was predicted (strict JSON has no NaN)."""
        return {**asdict(self), "seconds_per_image": self.seconds_per_image if self.written else None}


def predict_images(detector, dataset_folder: PathLike, images: Sequence[str], save_folder: PathLike,
                   overwrite: bool = False, flip: bool = False, scales: Optional[Sequence[float]] = None,
                   model_id: Optional[str] = None, integer_boxes: bool = True,
                   progress: bool = True, folder_flag: str = "--save_folder") -> PredictionSummary:
    """Write one prediction file per image (0 boxes included); unreadable images get none.
    integer_boxes: the published integer boxes (default) or exact floats.

    With `model_id` the settings are checked against the folder's previous run (check_settings,
    whose refusals name `folder_flag`).
    """
    outputs = prediction_files(save_folder, images)
    if model_id is not None:
        check_settings(save_folder, detection_settings(detector, model_id, flip, scales, integer_boxes), overwrite,
                       outputs, folder_flag)
    summary = PredictionSummary()
    bar = tqdm(list(zip(images, outputs)), desc="predict", unit="img", disable=None if progress else True)
    for relative, out in bar:
        name = out.stem
        if not overwrite and out.is_file() and _is_complete(out):
            summary.skipped += 1
            continue
        start = time.perf_counter()
        image_file = find_image(dataset_folder, relative)
        image, why = read_image(image_file)
        if image is None:
            summary.unreadable.append(relative)
            tqdm.write(f"warning: {image_file}: {why}; no prediction file written")
            continue
        detections = detect_with_tta(detector, image, flip, scales)
        write_prediction_file(out, name, to_xywh_score(detections, integer_boxes), integer_boxes)
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
        gt = select_images(gt, images)
    missing = [g for g in gt if not prediction_path(pred_dir, g.event, g.name).is_file()]
    if missing and not allow_missing:
        raise WiderFaceEvalError(
            f"{len(missing)} of {len(gt)} images have no prediction file in {pred_dir} (e.g. {missing[0].event}/"
            f"{missing[0].name}); predict them, give --image_list to evaluate a subset, or pass --allow_missing "
            f"to count them as no detections")
    preds = read_predictions(pred_dir, gt, allow_missing=True)
    return evaluate_predictions(preds, gt, allow_missing=True), len(gt), total
