"""WIDER FACE label parsing, validation, augmentation and the training dataset."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

import data.augment as augment
from data.augment import (TrainTransform, ValTransform, distort, landmark_labels, make_targets, mirror,
                          pad_to_square, random_crop)
from data.check import check_dataset
from data.config import MEAN_BGR
from data.preprocess import preprocess
from data.wider_face import LabelFormatError, WiderFaceDataset, detection_collate, read_label_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEATHERFACE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED_SAMPLE = SHARED / "data" / "sample" / "label.txt"
SHARED_WIDER = SHARED / "data" / "widerface_val_sample" / "label_wider_bbx_gt_format.txt"
SHIPPED = REPO / "data" / "sample" / "label.txt"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set FEATHERFACE_SHARED to the shared folder)")
    return path


def _write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)


def _write(tmp_path: Path, text: str, images=(), name: str = "label.txt") -> Path:
    label = tmp_path / name
    label.write_text(text)
    for image in images:
        _write_image(tmp_path / "images" / image)
    return label


# ----------------------------------------------------------------------------- real data
def test_retinaface_format_on_shared_sample():
    label = _need(SHARED_SAMPLE)
    parsed = read_label_file(label)
    assert parsed.format == "retinaface"
    assert parsed.all_problems() == []
    counts = {Path(r.image).name: len(r.boxes) for r in parsed.records}
    assert counts == {"astronaut.png": 1, "crowd_1mb_1.jpg": 29, "crowd_27.jpg": 25, "group_8.jpg": 8,
                      "selfie_crowd.jpg": 350}
    astronaut = parsed.records[0]
    np.testing.assert_allclose(astronaut.boxes[0], [177.9, 56.8, 273.1, 177.2], atol=1e-4)  # x y w h -> xyxy
    np.testing.assert_allclose(astronaut.landmarks[0], [204.81, 100.78, 247.38, 103.42, 223.56, 129.24,
                                                        202.49, 138.15, 244.22, 140.56], atol=1e-4)
    dataset = WiderFaceDataset(label)  # paths written as "images/x.jpg", relative to the label dir
    assert len(dataset) == 5 and dataset.num_faces == 413
    assert all(p.is_file() for p in dataset.image_paths)
    image, target = dataset[0]
    assert image.shape == (3, 512, 512) and image.dtype == torch.float32
    assert target.shape == (1, 15) and target.dtype == np.float32
    np.testing.assert_allclose(target[0, :4], np.array([177.9, 56.8, 273.1, 177.2]) / 512, atol=1e-6)
    assert target[0, 14] == 1
    report = check_dataset(label)
    assert report.ok and report.num_images == 5 and report.num_faces == 413


def test_official_format_on_shared_val_sample():
    label = _need(SHARED_WIDER)
    parsed = read_label_file(label)
    assert parsed.format == "wider"
    assert parsed.all_problems() == []
    assert len(parsed.records) == 4 and sum(len(r.boxes) for r in parsed.records) == 328
    first = parsed.records[0]
    assert first.image == "0--Parade/0_Parade_marchingband_1_765.jpg" and len(first.boxes) == 132
    np.testing.assert_allclose(first.boxes[0], [311, 131, 319, 140])
    assert (first.landmarks == -1).all()
    dataset = WiderFaceDataset(label, transform=ValTransform(320))
    image, target = dataset[0]
    assert image.shape == (3, 320, 320)
    assert target.shape == (132, 15) and (target[:, 14] == -1).all() and (target[:, 4:14] == -1).all()
    assert check_dataset(label).ok


# --------------------------------------------------------------------- made-up label files
RETINA_TEXT = """# a.jpg
10 10 20 20 14 16 0.0 26 16 0.0 20 21 0.0 15 25 0.0 25 25 0.0 0.9
30 5 10 12
40 20 8 8 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1
# empty.jpg
# sub/b.jpg
1 2 3 4 5 6 1.0 7 8 1.0 9 10 1.0 11 12 1.0 13 14 1.0
"""

WIDER_TEXT = """a.jpg
2
10 10 20 20 1 0 0 0 0 0
30 5 10 12 0 0 0 0 0 0
empty.jpg
0
0 0 0 0 0 0 0 0 0 0
sub/b.jpg
1
1 2 3 4 0 0 0 0 0 0
last_empty.jpg
0
"""


def test_retinaface_format_made_up(tmp_path):
    label = _write(tmp_path, RETINA_TEXT, ["a.jpg", "empty.jpg", "sub/b.jpg"])
    dataset = WiderFaceDataset(label)
    assert dataset.format == "retinaface" and len(dataset) == 3
    path, boxes, landmarks = dataset.samples[0]
    assert path == tmp_path / "images" / "a.jpg"
    np.testing.assert_allclose(boxes, [[10, 10, 30, 30], [30, 5, 40, 17], [40, 20, 48, 28]])
    np.testing.assert_allclose(landmarks[0], [14, 16, 26, 16, 20, 21, 15, 25, 25, 25])
    assert (landmarks[1:] == -1).all()  # 4-number line and explicit -1 landmarks
    np.testing.assert_array_equal(landmark_labels(landmarks), [1, -1, -1])
    assert dataset.samples[1].boxes.shape == (0, 4) and dataset.samples[1].landmarks.shape == (0, 10)
    assert dataset.samples[2].boxes.shape == (1, 4)  # 19 numbers: landmarks without a score
    image, target = dataset[1]  # a zero-face image is a valid negative
    assert image.shape == (3, 48, 64) and target.shape == (0, 15)
    image, target = dataset[0]
    np.testing.assert_allclose(target[0], [10 / 64, 10 / 48, 30 / 64, 30 / 48, 14 / 64, 16 / 48, 26 / 64,
                                           16 / 48, 20 / 64, 21 / 48, 15 / 64, 25 / 48, 25 / 64, 25 / 48, 1],
                               rtol=1e-6)
    np.testing.assert_array_equal(target[1:, 4:], -1)
    dataset.transform = TrainTransform(32, rng=0)
    image, target = dataset[1]
    assert image.shape == (3, 32, 32) and target.shape == (0, 15) and target.dtype == np.float32


def test_official_format_made_up(tmp_path):
    label = _write(tmp_path, WIDER_TEXT, ["a.jpg", "empty.jpg", "sub/b.jpg", "last_empty.jpg"])
    parsed = read_label_file(label)
    assert parsed.format == "wider" and parsed.all_problems() == []
    assert [r.image for r in parsed.records] == ["a.jpg", "empty.jpg", "sub/b.jpg", "last_empty.jpg"]
    assert [len(r.boxes) for r in parsed.records] == [2, 0, 1, 0]
    assert [r.line for r in parsed.records] == [1, 5, 8, 11]
    np.testing.assert_array_equal(parsed.records[0].face_lines, [3, 4])
    np.testing.assert_allclose(parsed.records[2].boxes, [[1, 2, 4, 6]])
    dataset = WiderFaceDataset(label, transform=ValTransform(64))
    assert [dataset[i][1].shape[0] for i in range(4)] == [2, 0, 1, 0]
    # Explicit images root, label file elsewhere.
    moved = tmp_path / "elsewhere" / "gt.txt"
    moved.parent.mkdir()
    moved.write_text(WIDER_TEXT)
    dataset = WiderFaceDataset(moved, image_root=tmp_path / "images")
    assert dataset.image_paths[2] == tmp_path / "images" / "sub" / "b.jpg"
    assert dataset[2][0].shape == (3, 48, 64)
    assert check_dataset(moved, tmp_path / "images").ok
    assert not check_dataset(moved).ok  # default root is elsewhere/images: images missing


BAD_TEXT = """# good.jpg
10 10 20 20
# missing.jpg
10 10 20 20
# corrupt.jpg
10 10 20 20
# malformed.jpg
10 10 20
# nonnumeric.jpg
10 abc 20 20
# degenerate.jpg
10 10 0 20
# outside.jpg
100 100 20 20
# zero_bytes.jpg
# edge.jpg
55 10 12 12
"""
# (line, text expected in the message) for every planted problem. The degenerate box on line 12
# is not a problem: it is dropped with a warning and its image kept.
BAD_EXPECTED = [
    (3, "image not found"), (5, "cannot be decoded"), (8, "expected 4, 19 or 20 numbers"),
    (10, "non-numeric value 'abc'"), (14, "outside the 64x48 image"), (15, "empty (0 bytes)"),
]


@pytest.fixture
def bad_label(tmp_path) -> Path:
    label = _write(tmp_path, BAD_TEXT, ["good.jpg", "malformed.jpg", "nonnumeric.jpg", "degenerate.jpg",
                                        "outside.jpg", "edge.jpg"])
    (tmp_path / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg " * 20)
    (tmp_path / "images" / "zero_bytes.jpg").write_bytes(b"")
    return label


def test_check_reports_every_problem_with_file_and_line(bad_label):
    report = check_dataset(bad_label)
    assert not report.ok
    assert [p.line for p in report.problems] == [line for line, _ in BAD_EXPECTED]
    for problem, (line, text) in zip(report.problems, BAD_EXPECTED):
        assert problem.file == str(bad_label)
        assert text in problem.message
        assert str(problem).startswith(f"{bad_label}:{line}: ")
    # good.jpg (0) and edge.jpg (8, box pokes 3 px over the border: clipped, not an error) are fine;
    # a malformed (3) or non-numeric (4) face line loses that face only; degenerate.jpg (5) loses its box.
    assert report.bad_samples == {1, 2, 6, 7}
    assert [p.face for p in report.problems] == [False, False, True, True, False, False]
    assert [(w.line, "degenerate box dropped" in w.message) for w in report.dropped_boxes] == [(12, True)]
    assert (report.num_images, report.num_faces, report.bad_faces) == (9, 5, 2)
    assert ("6 problem(s)" in report.summary() and "leaves out the 4 image(s)" in report.summary()
            and "2 unusable face line(s)" in report.summary() and "skip=" not in report.summary())


def test_landmarks_far_outside_the_image_are_a_problem(tmp_path):
    # A corrupt landmark number (1e37) used to pass the check and train to a loss of 3e34.
    text = ("# a.jpg\n10 10 20 20 15 15 0.0 1e37 15 0.0 20 20 0.0 15 25 0.0 25 25 0.0 1\n"
            "# b.jpg\n10 10 20 20 -3 15 0.0 25 15 0.0 20 20 0.0 15 25 0.0 66 25 0.0 1\n"  # just over the border: fine
            "# c.jpg\n10 10 20 20 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1\n")  # no landmarks: fine
    label = _write(tmp_path, text, ["a.jpg", "b.jpg", "c.jpg"])
    report = check_dataset(label, use_cache=False)
    assert [(p.line, p.face) for p in report.problems] == [(2, False)] and report.bad_samples == {0}
    assert "landmarks (15 15 1e+37 15 20 20 15 25 25 25) of face 1 lie far outside the 64x48 image a.jpg" \
        in report.problems[0].message
    with pytest.raises(LabelFormatError, match="lie far outside"):
        WiderFaceDataset(label, skip={1, 2})[0]


def test_dataset_refuses_bad_records_and_skips_on_request(bad_label):
    with pytest.raises(LabelFormatError, match=rf"{bad_label}:8: malformed face line.*and 1 more"):
        WiderFaceDataset(bad_label)
    with pytest.raises(LabelFormatError, match=rf"{bad_label}:8: malformed face line"):
        WiderFaceDataset(bad_label, skip=check_dataset(bad_label).bad_samples)  # face problems need skip_bad_faces
    dataset = WiderFaceDataset(bad_label, skip=check_dataset(bad_label).bad_samples, skip_bad_faces=True)
    # The images whose only face line was malformed, non-numeric or degenerate stay, without it.
    assert [Path(p).name for p, _, _ in dataset.samples] == ["good.jpg", "malformed.jpg", "nonnumeric.jpg",
                                                              "degenerate.jpg", "edge.jpg"]
    assert [len(s.boxes) for s in dataset.samples] == [1, 0, 0, 0, 1]
    assert [p.line for p in dataset.skipped_faces] == [8, 10] and [w.line for w in dataset.dropped_boxes] == [12]
    _, target = dataset[4]
    np.testing.assert_allclose(target[0, :4], [55 / 64, 10 / 48, 1.0, 22 / 48], rtol=1e-6)  # clipped
    # Problems only found when the image is opened are raised when it is loaded.
    dataset = WiderFaceDataset(bad_label, skip={3, 4, 5})
    for index, line, text in [(1, 3, "cannot read image"), (2, 5, "cannot read image"),
                              (3, 14, "outside the 64x48 image"), (4, 15, "cannot read image")]:
        with pytest.raises(LabelFormatError, match=rf"{bad_label}:{line}: .*{text}"):
            dataset[index]
    with pytest.raises(ValueError, match="skip indices"):
        WiderFaceDataset(bad_label, skip={42})


def test_stray_line_before_the_first_image_keeps_the_format(tmp_path):
    # A face line above the first '# image' line is reported as such; it used to make the file
    # read as the official format (every '# path' line then looked like a missing image).
    label = _write(tmp_path, "10 10 20 20\n" + RETINA_TEXT, ["a.jpg", "empty.jpg", "sub/b.jpg"])
    parsed = read_label_file(label)
    assert parsed.format == "retinaface" and len(parsed.records) == 3
    assert [p.message for p in parsed.problems] == ["face line before the first '# image' line"]
    official = tmp_path / "wider.txt"
    official.write_text("3 4\n0--Parade/a.jpg\n1\n1 2 3 4 0 0 0 0 0 0\n")
    assert read_label_file(official).format == "wider"


def test_official_format_problems(tmp_path):
    text = """5 5 5 5 0 0 0 0 0 0
