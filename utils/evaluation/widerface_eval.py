"""WIDER FACE validation evaluator: the official easy / medium / hard AP protocol, vectorised.

Reproduces the official MATLAB `eval_tools` (Shuo Yang, 2015) and its widely used Python port:

* ground truth from `wider_face_val.mat` (`event_list`, `file_list`, `face_bbx_list`, boxes
  x y w h) and `wider_{easy,medium,hard}_val.mat` (`gt_list`: 1-based indices of the faces that
  count in that setting; every other face is ignored);
* predictions from `<pred_dir>/<event>/<image>.txt` (line 1 image name, line 2 box count, then
  one `x y w h score` line per box; any whitespace between numbers, blank lines skipped, a count
  that disagrees with the box lines is an error); only the files of ground-truth images are read,
  so other files in the folder do not matter; an image list (`--image_list`) restricts the ground
  truth to those images, so a subset is scored against its own faces only;
* scores min-max normalised over all predictions of all images;
* every prediction is matched to the ground-truth face of highest IoU (pixel convention:
  x2 = x + w, area = (x2 - x1 + 1) * (y2 - y1 + 1)); with IoU >= 0.5 and an ignored face it is
  dropped from the proposals, with a kept face not yet found it recalls that face, otherwise it
  is a false positive (a second hit on a found face included). Faces are never re-assigned;
* images with no faces or no predictions add nothing but their kept faces to the face count,
  so their false positives are free, while an image whose faces are all ignored still counts
  false positives;
* 1000 score thresholds t = 1 - i/1000 (i = 1..1000): proposals = predictions with score >= t
  that are not dropped, recalled = kept faces hit by a prediction with score >= t; precision =
  recalled / proposals, recall = recalled / kept faces; AP = area under the VOC-style monotone
  precision envelope.

The official code loops over predictions and thresholds per image; here the same counts come
from one IoU matrix per image and `searchsorted` over all images. The counts do not depend on
the order of equally scored predictions, so no per-image sort is needed.

One deliberate difference: when every prediction has the same score the official min-max
normalisation divides 0 by 0 (NaN scores, AP 0); here such scores all become 1.0.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.io import loadmat

from utils.errors import FeatherFaceError, run_cli

SETTINGS: Tuple[str, ...] = ("easy", "medium", "hard")
THRESH_NUM = 1000  # score thresholds of the official PR curve
GT_FILES = {"all": "wider_face_val.mat", **{s: f"wider_{s}_val.mat" for s in SETTINGS}}
# IoU matrices are built in slices of at most this many entries (crowd images have 700 faces).
_MAX_IOU_ENTRIES = 1 << 20

PathLike = Union[str, "os.PathLike[str]"]
Predictions = Mapping[str, Mapping[str, np.ndarray]]  # event -> image name -> (K, 5)


class WiderFaceEvalError(FeatherFaceError, ValueError):
    """Ground truth or predictions that cannot be evaluated (missing or malformed file)."""


@dataclass(frozen=True)
class GroundTruthImage:
    """One validation image: its faces and, per setting, which of them count."""

    event: str
    name: str  # file name without extension, as in `file_list`
    boxes: np.ndarray  # (G, 4) float64 x, y, w, h
    keep: Mapping[str, np.ndarray]  # setting -> (G,) bool, False = ignored face


@dataclass(frozen=True)
class WiderFaceResult:
    """AP and PR curve per setting; `result["easy"]` is the easy AP."""

    ap: Dict[str, float]
    precision: Dict[str, np.ndarray]  # (THRESH_NUM,) NaN where no proposal reaches the threshold
    recall: Dict[str, np.ndarray]  # (THRESH_NUM,)
    thresholds: np.ndarray  # (THRESH_NUM,) 0.999 down to 0.0, on normalised scores

    def __getitem__(self, setting: str) -> float:
        return self.ap[setting]

    def to_dict(self) -> Dict[str, Optional[float]]:
        """APs for JSON: None for a setting without faces among the evaluated images (AP undefined)."""
        return {s: float(self.ap[s]) if math.isfinite(self.ap[s]) else None for s in SETTINGS}

    def lines(self) -> List[str]:
        """One printed line per setting, e.g. 'Easy   Val AP: 0.9270'."""
        return [f"{s.capitalize():<6} Val AP: " + (f"{self.ap[s]:.4f}" if math.isfinite(self.ap[s]) else
                                                   "n/a (none of the evaluated images has a face of this setting)")
                for s in SETTINGS]


def score_thresholds() -> np.ndarray:
    """The official thresholds 1 - i/1000, i = 1..1000 (same float arithmetic as MATLAB)."""
    return 1.0 - np.arange(1, THRESH_NUM + 1, dtype=np.float64) / THRESH_NUM


# ----------------------------------------------------------------------------- ground truth


def _cell_strings(cell: np.ndarray) -> list:
    """Strings of a MATLAB cell column as loaded by scipy (each entry a 1-element array)."""
    return [str(np.asarray(entry).ravel()[0]) for entry in np.asarray(cell, dtype=object).ravel()]


def _cell_arrays(cell: np.ndarray) -> list:
    return [np.asarray(entry) for entry in np.asarray(cell, dtype=object).ravel()]


def _load_mat(path: Path, keys: Sequence[str]) -> dict:
    if not path.is_file():
        raise WiderFaceEvalError(f"missing ground-truth file {path}")
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for a broken file
        raise WiderFaceEvalError(f"cannot read ground-truth file {path}: {exc}") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise WiderFaceEvalError(f"ground-truth file {path} lacks {', '.join(missing)}")
    return mat


@functools.lru_cache(maxsize=4)
def _load_ground_truth_cached(gt_dir: str) -> Tuple[GroundTruthImage, ...]:
    root = Path(gt_dir)
    main = _load_mat(root / GT_FILES["all"], ("event_list", "file_list", "face_bbx_list"))
    events = _cell_strings(main["event_list"])
    files = [[name for name in _cell_strings(cell)] for cell in _cell_arrays(main["file_list"])]
    boxes = [_cell_arrays(cell) for cell in _cell_arrays(main["face_bbx_list"])]
    if not len(events) == len(files) == len(boxes):
        raise WiderFaceEvalError(f"{root / GT_FILES['all']}: event_list, file_list and face_bbx_list differ in length")

    keep_lists = {}
    for setting in SETTINGS:
        path = root / GT_FILES[setting]
        mat = _load_mat(path, ("event_list", "file_list", "gt_list"))
        # The official code indexes the setting files by position; make sure positions agree.
        same_files = [[n for n in _cell_strings(cell)] for cell in _cell_arrays(mat["file_list"])]
        if _cell_strings(mat["event_list"]) != events or same_files != files:
            raise WiderFaceEvalError(f"{path}: events or images differ from {GT_FILES['all']}")
        keep_lists[setting] = [_cell_arrays(cell) for cell in _cell_arrays(mat["gt_list"])]

    images = []
    for e, event in enumerate(events):
        if len(boxes[e]) != len(files[e]):
            raise WiderFaceEvalError(
                f"{root / GT_FILES['all']}: event {event} has {len(files[e])} images but {len(boxes[e])} box lists"
            )
        for j, name in enumerate(files[e]):
            face_boxes = boxes[e][j].astype(np.float64).reshape(-1, 4)
            face_boxes.setflags(write=False)
            keep = {}
            for setting in SETTINGS:
                index = keep_lists[setting][e][j].astype(np.int64).ravel()
                if index.size and (index.min() < 1 or index.max() > len(face_boxes)):
                    raise WiderFaceEvalError(f"{root / GT_FILES[setting]}: face index out of range for {event}/{name}")
                mask = np.zeros(len(face_boxes), dtype=bool)
                mask[index - 1] = True  # gt_list is 1-based
                mask.setflags(write=False)
                keep[setting] = mask
            images.append(GroundTruthImage(event, name, face_boxes, keep))
    return tuple(images)


def load_ground_truth(gt_dir: PathLike) -> Tuple[GroundTruthImage, ...]:
    """All validation images in the official order, read once per process (arrays read-only).

    A folder that does not exist, or a missing or malformed .mat file, is a WiderFaceEvalError
    naming it.
    """
    if not Path(gt_dir).is_dir():
        raise WiderFaceEvalError(f"ground-truth folder {gt_dir} does not exist "
                                 f"(expected {', '.join(GT_FILES.values())} in it)")
    missing = [name for name in GT_FILES.values() if not (Path(gt_dir) / name).is_file()]
    if missing:  # name every missing file at once, not one per attempt
        raise WiderFaceEvalError(f"missing ground-truth file {', '.join(missing)} in {gt_dir} "
                                 f"(needs {', '.join(GT_FILES.values())})")
    return _load_ground_truth_cached(str(Path(gt_dir).resolve()))


def read_image_list(path: PathLike, suffixes: Optional[Sequence[str]] = None) -> List[str]:
    """Relative image paths `event/name.jpg`, one per line; `suffixes` (lower case) limits the
    file types.

    Blank lines are skipped; Windows line endings, a UTF-8 byte-order mark and a leading "/"
    (as in some published lists) or "./" (as `find .` writes) are accepted.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WiderFaceEvalError(f"cannot read image list {path}: {exc}") from None
    images = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        while entry.startswith(("/", "./")):
            entry = entry[1:] if entry.startswith("/") else entry[2:]
        if not entry:
            continue
        parts, suffix = entry.split("/"), Path(entry).suffix.lower()
        if (len(parts) != 2 or any(part in ("", ".", "..") for part in parts) or not suffix
                or (suffixes is not None and suffix not in suffixes)):
            raise WiderFaceEvalError(f"{path}:{number}: expected 'event/name.jpg', got {line.strip()!r}")
        images.append(entry)
    if not images:
        raise WiderFaceEvalError(f"{path} lists no images")
    return images


