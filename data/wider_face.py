"""WIDER FACE training labels and the training dataset.

Two label layouts are read, chosen automatically from the first non-blank line:

* RetinaFace ``label.txt`` (first line starts with ``#``)::

      # 0--Parade/0_Parade_marchingband_1_849.jpg
      x y w h  lx0 ly0 f0  lx1 ly1 f1  lx2 ly2 f2  lx3 ly3 f3  lx4 ly4 f4  score

  A face line has 4 numbers (box only), 19 (box + five ``x y flag`` landmarks) or 20
  (plus a score/blur value). Absent landmarks are written as -1.
* Official ``wider_face_train_bbx_gt.txt``: an image path line, a face-count line, then
  ``x y w h blur expression illumination invalid occlusion pose`` per face (4 numbers
  are accepted too). A count of 0 is followed by one line of zeros in the official files.
  The ``invalid`` flag is kept per face (``LabelRecord.invalid``); the dataset leaves such
  faces out of training unless ``keep_invalid=True``.

A box with zero or negative width or height (the official files have a few) is dropped with
a warning (``LabelRecord.dropped``) and its image kept. Zero-face entries are read and kept (the
loss mines hard negatives per image in proportion to its faces, so they add no loss term).

Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner (image
left/right). Image paths are relative to ``<label dir>/images`` (RetinaFace convention)
unless an explicit ``image_root`` is given; without one, a path that is not found there
but exists relative to the label file's own folder (``# images/x.jpg`` style) is used.
A backslash in a path is read as a folder separator (label files written on Windows).

Problems are collected per image with the label-file line they come from, so
``data.check`` can list all of them and the dataset can refuse (or skip) exactly the
images that have them. A problem confined to one face line (malformed or non-numeric) has
``Problem.face`` set: skipping it loses that face, not the image.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from data.augment import landmark_labels, make_targets
from data.preprocess import IMAGE_SUFFIXES, preprocess, read_image

__all__ = [
    "LabelFormatError", "Problem", "LabelRecord", "LabelFile", "Sample", "read_label_file",
    "detect_format", "resolve_image_path", "landmark_labels", "image_problems",
    "WiderFaceDataset", "detection_collate",
]

PathLike = Union[str, Path]
Transform = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Tuple[torch.Tensor, np.ndarray]]

RETINAFACE_FIELD_COUNTS = (4, 19, 20)
WIDER_FIELD_COUNTS = (4, 10)
# A box with less than this fraction of its area inside the image is a wrong label (other
# scale, swapped fields); boxes that only poke over the border are clipped, not flagged.
MIN_INSIDE_FRACTION = 0.5


class LabelFormatError(ValueError):
    """A problem in a label file or its images, located by label file and line."""

    def __init__(self, file: PathLike, line: int, message: str) -> None:
        self.file, self.line, self.message = str(file), line, message
        super().__init__(f"{file}:{line}: {message}")


class Problem(NamedTuple):
    """One problem found in a label file; ``line`` is the label-file line (0 = whole file).

    ``face`` is True when only that face line is unusable (the face is already left out of
    the record); otherwise the whole image is.
    """

    file: str
    line: int
    message: str
    face: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class LabelRecord:
    """One image entry of a label file, with the problems found while parsing it."""

    index: int
    image: str  # the path exactly as written in the label file
    line: int  # label-file line of the image path
    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2 in pixels
    landmarks: np.ndarray  # (K, 10) float32 pixels, all -1 for a face without landmarks
    face_lines: np.ndarray  # (K,) int64 label-file line of each face
    invalid: np.ndarray  # (K,) bool, the official format's "invalid" flag (always False for label.txt)
    problems: List[Problem] = field(default_factory=list)
    dropped: List[Problem] = field(default_factory=list)  # warnings: degenerate boxes left out

    @property
    def has_path(self) -> bool:
        """False when the path line is empty or unusable (the parser reported it)."""
        return bool(self.image) and "\x00" not in self.image

    @property
    def image_problems(self) -> List[Problem]:
        """Problems that make the whole image unusable (not confined to one face line)."""
        return [p for p in self.problems if not p.face]

    def without_invalid(self) -> "LabelRecord":
        """This record without its invalid-flagged faces."""
        keep = ~self.invalid
        return dataclasses.replace(self, boxes=self.boxes[keep], landmarks=self.landmarks[keep],
                                   face_lines=self.face_lines[keep], invalid=self.invalid[keep])


@dataclass
class LabelFile:
    """A parsed label file: its layout, its image records and whole-file problems."""

    path: Path
    format: str  # "retinaface" or "wider"
    records: List[LabelRecord]
    problems: List[Problem]  # not tied to one image (e.g. face lines before any image)

    def all_problems(self) -> List[Problem]:
        found = list(self.problems)
        for record in self.records:
            found.extend(record.problems)
        return sorted(found, key=lambda p: p.line)

    def dropped_boxes(self) -> List[Problem]:
        """Warnings for the degenerate boxes left out while parsing, in file order."""
        return [w for record in self.records for w in record.dropped]

    @property
    def num_faces(self) -> int:
        return sum(len(r.boxes) for r in self.records)

    @property
    def num_invalid(self) -> int:
        return sum(int(r.invalid.sum()) for r in self.records)


class Sample(NamedTuple):
    """A parsed annotation: image path, boxes (K, 4) xyxy pixels, landmarks (K, 10), -1 when absent."""

    path: Path
    boxes: np.ndarray
    landmarks: np.ndarray


def detect_format(lines: Sequence[str]) -> str:
    """``"retinaface"`` when a ``# path`` line comes before the first WIDER image-path line,
    ``"wider"`` when a path line comes first (numeric lines before either, e.g. a stray face
    line, do not decide: the parser then reports them), else ``"wider"`` for a non-blank file."""
    seen = False
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            return "retinaface"
        if _is_wider_path_line(text):
            return "wider"
        seen = True
    return "wider" if seen else "retinaface"


def _parse_numbers(tokens: Sequence[str]) -> Optional[List[float]]:
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _first_bad_token(tokens: Sequence[str]) -> str:
    for t in tokens:
        try:
            if math.isfinite(float(t)):
                continue
        except ValueError:
            pass
        return t
    return ""


class _RecordBuilder:
    """Accumulates the faces of one image while parsing."""

    def __init__(self, file: str, index: int, image: str, line: int) -> None:
        self.file, self.index, self.image, self.line = file, index, image, line
        self.boxes: List[List[float]] = []
        self.landmarks: List[List[float]] = []
        self.face_lines: List[int] = []
        self.invalid: List[bool] = []
        self.problems: List[Problem] = []
        self.dropped: List[Problem] = []
        self.face_no = 0  # faces listed so far, usable or not (for messages)

    def problem(self, line: int, message: str, face: bool = False) -> None:
        self.problems.append(Problem(self.file, line, message, face))

    def add_face(self, line: int, values: List[float], has_landmarks: bool, invalid: bool = False) -> None:
        x, y, w, h = values[:4]
        if not (w > 0 and h > 0):
            self.dropped.append(Problem(self.file, line, f"degenerate box dropped (face {self.face_no} of "
                                                         f"{self.image}: width {w:g}, height {h:g})", True))
            return
        self.boxes.append([x, y, x + w, y + h])
        if has_landmarks:
            points = [values[4 + 3 * p + c] for p in range(5) for c in (0, 1)]
            # RetinaFace writes a missing landmark set as -1; a face counts as having
            # landmarks only when all five points are present.
            if any(points[2 * p] == -1 and points[2 * p + 1] == -1 for p in range(5)):
                points = [-1.0] * 10
        else:
            points = [-1.0] * 10
        self.landmarks.append(points)
        self.face_lines.append(line)
        self.invalid.append(bool(invalid))

    def build(self) -> LabelRecord:
        return LabelRecord(
            index=self.index, image=self.image, line=self.line,
            boxes=np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            landmarks=np.asarray(self.landmarks, dtype=np.float32).reshape(-1, 10),
            face_lines=np.asarray(self.face_lines, dtype=np.int64),
            invalid=np.asarray(self.invalid, dtype=bool),
            problems=self.problems, dropped=self.dropped,
        )


def _check_path(builder: _RecordBuilder) -> None:
    """A NUL byte (a damaged file) makes a path no system can open: a problem of that line
    (`LabelRecord.has_path` is then False, so nothing looks the path up)."""
    if "\x00" in builder.image:
        builder.problem(builder.line, f"image path {builder.image.replace(chr(0), '<NUL>')!r} contains a NUL byte "
                                      f"(damaged label file?)")


def _face_values(builder: _RecordBuilder, line_no: int, tokens: List[str],
                 counts: Tuple[int, ...], layout: str) -> Optional[List[float]]:
    builder.face_no += 1
    if len(tokens) not in counts:
        allowed = ", ".join(str(c) for c in counts[:-1]) + f" or {counts[-1]}"
        builder.problem(line_no, f"malformed face line for {builder.image}: expected {allowed} "
                                 f"numbers ({layout}), got {len(tokens)}", face=True)
        return None
    values = _parse_numbers(tokens)
    if values is None:
        builder.problem(line_no, f"non-numeric value {_first_bad_token(tokens)!r} in face line "
                                 f"for {builder.image}", face=True)
    return values


def _parse_retinaface(file: str, lines: Sequence[str]) -> Tuple[List[LabelRecord], List[Problem]]:
    records: List[LabelRecord] = []
    orphans: List[Problem] = []
    current: Optional[_RecordBuilder] = None
    for line_no, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if text.startswith("#"):
            if current is not None:
                records.append(current.build())
            current = _RecordBuilder(file, len(records), text[1:].strip(), line_no)
            if not current.image:
                current.problem(line_no, "image line '#' has no path")
            _check_path(current)
            continue
        if current is None:
            orphans.append(Problem(file, line_no, "face line before the first '# image' line"))
            continue
        values = _face_values(current, line_no, text.split(), RETINAFACE_FIELD_COUNTS,
                              "x y w h [5 x (x y flag) [score]]")
        if values is not None:
            current.add_face(line_no, values, has_landmarks=len(values) >= 19)
    if current is not None:
        records.append(current.build())
    return records, orphans


def _is_wider_path_line(text: str) -> bool:
    tokens = text.split()
    if _parse_numbers(tokens) is not None:
        return False
    # A lone word without an image extension or folder is a broken count, not a path.
    return text.lower().endswith(IMAGE_SUFFIXES) or (len(tokens) == 1 and "/" in text)


def _parse_wider(file: str, lines: Sequence[str]) -> Tuple[List[LabelRecord], List[Problem]]:
    # Split into blocks at image-path lines first, so one bad count cannot shift every
    # later image: each block is [path, count, faces...].
    blocks: List[Tuple[int, str, List[Tuple[int, str]]]] = []
    orphans: List[Problem] = []
    for line_no, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if _is_wider_path_line(text):
            blocks.append((line_no, text, []))
        elif not blocks:
            orphans.append(Problem(file, line_no, f"expected an image path, got {text[:40]!r}"))
        else:
            blocks[-1][2].append((line_no, text))

    records = []
    for index, (path_line, image, body) in enumerate(blocks):
        builder = _RecordBuilder(file, index, image, path_line)
        _check_path(builder)
        if not body:
            builder.problem(path_line, f"missing face-count line after {image}")
            records.append(builder.build())
            continue
        count_line, count_text = body[0]
        try:
            count = int(count_text)
        except ValueError:
            count = -1
        if count < 0:
            builder.problem(count_line, f"expected a face count (integer >= 0) for {image}, "
                                        f"got {count_text[:40]!r}")
            records.append(builder.build())
            continue
        faces = body[1:]
        if count == 0 and len(faces) == 1:
            zeros = _parse_numbers(faces[0][1].split())
            if zeros is not None and not any(zeros):
                faces = []  # the official files follow a 0 count with one all-zero line
        if len(faces) != count:
            where = faces[count][0] if len(faces) > count else (faces[-1][0] + 1 if faces else count_line + 1)
            builder.problem(where, f"{image}: face count on line {count_line} says {count}, "
                                   f"but {len(faces)} face line(s) follow")
        for line_no, text in faces:
            values = _face_values(builder, line_no, text.split(), WIDER_FIELD_COUNTS,
                                  "x y w h blur expression illumination invalid occlusion pose")
            if values is not None:
                # Official layout: x y w h blur expression illumination invalid occlusion pose.
                builder.add_face(line_no, values, has_landmarks=False,
                                 invalid=len(values) == 10 and values[7] != 0)
        records.append(builder.build())
    return records, orphans


def read_label_file(label_file: PathLike) -> LabelFile:
    """Parse a label file of either layout, collecting (not raising) every problem found."""
    path = Path(label_file)
    name = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LabelFile(path, "unknown", [], [Problem(name, 0, "label file not found")])
    except OSError as exc:
        return LabelFile(path, "unknown", [], [Problem(name, 0, f"cannot read label file: {exc}")])
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return LabelFile(path, "unknown", [], [Problem(
            name, line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}): save the label file as UTF-8")])
    layout = detect_format(lines)
    parse = _parse_retinaface if layout == "retinaface" else _parse_wider
    records, problems = parse(name, lines)
    if not records and not problems:
        problems.append(Problem(name, 0, "label file lists no images"))
    return LabelFile(path, layout, records, problems)


def resolve_image_path(label_file: PathLike, image: str, image_root: Optional[PathLike] = None) -> Path:
    """Where the image named on a label line lives (see the module docstring for the rule)."""
    image = image.replace("\\", "/")  # a label file written on Windows
    if image_root is not None:
        return Path(image_root) / image
    label_dir = Path(label_file).parent
    primary = label_dir / "images" / image
    if not primary.exists() and (label_dir / image).exists():
        return label_dir / image
    return primary


def image_problems(label_file: PathLike, record: LabelRecord, width: int, height: int) -> List[Problem]:
    """Boxes of a record that lie (mostly) outside a width x height image, and landmark points
    farther outside it than its own size (a corrupt number such as 1e37; the loss would follow it)."""
    found = []
    x1 = np.clip(record.boxes[:, 0], 0, width)
    y1 = np.clip(record.boxes[:, 1], 0, height)
    x2 = np.clip(record.boxes[:, 2], 0, width)
    y2 = np.clip(record.boxes[:, 3], 0, height)
    inside = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (record.boxes[:, 2] - record.boxes[:, 0]) * (record.boxes[:, 3] - record.boxes[:, 1])
    for k in np.flatnonzero((area > 0) & (inside < MIN_INSIDE_FRACTION * area)):
        bx = ", ".join(f"{v:g}" for v in record.boxes[k])
        where = "outside" if inside[k] == 0 else "mostly outside"
        found.append(Problem(str(label_file), int(record.face_lines[k]),
                             f"box ({bx}) of face {k + 1} lies {where} the {width}x{height} image {record.image}"))
    points = record.landmarks.reshape(-1, 5, 2)
    far = ((points[..., 0] < -width) | (points[..., 0] > 2 * width)
           | (points[..., 1] < -height) | (points[..., 1] > 2 * height)).any(axis=1)
    for k in np.flatnonzero(far):
        pts = " ".join(f"{v:g}" for v in record.landmarks[k])
        found.append(Problem(str(label_file), int(record.face_lines[k]),
                             f"landmarks ({pts}) of face {k + 1} lie far outside the {width}x{height} image "
                             f"{record.image}"))
    return found


class WiderFaceDataset(Dataset):
    """Face-detection training set from a WIDER FACE label file.

    Item: ``(image (3, S, S) float32 tensor, target (K, 15) float32 array)``; a target row
    is ``x1, y1, x2, y2, 10 landmark coords`` normalised to [0, 1] by the output size, then
    the label (1 = face with landmarks, -1 = without). With ``transform=None`` the image
    keeps its own size and the target is normalised by it. ``skip`` holds record indices
    to leave out (e.g. ``check_dataset(...).bad_samples``); any problem in a kept record
    raises :class:`LabelFormatError` naming the label file and line, except, with
    ``skip_bad_faces``, a problem confined to one face line (that face is left out).
    Invalid-flagged faces are left out unless ``keep_invalid``; degenerate boxes always are
    (``dropped_boxes`` lists them).
    """

    def __init__(self, label_file: PathLike, image_root: Optional[PathLike] = None,
                 transform: Optional[Transform] = None, skip: Iterable[int] = (),
                 keep_invalid: bool = False, skip_bad_faces: bool = False) -> None:
        self.label_file = Path(label_file)
        self.image_root = None if image_root is None else Path(image_root)
        self.transform = transform
        parsed = read_label_file(self.label_file)
        skip = set(int(i) for i in skip)
        out_of_range = sorted(i for i in skip if not 0 <= i < len(parsed.records))
        if out_of_range:
            raise ValueError(f"skip indices {out_of_range[:5]} are not records of {self.label_file} "
                             f"({len(parsed.records)} images)")
        problems = list(parsed.problems)
        for record in parsed.records:
            if record.index not in skip:
                problems.extend(record.image_problems if skip_bad_faces else record.problems)
        if problems:
            problems.sort(key=lambda p: p.line)
            first = problems[0]
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise LabelFormatError(first.file, first.line,
                                   f"{first.message}{more}; list them all with "
                                   f"`python -m data.check {self.label_file}`")
        self.format = parsed.format
        kept = [r for r in parsed.records if r.index not in skip]
        self.dropped_boxes = [w for r in kept for w in r.dropped]
        self.skipped_faces = [p for r in kept for p in r.problems if p.face]
        self.num_invalid = sum(int(r.invalid.sum()) for r in kept)  # in the kept records
        self.keep_invalid = keep_invalid
        self.records = kept if keep_invalid else [r.without_invalid() for r in kept]
        self.image_paths = [resolve_image_path(self.label_file, r.image, self.image_root) for r in self.records]

    @property
    def samples(self) -> List[Sample]:
        return [Sample(p, r.boxes, r.landmarks) for p, r in zip(self.image_paths, self.records)]

    @property
    def num_faces(self) -> int:
        return sum(len(r.boxes) for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Raw item: (BGR uint8 image, boxes (K, 4) pixels, landmarks (K, 10), labels (K,))."""
        record, path = self.records[index], self.image_paths[index]
        image, why = read_image(path)  # as data.check decodes it: a cut JPEG/PNG is refused, not grey
        if image is None:
            raise LabelFormatError(self.label_file, record.line, f"cannot read image {path}: {why}")
        height, width = image.shape[:2]
        outside = image_problems(self.label_file, record, width, height)
        if outside:
            raise LabelFormatError(self.label_file, outside[0].line, outside[0].message)
        return image, record.boxes.copy(), record.landmarks.copy(), landmark_labels(record.landmarks)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, np.ndarray]:
        image, boxes, landmarks, labels = self.load(index)
        if self.transform is not None:
            return self.transform(image, boxes, landmarks, labels)
        height, width = image.shape[:2]
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        return preprocess(image), make_targets(boxes, landmarks, labels, width, height)


def detection_collate(batch: Sequence[Tuple[torch.Tensor, np.ndarray]]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """List of (image, target) -> (images (B, 3, S, S), [targets (K_i, 15)]); K_i varies."""
    images = torch.stack([image for image, _ in batch], dim=0)
    targets = [torch.as_tensor(np.asarray(target, dtype=np.float32)) for _, target in batch]
    return images, targets