a.jpg
2
1 1 4 4 0 0 0 0 0 0
b.jpg
x
c.jpg
1
1 1 4 4 0 0 0 0 0 0
2 2 4 4 0 0 0 0 0 0
d.jpg
0
1 1 4 4 0 0 0 0 0 0
e.jpg
1
1 1 4 nan 0 0 0 0 0 0
f.jpg
"""
    label = _write(tmp_path, text, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"])
    report = check_dataset(label)
    got = [(p.line, p.message) for p in report.problems]
    expected = [(1, "expected an image path"), (5, "says 2, but 1 face line(s) follow"),
                (6, "expected a face count"), (10, "says 1, but 2 face line(s) follow"),
                (13, "says 0, but 1 face line(s) follow"), (16, "non-numeric value 'nan'"),
                (17, "missing face-count line")]
    assert [line for line, _ in got] == [line for line, _ in expected]
    for (_, message), (_, text) in zip(got, expected):
        assert text in message
    assert report.bad_samples == {0, 1, 2, 3, 5}  # e.jpg's non-numeric line loses that face, not the image
    # A whole-file problem (face line before any image) cannot be skipped.
    with pytest.raises(LabelFormatError, match=rf"{label}:1: expected an image path"):
        WiderFaceDataset(label, skip=report.bad_samples)


def test_missing_and_empty_label_files(tmp_path):
    report = check_dataset(tmp_path / "nope.txt")
    assert not report.ok and "label file not found" in report.problems[0].message
    empty = _write(tmp_path, "\n\n")
    assert "lists no images" in check_dataset(empty).problems[0].message
    with pytest.raises(LabelFormatError, match="lists no images"):
        WiderFaceDataset(empty)


def _run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_check_command_line_exit_codes(bad_label, tmp_path):
    clean = _run_check(str(SHIPPED))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK (retinaface format, 3 images (0 without faces), 34 faces, 0 degenerate boxes dropped" in clean.stdout
    bad = _run_check(str(bad_label), "--images", str(tmp_path / "images"))
    assert bad.returncode == 2
    for line, text in BAD_EXPECTED:
        assert f"{bad_label}:{line}: " in bad.stdout and text in bad.stdout
    assert "6 problem(s)" in bad.stdout and "warning: " in bad.stdout and "degenerate box dropped" in bad.stdout
    missing = _run_check(str(tmp_path / "missing.txt"), "--labels_only")
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == f"error: label file {tmp_path / 'missing.txt'} not found\n"
    folder = _run_check(str(tmp_path), "--labels_only")
    assert folder.returncode == 2 and "is a folder, not a label file" in folder.stderr


# ---------------------------------------------------------------------------- augmentation
def _frontal_face():
    boxes = np.array([[10, 10, 70, 90]], np.float32)
    # left eye, right eye, nose, left mouth, right mouth (image left/right); eye heights differ
    landmarks = np.array([[25, 30, 55, 34, 40, 50, 28, 70, 52, 72]], np.float32)
    return boxes, landmarks


def test_mirror_swaps_landmark_pairs():
    image = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    boxes, landmarks = _frontal_face()
    flipped, new_boxes, new_landmarks = mirror(image, boxes, landmarks)
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_allclose(new_boxes, [[50, 10, 110, 90]])
    points = new_landmarks.reshape(5, 2)
    assert points[0, 0] < points[2, 0] < points[1, 0]  # left eye, nose, right eye
    assert points[3, 0] < points[4, 0]  # left mouth left of right mouth
    # The new left eye is the old right eye mirrored (its y came along), nose stays nose.
    np.testing.assert_allclose(points, [[65, 34], [95, 30], [80, 50], [68, 72], [92, 70]])


def test_mirror_twice_is_identity():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    xy = rng.uniform(0, 30, (6, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (6, 2)).astype(np.float32)], axis=1)
    landmarks = rng.uniform(0, 50, (6, 10)).astype(np.float32)
    landmarks[2] = -1
    once = mirror(image, boxes, landmarks)
    assert (once[2][2] == -1).all()  # absent landmarks stay absent
    twice = mirror(*once)
    np.testing.assert_array_equal(twice[0], image)
    np.testing.assert_allclose(twice[1], boxes, atol=1e-5)
    np.testing.assert_allclose(twice[2], landmarks, atol=1e-5)


def test_random_crop_keeps_faces_with_centre_inside():
    rng = np.random.default_rng(3)
    height, width = 120, 200
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    xy = np.stack(np.meshgrid(np.arange(4, 170, 23), np.arange(3, 100, 21)), -1).reshape(-1, 2)
    boxes = np.concatenate([xy, xy + [14, 17]], axis=1).astype(np.float32)
    offsets = np.array([3, 5, 11, 5, 7, 9, 4, 13, 10, 13], np.float32)
    landmarks = np.tile(boxes[:, :2], 5) + offsets
    landmarks[::3] = -1
    labels = landmark_labels(landmarks)
    crops = 0
    for _ in range(40):
        crop, kept, points, kept_labels, roi = random_crop(image, boxes, landmarks, labels, rng)
        if roi is None:
            continue
        crops += 1
        left, top, right, bottom = roi
        assert right - left == bottom - top and crop.shape[:2] == (bottom - top, right - left)
        np.testing.assert_array_equal(crop, image[top:bottom, left:right])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centres[:, 0] >= left) & (centres[:, 0] < right) & (centres[:, 1] >= top) & (centres[:, 1] < bottom)
        assert inside.any()
        expected = np.clip(boxes[inside], [left, top] * 2, [right, bottom] * 2) - [left, top] * 2
        np.testing.assert_allclose(kept, expected)
        np.testing.assert_array_equal(kept_labels, labels[inside])
        present = kept_labels > 0
        assert (points[~present] == -1).all()
        # Landmarks move with the crop: same offsets from the (unclipped) box corner.
        origin = boxes[inside][present, :2] - [left, top]
        np.testing.assert_allclose(points[present], np.tile(origin, 5) + offsets, atol=1e-4)
        assert (kept[:, 2] <= crop.shape[1]).all() and (kept[:, 3] <= crop.shape[0]).all()
    assert crops >= 30


def test_random_crop_falls_back_and_drops_small_faces():
    image = np.zeros((50, 100, 3), np.uint8)
    boxes = np.array([[10, 10, 40, 40], [60, 10, 61, 11]], np.float32)  # 30 px and 1 px faces
    landmarks = -np.ones((2, 10), np.float32)
    out, kept, _, labels, roi = random_crop(image, boxes, landmarks, landmark_labels(landmarks),
                                            np.random.default_rng(0), max_tries=0, output_size=100,
                                            min_face_size=2)
    assert roi is None and out is image
    np.testing.assert_allclose(kept, boxes[:1])  # the 1 px face is < 2 px at the output scale
    transform = TrainTransform(64, rng=0, min_face_size=4)
    for _ in range(20):
        _, target = transform(image, boxes, landmarks)
        sizes = np.minimum(target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]) * 64
        assert (sizes >= 4 - 1e-3).all()


def test_pad_to_square_and_distort():
    image = np.full((20, 50, 3), 200, np.uint8)
    padded = pad_to_square(image)
    assert padded.shape == (50, 50, 3)
    np.testing.assert_array_equal(padded[:20], image)
    assert (padded[20:] == np.array(MEAN_BGR, np.uint8)).all()
    assert pad_to_square(padded) is padded
    photo = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    outputs = [distort(photo, np.random.default_rng(seed)) for seed in range(8)]
    assert all(o.dtype == np.uint8 and o.shape == photo.shape for o in outputs)
    assert sum(not np.array_equal(o, photo) for o in outputs) >= 6
    np.testing.assert_array_equal(outputs[3], distort(photo, np.random.default_rng(3)))
    assert (photo == np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).all()


@pytest.fixture(scope="module")
def shipped():
    return WiderFaceDataset(SHIPPED)


@pytest.mark.parametrize("size", [640, 320])
def test_train_transform_shapes_and_determinism(shipped, size):
    image, boxes, landmarks, labels = shipped.load(2)  # group_8.jpg
    first = TrainTransform(size, rng=7)
    outputs = [first(image, boxes, landmarks, labels) for _ in range(4)]
    again = TrainTransform(size, rng=np.random.default_rng(7))
    for tensor, target in outputs:
        tensor2, target2 = again(image, boxes, landmarks, labels)
        assert tensor.shape == (3, size, size) and tensor.dtype == torch.float32
        assert target.dtype == np.float32 and target.shape[1] == 15
        assert torch.equal(tensor, tensor2) and np.array_equal(target, target2)
        assert (target[:, :4] >= 0).all() and (target[:, :4] <= 1).all()
        assert (target[:, 2:4] > target[:, 0:2]).all()
        assert set(np.unique(target[:, 14])) <= {1.0}
        # Mean subtraction: pixels lie in [0 - mean, 255 - mean].
        assert tensor.min() >= -123 and tensor.max() <= 255 - 104
    other = TrainTransform(size, rng=8)(image, boxes, landmarks, labels)
    assert not torch.equal(other[0], outputs[0][0])
    # The face count changes with the crop but never exceeds the original.
    assert all(len(t) <= len(boxes) for _, t in outputs)


def test_train_transform_reseeds_per_dataloader_worker(shipped, monkeypatch):
    image, boxes, landmarks, labels = shipped.load(0)
    transform = TrainTransform(64, rng=0)
    results = []
    for worker_seed in (100, 101, 100):
        worker_copy = copy.deepcopy(transform)  # what each DataLoader worker gets
        monkeypatch.setattr(augment.torch.utils.data, "get_worker_info",
                            lambda s=worker_seed: SimpleNamespace(seed=s, id=s - 100))
        results.append(worker_copy(image, boxes, landmarks, labels)[0])
    assert not torch.equal(results[0], results[1])
    assert torch.equal(results[0], results[2])


def test_val_transform_pads_and_scales():
    image = np.full((50, 100, 3), MEAN_BGR, np.uint8)
    image[:, :, 2] = 250
    boxes = np.array([[10, 10, 30, 20], [95, 5, 120, 30]], np.float32)
    landmarks = -np.ones((2, 10), np.float32)
    tensor, target = ValTransform(50)(image, boxes, landmarks)
    assert tensor.shape == (3, 50, 50)
    assert (tensor[:, 26:, :] == 0).all()  # padding is the mean colour -> 0
    np.testing.assert_allclose(target[:, :4], [[0.1, 0.1, 0.3, 0.2], [0.95, 0.05, 1.0, 0.3]])
    np.testing.assert_array_equal(target[:, 14], [-1, -1])


def test_val_transform_of_a_panorama_equals_padding_first():
    # Resizing before padding gives the pixels of pad-to-square-then-resize (downscaling by a
    # factor that maps the long side exactly) without building the full-size square.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 4096, 3), dtype=np.uint8)
    boxes, landmarks = np.array([[100, 8, 164, 56]], np.float32), -np.ones((1, 10), np.float32)
    tensor, target = ValTransform(256)(image, boxes, landmarks)
    reference = preprocess(cv2.resize(pad_to_square(image).astype(np.float32), (256, 256), interpolation=cv2.INTER_LINEAR))
    torch.testing.assert_close(tensor, reference, rtol=0, atol=0)
    np.testing.assert_allclose(target[0, :4], [100 / 4096, 8 / 4096, 164 / 4096, 56 / 4096])
    strip = rng.integers(0, 256, (1, 5000, 3), dtype=np.uint8)  # its short side scales to 0.05 px
    tensor, _ = ValTransform(256)(strip, np.zeros((0, 4), np.float32), np.zeros((0, 10), np.float32))
    assert tensor.shape == (3, 256, 256) and (tensor[:, 1:] == 0).all()
    assert tuple(preprocess(strip, 0.05).shape) == (3, 1, 250)


def test_preprocess_resizes_float_pixels_as_opencv_sizes_them():
    # The published test_widerface.py: cv2.resize(float32 image, None, fx=s, fy=s) - mean. Sizes whose
    # sides land on .5 (OpenCV rounds half to even) included; a side rounding to 0 keeps 1 pixel.
    rng = np.random.default_rng(1)
    mean = np.float32([104, 117, 123])
    for (height, width), scale in [((683, 1024), 2.099609375), ((199, 300), 7.166666666666667), ((5, 7), 0.5),
                                   ((3, 9), 0.5), ((97, 1301), 1600 / 97), ((768, 1024), 0.3)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = cv2.resize(image.astype(np.float32), None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        torch.testing.assert_close(preprocess(image, scale), torch.from_numpy((expected - mean).transpose(2, 0, 1)),
                                   rtol=0, atol=0)
    line = rng.integers(0, 256, (1, 3840, 3), dtype=np.uint8)  # the short side scales to exactly 0.5 px
    assert tuple(preprocess(line, 0.5).shape) == (3, 1, 1920)


def test_make_targets_and_collate():
    boxes = np.array([[0, 0, 10, 20]], np.float32)
    landmarks = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.float32)
    target = make_targets(boxes, landmarks, [1], 10, 20)
    np.testing.assert_allclose(target, [[0, 0, 1, 1, .1, .1, .3, .2, .5, .3, .7, .4, .9, .5, 1]])
    batch = [(torch.zeros(3, 8, 8), np.zeros((n, 15), np.float32)) for n in (2, 0, 5)]
    images, targets = detection_collate(batch)
    assert images.shape == (3, 3, 8, 8)
    assert [t.shape for t in targets] == [(2, 15), (0, 15), (5, 15)]
    assert all(t.dtype == torch.float32 for t in targets)


# ------------------------------------------------------------------------- shipped sample
def test_shipped_sample_loads(shipped):
    size = sum(p.stat().st_size for p in (REPO / "data" / "sample").rglob("*") if p.is_file())
    assert size < 1_000_000
    readme = (REPO / "data" / "sample" / "README.md").read_text()
    assert "public domain" in readme and readme.count("MIT") >= 2
    assert len(shipped) == 3 and shipped.num_faces == 34
    assert [p.name for p in shipped.image_paths] == ["astronaut.png", "crowd_27.jpg", "group_8.jpg"]
    assert check_dataset(SHIPPED).ok
    shipped_train = WiderFaceDataset(SHIPPED, transform=TrainTransform(320, rng=0))
    loader = torch.utils.data.DataLoader(shipped_train, batch_size=3, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert images.shape == (3, 3, 320, 320) and len(targets) == 3
    assert all(t.shape[1] == 15 and len(t) >= 1 for t in targets)


# ----------------------------------------------------------------- real WIDER labels (issue 13)
def write_official_labels(path: Path, gt_dir: Path) -> dict:
    """The official val ground truth (.mat) rewritten in the official text layout (what
    wider_face_val_bbx_gt.txt holds), and the counts read straight from the .mat."""
    from scipy.io import loadmat

    mat = loadmat(str(gt_dir / "wider_face_val.mat"))
    lines, counts = [], {"images": 0, "faces": 0, "empty": 0, "invalid": 0, "degenerate": 0}
    for e, event in enumerate(mat["event_list"].ravel()):
        event = str(np.asarray(event).ravel()[0])
        for j, name in enumerate(mat["file_list"][e, 0].ravel()):
            boxes = np.asarray(mat["face_bbx_list"][e, 0][j, 0]).reshape(-1, 4)
            if len(boxes) == 1 and not boxes.any():
                boxes = boxes[:0]  # the .mat lists a face-less image as one all-zero box
            attrs = [np.asarray(mat[f"{k}_label_list"][e, 0][j, 0]).reshape(-1) for k in
                     ("blur", "expression", "illumination", "invalid", "occlusion", "pose")]
            lines += [f"{event}/{np.asarray(name).ravel()[0]}.jpg", str(len(boxes))]
            if len(boxes) == 0:
                lines.append("0 0 0 0 0 0 0 0 0 0")
                counts["empty"] += 1
            for k, box in enumerate(boxes):
                lines.append(" ".join(str(int(v)) for v in [*box, *(a[k] for a in attrs)]))
            good = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
            counts["images"] += 1
            counts["faces"] += int(good.sum())
            counts["degenerate"] += int((~good).sum())
            counts["invalid"] += int((attrs[3][good] != 0).sum())
    path.write_text("\n".join(lines) + "\n")
    return counts


def test_official_val_labels_parse_with_degenerate_invalid_and_empty_entries(tmp_path):
    label = tmp_path / "wider_face_val_bbx_gt.txt"
    counts = write_official_labels(label, _need(SHARED / "data" / "widerface_val_gt"))
    # What the issue measured on the same ground truth: 39,708 boxes in the .mat, 4 of them the
    # all-zero placeholders of face-less images, 7 degenerate.
    assert counts == {"images": 3226, "faces": 39708 - 4 - 7, "empty": 4, "invalid": 585, "degenerate": 7}
    parsed = read_label_file(label)
    assert parsed.format == "wider" and parsed.all_problems() == []
    assert len(parsed.records) == 3226 and parsed.num_faces == counts["faces"]
    assert parsed.num_invalid == counts["invalid"] and len(parsed.dropped_boxes()) == 7
    report = check_dataset(label, labels_only=True)
    assert report.ok and report.bad_samples == set()
    assert (report.num_images, report.num_faces, report.num_empty, report.num_invalid, len(report.dropped_boxes)) == (
        3226, counts["faces"], 4, 585, 7)
    out = _run_check(str(label), "--labels_only")
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("3226 images (4 without faces), 39697 faces, 7 degenerate boxes dropped, 585 faces flagged invalid"
            in out.stdout and out.stdout.count("warning: ") == 6)  # 5 listed + "... 2 more"
    # The dataset keeps every image, without the invalid faces unless asked for them.
    dataset = WiderFaceDataset(label, image_root=tmp_path)
    assert len(dataset) == 3226 and dataset.num_faces == counts["faces"] - 585 and dataset.num_invalid == 585
    assert WiderFaceDataset(label, image_root=tmp_path, keep_invalid=True).num_faces == counts["faces"]


def test_labels_only_exit_code_follows_whether_training_can_start(tmp_path):
    label = _write(tmp_path, "a.jpg\n2\n1 1 4 4 0 0 0 0 0 0\n1 1 4\nb.jpg\n1\n2 2 0 5 0 0 0 0 0 0\n")
    out = _run_check(str(label), "--labels_only")
    assert out.returncode == 2
    assert f"{label}:4: malformed face line" in out.stdout and "labels only, images not opened" in out.stdout
    assert "with --skip_bad_samples it leaves out the 0 image(s) with a problem and the 1 unusable face line(s)" in out.stdout
    dataset = WiderFaceDataset(label, image_root=tmp_path, skip=check_dataset(label, labels_only=True).bad_samples,
                               skip_bad_faces=True)
    assert [len(r.boxes) for r in dataset.records] == [1, 0]  # both images kept


def _truncated_jpeg_with_thumbnail(full: bytes, thumbnail: bytes, keep: int) -> bytes:
    """A JPEG cut after `keep` bytes whose APP1 segment embeds a complete JPEG (as EXIF
    thumbnails do), so an end-of-image marker does occur in the file, before the image data."""
    payload = b"Exif\x00\x00" + thumbnail
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return full[:2] + segment + full[2:keep]


def test_truncated_images_are_problems(tmp_path):
    source = REPO / "data" / "sample" / "images" / "group_8.jpg"
    full = source.read_bytes()
    ok, thumb = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    images = tmp_path / "images"
    images.mkdir()
    (images / "whole.jpg").write_bytes(full)
    (images / "cut.jpg").write_bytes(full[:5000])  # libjpeg decodes it, grey below the cut
    (images / "cut_thumb.jpg").write_bytes(_truncated_jpeg_with_thumbnail(full, thumb.tobytes(), 40000))
    png = cv2.imencode(".png", cv2.imread(str(source)))[1].tobytes()
    (images / "cut.png").write_bytes(png[: len(png) - 20])  # the IEND chunk is lost
    decoded = cv2.imread(str(images / "cut.jpg"), cv2.IMREAD_COLOR)  # what training reads: a grey-filled image
    assert decoded is not None and decoded.shape == (768, 1024, 3) and (decoded[200:] == 128).all()
    label = _write(tmp_path, "".join(f"# {n}\n10 10 40 40\n" for n in ("whole.jpg", "cut.jpg", "cut_thumb.jpg", "cut.png")))
    report = check_dataset(label)
    assert [p.line for p in report.problems] == [3, 5, 7]
    for problem, text in zip(report.problems, ("JPEG is truncated (no end-of-image marker after the image data)",
                                               "JPEG is truncated", "PNG is truncated (no IEND chunk)")):
        assert text in problem.message, problem
    assert report.bad_samples == {1, 2, 3}


def test_read_image_refuses_what_cv2_imread_would_return_grey(tmp_path):
    """data.preprocess.read_image, used by detect.py, test_widerface.py and INT8 calibration."""
    from data.preprocess import read_image
    from utils.deploy.export import ExportError
    from utils.deploy.quantize import load_image

    source = REPO / "data" / "sample" / "images" / "group_8.jpg"
    full = source.read_bytes()
    image, why = read_image(source)
    assert why == "" and np.array_equal(image, cv2.imread(str(source), cv2.IMREAD_COLOR))  # the same decode
    png = cv2.imencode(".png", image)[1].tobytes()
    ok, thumb = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    cases = {"cut.jpg": (full[:5000], "JPEG is truncated"),
             "cut_thumb.jpg": (_truncated_jpeg_with_thumbnail(full, thumb.tobytes(), 40000), "JPEG is truncated"),
             "cut.png": (png[: len(png) - 20], "PNG is truncated"),
             "empty.jpg": (b"", "image file is empty"),
             "text.png": (b"not an image", "image cannot be decoded (corrupt or not an image)"),
             "garbage.jpg": (b"\xff\xd8 not really a JPEG", "image cannot be decoded (corrupt or not an image; JPEG is")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        image, why = read_image(tmp_path / name)
        assert image is None and reason in why, (name, why)
    image, why = read_image(tmp_path / "missing.jpg")
    assert image is None and why.startswith("cannot read the file")
    (tmp_path / "whole.png").write_bytes(png)
    assert np.array_equal(read_image(tmp_path / "whole.png")[0], cv2.imread(str(source)))
    # An EXIF orientation tag (6: rotate 90 degrees clockwise) is applied as cv2.imread applies it.
    tiff = b"MM\x00*\x00\x00\x00\x08\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" + b"\x00" * 4
    exif = b"Exif\x00\x00" + tiff
    (tmp_path / "rotated.jpg").write_bytes(full[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + full[2:])
    image, why = read_image(tmp_path / "rotated.jpg")
    assert why == "" and image.shape == (1024, 768, 3)
    assert np.array_equal(image, cv2.imread(str(tmp_path / "rotated.jpg"), cv2.IMREAD_COLOR))
    # cv2.imdecode refuses what cv2.imread returned grey-filled; the reason names the truncation.
    with pytest.raises(ExportError, match=r"cut.jpg: image cannot be decoded \(corrupt or not an image; JPEG is truncated"):
        load_image(tmp_path / "cut.jpg")


# ---------------------------------------------------------------------------- real-world input
def _coordinate_image(height: int, width: int) -> np.ndarray:
    """uint16 image whose pixels hold their own (x, y), channel 2 = 1000 marks image (not padding)."""
    image = np.empty((height, width, 3), np.uint16)
    image[..., 0] = np.arange(width)[None, :]
    image[..., 1] = np.arange(height)[:, None]
    image[..., 2] = 1000
    return image


@pytest.mark.parametrize("seed", range(40))
def test_train_transform_keeps_boxes_and_landmarks_on_their_pixels(seed, monkeypatch):
    """Property: after crop, pad, flip and resize, every target's box and landmarks point at the
    pixels they labelled in the original image, and a flip swaps the left/right landmark slots
    (left eye stays image-left of the right eye). The geometry is read back from the output
    pixels themselves, which hold their original coordinates."""
    monkeypatch.setattr(augment, "INTERPOLATIONS", (cv2.INTER_NEAREST,))  # no blending of coordinates
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(40, 300, 2))
    size = int(rng.choice([64, 128]))
    faces = int(rng.integers(1, 6))
    box_wh = rng.uniform(8, [width / 2, height / 2], (faces, 2))
    corner = rng.uniform(-box_wh / 4, [width, height] - box_wh * 3 / 4)  # some poke over the border
    boxes = np.concatenate([corner, corner + box_wh], axis=1).astype(np.float32)
    shape = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]])  # le, re, n, lm, rm
    landmarks = (corner[:, None] + shape[None] * box_wh[:, None]).reshape(faces, 10).astype(np.float32)

    transform = TrainTransform(size, photometric=False, min_face_size=0)
    tensor, target = transform.apply(_coordinate_image(height, width), boxes, landmarks, None,
                                     np.random.default_rng(seed + 1000))
    out = tensor.numpy().transpose(1, 2, 0) + np.float32(MEAN_BGR)
    v, u = np.nonzero(np.abs(out[..., 2] - 1000) < 0.5)  # output pixels showing the image
    xs, ys = out[v, u, 0], out[v, u, 1]
    ax, bx = np.polyfit(u + 0.5, xs + 0.5, 1)  # original x = ax * output u + bx
    ay, by = np.polyfit(v + 0.5, ys + 0.5, 1)
    flipped = ax < 0
    visible = np.float32([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # the crop, in original pixels
    clipped = np.clip(boxes, 0, [width, height] * 2)
    expected_boxes = np.clip(clipped, visible[:2].tolist() * 2, visible[2:].tolist() * 2)
    expected_boxes = np.stack([(expected_boxes[:, 0] - bx) / ax, (expected_boxes[:, 1] - by) / ay,
                               (expected_boxes[:, 2] - bx) / ax, (expected_boxes[:, 3] - by) / ay], 1) / size
    points = landmarks.reshape(faces, 5, 2)
    if flipped:
        expected_boxes = expected_boxes[:, [2, 1, 0, 3]]
        points = points[:, list(augment.LANDMARK_FLIP_ORDER)]
    expected_points = np.stack([(points[..., 0] - bx) / ax, (points[..., 1] - by) / ay], -1).reshape(faces, 10) / size
    tolerance = 2.5 / size  # nearest-neighbour resampling of integer coordinates
    face = 0  # targets keep the label-file order of the faces they keep
    for row in target:
        while face < faces and not (np.abs(row[:4] - expected_boxes[face]).max() < tolerance
                                    and np.abs(row[4:14] - expected_points[face]).max() < tolerance):
            face += 1
        assert face < faces, f"target {row} matches no labelled face (flipped={flipped})"
        assert row[4] < row[6] and row[10] < row[12] and row[14] == 1  # left points stay image-left
        face += 1


def test_jpeg_with_data_after_its_end_is_not_truncated(tmp_path):
    """Phones append data after a complete JPEG (motion photos: an MP4; MPF: a second JPEG): OpenCV
    decodes the photo, and a scan for the last start-of-scan marker must not call it truncated."""
    from data.preprocess import read_image
    full = (REPO / "data" / "sample" / "images" / "group_8.jpg").read_bytes()
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(np.random.default_rng(0).integers(0, 256, 20000, np.uint8))
    for name, tail in [("motion.jpg", video + b"\xff\xda\x00\x08 more"), ("mpf.jpg", full[:3000])]:
        (tmp_path / name).write_bytes(full + tail)
        image, why = read_image(tmp_path / name)
        assert why == "" and image.shape == (768, 1024, 3), (name, why)
    label = _write(tmp_path, "# motion.jpg\n10 10 40 40\n# mpf.jpg\n10 10 40 40\n")
    assert check_dataset(label, tmp_path, use_cache=False).ok
    # Cut inside the image data, or inside a header segment, it still is truncated.
    for keep in (5000, 100):
        (tmp_path / "cut.jpg").write_bytes(full[:keep])
        assert "JPEG is truncated" in read_image(tmp_path / "cut.jpg")[1]


def test_dataset_refuses_a_truncated_image_on_load(tmp_path):
    # cv2.imread returns a cut JPEG grey-filled; the dataset must not train on it unnoticed.
    full = (REPO / "data" / "sample" / "images" / "group_8.jpg").read_bytes()
    label = _write(tmp_path, "# cut.jpg\n10 10 40 40\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cut.jpg").write_bytes(full[:5000])
    with pytest.raises(LabelFormatError, match=rf"{label}:1: .*JPEG is truncated"):
        WiderFaceDataset(label)[0]


def test_image_path_with_a_nul_byte_is_a_problem_not_a_crash(tmp_path):
    # A damaged label file can hold NUL bytes; os.stat raises ValueError (not OSError) on them.
    label = _write(tmp_path, "# a\x00b.jpg\n10 10 20 20\n# good.jpg\n10 10 20 20\n", ["good.jpg"])
    report = check_dataset(label, use_cache=False)
    assert [(p.line, p.face) for p in report.problems] == [(1, False)] and report.bad_samples == {0}
    assert "\x00" not in str(report.problems[0]) and "NUL" in report.problems[0].message
    result = _run_check(str(label))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    from data.preprocess import read_image
    assert read_image("a\x00b.jpg")[0] is None


def test_label_file_that_is_not_utf8_names_the_line(tmp_path):
    label = tmp_path / "label.txt"
    label.write_bytes("a/1.jpg\n1\n1 2 3 4 0 0 0 0 0 0\ncaf\xe9/2.jpg\n0\n".encode("latin-1"))
    parsed = read_label_file(label)
    assert [(p.line, p.face) for p in parsed.problems] == [(4, False)] and parsed.records == []
    assert "not UTF-8" in parsed.problems[0].message and "0xe9" in parsed.problems[0].message
    result = _run_check(str(label), "--labels_only")
    assert result.returncode == 2 and f"{label}:4: " in result.stdout and "Traceback" not in result.stderr


def test_check_refuses_a_missing_images_folder_in_one_line(tmp_path):
    label = _write(tmp_path, "# a.jpg\n10 10 20 20\n# b.jpg\n10 10 20 20\n", ["a.jpg", "b.jpg"])
    result = _run_check(str(label), "--images", str(tmp_path / "no_such_folder"))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: images folder {tmp_path / 'no_such_folder'} not found\n"


def test_windows_path_separators_in_labels_find_the_images(tmp_path):
    # Label files written on Windows name "0--Parade\\x.jpg"; on Linux "\\" would be part of the name.
    label = _write(tmp_path, "# sub\\b.jpg\n10 10 20 20\n", ["sub/b.jpg"])
    wider = tmp_path / "wider.txt"
    wider.write_text("sub\\b.jpg\r\n1\r\n10 10 20 20 0 0 0 0 0 0 \r\n")
    for path in (label, wider):
        assert check_dataset(path, use_cache=False).ok, check_dataset(path, use_cache=False).problems
        dataset = WiderFaceDataset(path)
        assert dataset.image_paths == [tmp_path / "images" / "sub" / "b.jpg"] and dataset[0][1].shape == (1, 15)