def image_key(relative_path: str) -> Tuple[str, str]:
    """`event/name.jpg` -> (event, name): the ground truth's and the prediction file's key."""
    event, file_name = relative_path.split("/")
    return event, Path(file_name).stem


def select_images(gt: Sequence[GroundTruthImage], images: Sequence[str]) -> Tuple[GroundTruthImage, ...]:
    """The ground-truth images named by relative paths `event/name.jpg`, in the official order;
    a name that is not a val image is an error."""
    wanted = {image_key(r) for r in images}
    selected = tuple(g for g in gt if (g.event, g.name) in wanted)
    unknown = sorted(wanted - {(g.event, g.name) for g in selected})
    if unknown:
        raise WiderFaceEvalError(f"{len(unknown)} listed image(s) are not in the validation ground truth, "
                                 f"e.g. {'/'.join(unknown[0])}")
    return selected


# ------------------------------------------------------------------------------ predictions


def read_prediction_file(path: PathLike) -> np.ndarray:
    """Boxes of one prediction file as (K, 5) float64 x, y, w, h, score.

    Line 1 (the image name) is not used, so it may be in any encoding; blank lines after the
    count are skipped; line 2's count must equal the number of box lines.
    """
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise WiderFaceEvalError(f"cannot read prediction file {path}: {exc}") from None
    if len(lines) < 2:
        raise WiderFaceEvalError(f"{path}: expected the image name on line 1 and the box count on line 2")
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise WiderFaceEvalError(f"{path}:2: box count must be an integer, got {lines[1]!r}") from None
    if count < 0:
        raise WiderFaceEvalError(f"{path}:2: box count must not be negative, got {count}")
    body = [(number, line) for number, line in enumerate(lines[2:], start=3) if line.strip()]
    if len(body) != count:
        raise WiderFaceEvalError(f"{path}: line 2 announces {count} boxes but {len(body)} box lines follow")
    if count == 0:
        return np.zeros((0, 5))
    try:  # fast path; on any problem the loop below finds the offending line
        boxes = np.array([line.split() for _, line in body], dtype=np.float64)
        if boxes.shape == (count, 5) and np.isfinite(boxes).all():
            return boxes
    except ValueError:
        pass
    for number, line in body:
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != 5 or not all(math.isfinite(v) for v in values):
            raise WiderFaceEvalError(f"{path}:{number}: expected 5 finite numbers 'x y w h score', got {line!r}")
    raise WiderFaceEvalError(f"{path}: cannot parse the boxes")  # unreachable in practice


def write_prediction_file(path: PathLike, image_name: str, boxes: np.ndarray, integer_boxes: bool = False) -> None:
    """Write (K, 5) x, y, w, h, score boxes in the official layout.

    Default: every value as an exact float round trip. integer_boxes=True writes the lines of
    the published test_widerface.py byte for byte: x y w h as integers (they must already be
    integral), the score as `str(np.float32(score))` and a space before the newline.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    lines = [image_name, str(len(boxes))]
    if integer_boxes:
        if not np.array_equal(boxes[:, :4], np.trunc(boxes[:, :4])):
            raise ValueError("integer_boxes=True needs integral x, y, w, h")
        lines += [" ".join([*(str(int(v)) for v in row[:4]), str(np.float32(row[4])), ""]) for row in boxes]
    else:
        lines += [" ".join(repr(float(v)) for v in row) for row in boxes]
    write_text_atomically(path, "\n".join(lines) + "\n")


def write_text_atomically(path: PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it to `path`: a run killed
    mid-write leaves the old file or none, never one cut short (a file whose last score lost
    digits still parses, so a resumed run could not tell it from a finished one). The
    temporary name does not end in .txt, so no reader takes it for a prediction file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def prediction_path(pred_dir: PathLike, event: str, image_name: str) -> Path:
    return Path(pred_dir) / event / f"{image_name}.txt"


def read_predictions(
    pred_dir: PathLike, gt: Sequence[GroundTruthImage], allow_missing: bool = False
) -> Dict[str, Dict[str, np.ndarray]]:
    """Read the prediction file of every ground-truth image (missing = error or empty)."""
    preds: Dict[str, Dict[str, np.ndarray]] = {}
    for image in gt:
        path = prediction_path(pred_dir, image.event, image.name)
        if path.is_file():
            boxes = read_prediction_file(path)
        elif allow_missing:
            boxes = np.zeros((0, 5))
        else:
            raise WiderFaceEvalError(
                f"missing prediction file {path} (use --allow_missing to count it as no detections)"
            )
        preds.setdefault(image.event, {})[image.name] = boxes
    return preds


def _prediction_array(preds: Predictions, image: GroundTruthImage, allow_missing: bool) -> np.ndarray:
    boxes = preds.get(image.event, {}).get(image.name)
    if boxes is None:
        if allow_missing:
            return np.zeros((0, 5))
        raise WiderFaceEvalError(
            f"no predictions for {image.event}/{image.name} (pass allow_missing=True to count it as no detections)"
        )
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 5))
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise WiderFaceEvalError(
            f"predictions for {image.event}/{image.name} must be (K, 5) x y w h score, got shape {boxes.shape}"
        )
    if not np.isfinite(boxes).all():
        raise WiderFaceEvalError(f"predictions for {image.event}/{image.name} contain NaN or inf")
    return boxes


# ------------------------------------------------------------------------------- protocol


def box_overlaps(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """(N, M) IoU of x, y, w, h boxes with the official +1 pixel convention (0 if disjoint)."""
    # Same float operations as the official code (x2 = x + w, then x2 - x1 + 1), so values
    # at the 0.5 boundary and argmax ties come out identical.
    x1, y1 = boxes[:, 0:1], boxes[:, 1:2]
    x2, y2 = x1 + boxes[:, 2:3], y1 + boxes[:, 3:4]
    qx1, qy1 = query_boxes[:, 0], query_boxes[:, 1]
    qx2, qy2 = qx1 + query_boxes[:, 2], qy1 + query_boxes[:, 3]
    iw = np.minimum(x2, qx2) - np.maximum(x1, qx1) + 1
    ih = np.minimum(y2, qy2) - np.maximum(y1, qy1) + 1
    inter = iw * ih
    union = ((x2 - x1 + 1) * (y2 - y1 + 1) + (qx2 - qx1 + 1) * (qy2 - qy1 + 1)) - inter
    overlaps = np.zeros(inter.shape)
    np.divide(inter, union, out=overlaps, where=(iw > 0) & (ih > 0))
    return overlaps


def _best_faces(pred_boxes: np.ndarray, face_boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per prediction: the highest IoU with any face and that face's index (first on ties)."""
    step = max(1, _MAX_IOU_ENTRIES // len(face_boxes))
    best_iou = np.empty(len(pred_boxes))
    best_face = np.empty(len(pred_boxes), dtype=np.int64)
    for start in range(0, len(pred_boxes), step):
        overlaps = box_overlaps(pred_boxes[start : start + step], face_boxes)
        index = overlaps.argmax(axis=1)
        best_face[start : start + step] = index
        best_iou[start : start + step] = overlaps[np.arange(len(index)), index]
    return best_iou, best_face


def normalize_scores(score_lists: Sequence[np.ndarray]) -> list:
    """Min-max normalise scores over all images together; all-equal scores become 1.0."""
    nonempty = [s for s in score_lists if len(s)]
    if not nonempty:
        return [np.asarray(s, dtype=np.float64) for s in score_lists]
    low = min(float(s.min()) for s in nonempty)
    high = max(float(s.max()) for s in nonempty)
    if high == low:
        return [np.ones(len(s)) for s in score_lists]
    return [(np.asarray(s, dtype=np.float64) - low) / (high - low) for s in score_lists]


def _count_at_least(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many values are >= it."""
    ordered = np.sort(values)
    return len(ordered) - np.searchsorted(ordered, thresholds, side="left")


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC AP: area under the monotone precision envelope (NaN precision counts as absent)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    # fmax skips NaN like MATLAB's max; NaN only occurs where recall is still 0.
    envelope = np.fmax.accumulate(mpre[::-1])[::-1]
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[change + 1] - mrec[change]) * envelope[change + 1]))


def evaluate_predictions(
    preds: Predictions,
    gt: Union[PathLike, Sequence[GroundTruthImage]],
    iou_thresh: float = 0.5,
    allow_missing: bool = False,
) -> WiderFaceResult:
    """Official easy / medium / hard AP of in-memory predictions.

    `preds[event][image_name]` is a (K, 5) array x, y, w, h, score (K may be 0); `gt` is the
    ground-truth folder or the images from `load_ground_truth` (a subset evaluates that subset).
    Predictions for images not in `gt` are not used.
    """
    if not 0.0 < iou_thresh <= 1.0:
        raise WiderFaceEvalError(f"iou_thresh must be in (0, 1], got {iou_thresh}")
    images = load_ground_truth(gt) if isinstance(gt, (str, os.PathLike)) else tuple(gt)
    boxes = [_prediction_array(preds, image, allow_missing) for image in images]
    scores = normalize_scores([b[:, 4] for b in boxes])

    # Match every prediction once; only the keep masks differ between settings.
    face_offsets = np.cumsum([0] + [len(image.boxes) for image in images])
    match_face, match_score, prop_face, prop_score = [], [], [], []
    for image, offset, pred, score in zip(images, face_offsets, boxes, scores):
        if len(image.boxes) == 0 or len(pred) == 0:
            continue  # the official code skips such images (their false positives are free)
        best_iou, best_face = _best_faces(pred[:, :4], image.boxes)
        matched = best_iou >= iou_thresh
        # -1 marks a prediction that matched nothing: always a proposal.
        prop_face.append(np.where(matched, best_face + offset, -1))
        prop_score.append(score)
        match_face.append(best_face[matched] + offset)
        match_score.append(score[matched])

    num_faces = int(face_offsets[-1])
    prop_face_all = np.concatenate(prop_face) if prop_face else np.zeros(0, dtype=np.int64)
    prop_score_all = np.concatenate(prop_score) if prop_score else np.zeros(0)
    # A face counts as recalled at threshold t once any prediction matched to it scores >= t.
    face_score = np.full(num_faces, -np.inf)
    if match_face:
        np.maximum.at(face_score, np.concatenate(match_face), np.concatenate(match_score))

    thresholds = score_thresholds()
    aps, precisions, recalls = {}, {}, {}
    for setting in SETTINGS:
        keep = np.concatenate([image.keep[setting] for image in images] + [np.zeros(0, dtype=bool)])
        count_face = int(keep.sum())
        if count_face == 0:  # a subset without faces of this setting: its AP is undefined, not 0
            precisions[setting] = recalls[setting] = np.full(len(thresholds), np.nan)
            aps[setting] = math.nan
            continue
        # Predictions matched to an ignored face leave the proposals; the rest stay.
        dropped = (prop_face_all >= 0) & ~keep[np.maximum(prop_face_all, 0)]
        proposals = _count_at_least(prop_score_all[~dropped], thresholds)
        recalled = _count_at_least(face_score[keep & np.isfinite(face_score)], thresholds)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = recalled / proposals  # 0/0 = NaN, as in the official code
        recall = recalled / count_face
        precisions[setting], recalls[setting] = precision, recall
        aps[setting] = average_precision(recall, precision)
    return WiderFaceResult(aps, precisions, recalls, thresholds)


def evaluate(
    pred_dir: PathLike, gt_dir: PathLike, allow_missing: bool = False, iou_thresh: float = 0.5,
    images: Optional[Sequence[str]] = None,
) -> WiderFaceResult:
    """Official easy / medium / hard AP of a folder of `<event>/<image>.txt` prediction files.

    `images` (relative paths `event/name.jpg`) restricts the ground truth to those images, so a
    subset is scored against its own faces only; None evaluates the whole val set.
    """
    gt = load_ground_truth(gt_dir)
    if images is not None:
        gt = select_images(gt, images)
    if not Path(pred_dir).is_dir():
        raise WiderFaceEvalError(f"prediction folder {pred_dir} does not exist")
    return evaluate_predictions(read_predictions(pred_dir, gt, allow_missing), gt, iou_thresh, allow_missing)


# ---------------------------------------------------------------------------------- script


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="WIDER FACE validation AP (official easy/medium/hard protocol).")
    parser.add_argument("--pred", type=str, required=True, help="folder with <event>/<image>.txt prediction files")
    parser.add_argument(
        "--gt", type=str, required=True, help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat"
    )
    parser.add_argument("--json", type=str, default=None, help="also write the three APs to this JSON file")
    parser.add_argument("--allow_missing", action="store_true", help="count a missing prediction file as no detections")
    parser.add_argument("--image_list", type=str, default=None,
                        help="only these images (lines 'event/name.jpg'); evaluation is restricted to them")
    parser.add_argument(
        "--iou_thresh", type=float, default=0.5, help="IoU for a detection to match a face (official: 0.5)"
    )
    return parser


def main(args: argparse.Namespace) -> WiderFaceResult:
    images = read_image_list(args.image_list) if args.image_list else None
    result = evaluate(args.pred, args.gt, allow_missing=args.allow_missing, iou_thresh=args.iou_thresh, images=images)
    if images is not None:
        print(f"evaluated on {len(images)} listed image(s)")
    print("\n".join(result.lines()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
