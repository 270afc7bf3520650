"""test_widerface.py, test_v1_v2_comparison.py and their helpers (utils/evaluation/predict.py,
utils/evaluation/tta.py, utils/evaluation/pr_plot.py), and the published protocol: by default
test_widerface.py writes the published script's own prediction files (tests/goldens/README.md)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import test_v1_v2_comparison
import test_widerface
from models import build_model
from tests.conftest import ROOT, shared_path
from utils.checkpoint import save_checkpoint
from utils.errors import FeatherFaceError, run_cli
from utils.evaluation.pr_plot import SETTING_COLORS, Curve, draw_pr_curves, save_pr_curves
from utils.inference.postprocess import PostProcessConfig
from utils.evaluation.run import input_size, weights_run_name
from utils.evaluation.tta import detect_with_tta, merge_detections, mirror_detections
from utils.evaluation.widerface_eval import (SETTINGS, WiderFaceEvalError, evaluate_predictions, load_ground_truth,
                                  read_prediction_file, read_predictions)
from utils.evaluation.predict import (evaluate_images, image_key, list_images, published_protocol_detector,
                                      to_xywh_score)

pytestmark = pytest.mark.usefixtures("one_thread")

VAL_SAMPLE = ("data", "widerface_val_sample")
SAMPLE_IMAGES = ROOT / "data" / "sample" / "images"
PUBLISHED_TXT = ROOT / "tests" / "goldens" / "published_widerface_txt"




def run_main(module, argv):
    """Run a script's main() in-process; returns (result, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    return result, out.getvalue()


def prediction_files(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.txt"))


# ------------------------------------------------------------------------------ command lines


def test_help():
    out = subprocess.run([sys.executable, "test_widerface.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ["--weights", "--dataset_folder", "--gt_dir", "--no-origin_size", "--flip", "--scales", "--float_boxes"]:
        assert flag in out.stdout


def test_comparison_help(capsys):
    # In-process (one interpreter start is enough for the suite): --help needs no data or weights.
    with pytest.raises(SystemExit) as exit_info:
        test_v1_v2_comparison.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--weights", "--models", "--runs", "--threads", "--output_md", "--output_json", "--gt_dir"]:
        assert flag in out


def test_resize_flags():
    parse = test_widerface.get_args_parser().parse_args
    base = ["--weights", "w.pth", "--dataset_folder", "d"]
    assert input_size(parse(base)) == (None, None)
    assert input_size(parse(base + ["--origin_size", "--max_size", "1024"])) == (None, 1024)
    assert input_size(parse(base + ["--no-origin_size"])) == (1600, 2150)
    assert input_size(parse(base + ["--image_size", "640", "--max_size", "1024"])) == (640, 1024)
    with pytest.raises(FeatherFaceError, match="exclude each other"):
        input_size(parse(base + ["--origin_size", "--image_size", "640"]))


def test_missing_weights_is_one_line_error(tmp_path, capsys):
    args = test_widerface.get_args_parser().parse_args(
        ["--weights", str(tmp_path / "nope.pth"), "--dataset_folder", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(test_widerface.main, args)
    assert exit_info.value.code == 2
    assert "weights not found" in capsys.readouterr().err


# -------------------------------------------------------------------------------- image lists


def test_list_images(tmp_path):
    (tmp_path / "b--Event").mkdir()
    (tmp_path / "a--Event").mkdir()
    for rel in ("b--Event/x.jpg", "a--Event/y.png", "a--Event/z.JPG", "a--Event/notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    assert list_images(tmp_path) == ["a--Event/y.png", "a--Event/z.JPG", "b--Event/x.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("/0--Parade/0_Parade_1.jpg\n\n11--Meeting/a.jpg\n")  # leading "/" as in some lists
    assert list_images(tmp_path, listing) == ["0--Parade/0_Parade_1.jpg", "11--Meeting/a.jpg"]
    assert image_key("0--Parade/0_Parade_1.jpg") == ("0--Parade", "0_Parade_1")
    listing.write_text("0--Parade/a.jpg\njust_a_name.jpg\n")
    with pytest.raises(FeatherFaceError, match=r"list\.txt:2: expected 'event/name\.jpg'"):
        list_images(tmp_path, listing)
    (tmp_path / "stray.jpg").write_bytes(b"")
    with pytest.raises(FeatherFaceError, match="WIDER layout"):
        list_images(tmp_path)


def test_list_images_skips_hidden_files(tmp_path):
    # Copies made on macOS carry AppleDouble files (._name.jpg) and .DS_Store; notebooks leave
    # .ipynb_checkpoints: none of them is a WIDER image.
    (tmp_path / "0--Ev").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    for rel in ("0--Ev/a.jpg", "0--Ev/._a.jpg", "0--Ev/.DS_Store", ".DS_Store", "._c.jpg",
                ".ipynb_checkpoints/b.jpg"):
        (tmp_path / rel).write_bytes(b"")
    assert list_images(tmp_path) == ["0--Ev/a.jpg"]


# ------------------------------------------------------------------------------------ TTA


def test_mirror_detections_exact():
    row = np.array([[10, 20, 50, 80, 0.9, 15, 30, 40, 31, 28, 50, 18, 70, 44, 71]], dtype=np.float32)
    mirrored = mirror_detections(row, width=100)
    # x -> 100 - x; x1/x2 swap; left/right eyes and mouth corners swap, the nose stays.
    expected = [[50, 20, 90, 80, 0.9, 60, 31, 85, 30, 72, 50, 56, 71, 82, 70]]
    np.testing.assert_array_equal(mirrored, np.array(expected, dtype=np.float32))
    np.testing.assert_array_equal(mirror_detections(mirrored, 100), row)
    assert mirror_detections(np.zeros((0, 15)), 100).shape == (0, 15)


class BrightBoxDetector:
    """Stub FaceDetector: 'detects' the bright rectangle of an image; records the scales asked for."""

    postprocess = PostProcessConfig(nms_threshold=0.4, keep_top_k=750)

    def __init__(self, base_scale: float = 1.0):
        self.base_scale, self.scales = base_scale, []

    def scale_for(self, image):
        return self.base_scale

    def detect_array(self, image, scale=None):
        self.scales.append(scale)
        ys, xs = np.nonzero(image[:, :, 0] > 128)
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1  # continuous pixel edges
        w, h = x2 - x1, y2 - y1
        # Landmarks at fixed fractions of the box: left eye / mouth on the image's left.
        points = [(x1 + w / 4, y1 + h / 4), (x1 + 3 * w / 4, y1 + h / 4), (x1 + w / 2, y1 + h / 2),
                  (x1 + w / 4, y1 + 3 * h / 4), (x1 + 3 * w / 4, y1 + 3 * h / 4)]
        return np.array([[x1, y1, x2, y2, 0.9] + [v for p in points for v in p]], dtype=np.float32)


def test_flip_tta_mirrors_back_exactly():
    image = np.zeros((60, 90, 3), np.uint8)
    image[10:34, 7:23] = 255  # off-centre, so a wrong mirror would be caught
    detector = BrightBoxDetector()
    plain = detector.detect_array(image)
    flipped_raw = detector.detect_array(cv2.flip(image, 1))
    assert flipped_raw[0, 0] != plain[0, 0]
    np.testing.assert_array_equal(mirror_detections(flipped_raw, image.shape[1]), plain)
    merged = detect_with_tta(detector, image, flip=True)
    np.testing.assert_array_equal(merged, plain)  # the two passes coincide: NMS keeps one


def test_multiscale_tta_scales_are_factors_on_the_base_scale():
    image = np.zeros((40, 40, 3), np.uint8)
    image[5:15, 5:15] = 255
    detector = BrightBoxDetector(base_scale=0.5)
    detect_with_tta(detector, image, flip=True, scales=[1.0, 2.0])
    assert detector.scales == [0.5, 0.5, 1.0, 1.0]  # (plain, flipped) per factor
    with pytest.raises(FeatherFaceError, match="positive"):
        detect_with_tta(detector, image, scales=[0.0])


def test_flip_tta_works_for_a_fixed_size_detector():
    # A --static_size export letterboxes every image into one size: the flip pass is one more
    # letterboxed image (allowed), another scale is not (refused with a message saying why).
    from utils.inference.detector import FaceDetector

    torch.manual_seed(0)
    detector = FaceDetector(build_model("v2"), conf=0.02, fixed_size=(96, 96))
    image = cv2.resize(cv2.imread(str(SAMPLE_IMAGES / "group_8.jpg")), (101, 75))  # odd width and height
    expected = merge_detections([detector.detect_array(image),
                                 mirror_detections(detector.detect_array(cv2.flip(image, 1)), 101)],
                                detector.nms, detector.keep_top_k, detector.postprocess.pixel_inclusive_nms)
    assert len(expected) > 0
    np.testing.assert_array_equal(detect_with_tta(detector, image, flip=True), expected)
    with pytest.raises(FeatherFaceError, match="multi-scale TTA .* fixed input size 96x96"):
        detect_with_tta(detector, image, flip=True, scales=[1.0, 0.5])


def test_merge_detections():
    def det(x1, score):
        return np.array([[x1, 0, x1 + 10, 10, score] + [0] * 10], dtype=np.float32)

    merged = merge_detections([det(0, 0.5), det(1, 0.8), det(50, 0.7)], nms_threshold=0.4, keep_top_k=10)
    np.testing.assert_array_equal(merged[:, [0, 4]], np.array([[1, 0.8], [50, 0.7]], dtype=np.float32))
    assert len(merge_detections([det(0, 0.5), det(50, 0.7)], 0.4, keep_top_k=1)) == 1
    assert merge_detections([], 0.4, 10).shape == (0, 15)


# ------------------------------------------------------------------ published protocol NMS


def inclusive_pixel_nms(dets: np.ndarray, threshold: float) -> list:
    """Greedy NMS written out with the inclusive-pixel IoU of the published script's NMS."""
    x1, y1, x2, y2, scores = (dets[:, i].astype(np.float64) for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i, order = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order]) - np.maximum(x1[i], x1[order]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order]) - np.maximum(y1[i], y1[order]) + 1)
        inter = w * h
        order = [j for j, o in zip(order, inter / (areas[i] + areas[order] - inter)) if o <= threshold]
    return keep


def pixel_nms(dets: np.ndarray, threshold: float) -> np.ndarray:
    """The library's inclusive-pixel NMS (the one FaceDetector runs with WIDER_POSTPROCESS)."""
    return merge_detections([dets], threshold, None, pixel_inclusive_nms=True)


def test_pixel_nms_counts_pixels_inclusively():
    def det(x1, score):
        return [x1, 0, x1 + 10, 10, score] + [0] * 10

    pair = np.array([det(0, 0.9), det(4.5, 0.8)], dtype=np.float32)
    # Ordinary IoU 55 / 145 = 0.38 keeps both; inclusive pixels 71.5 / 170.5 = 0.42 drops the second.
    assert len(merge_detections([pair], 0.4, 10)) == 2
    np.testing.assert_array_equal(pixel_nms(pair, 0.4), pair[:1])
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 200, (300, 2))
    sizes = rng.uniform(2, 40, (300, 2))
    dets = np.zeros((300, 15), np.float32)
    dets[:, :2], dets[:, 2:4], dets[:, 4] = corners, corners + sizes, rng.permutation(300) / 300 + 0.001
    kept = pixel_nms(dets, 0.4)
    assert 50 < len(kept) < 300
    np.testing.assert_array_equal(kept, dets[inclusive_pixel_nms(dets, 0.4)])
    assert pixel_nms(np.zeros((0, 15), np.float32), 0.4).shape == (0, 15)


# ---------------------------------------------------------------------------------- PR plot


def test_pr_plot_draws_curves(tmp_path):
    recall = np.linspace(0, 1, 50)
    precision = np.where(np.arange(50) < 3, np.nan, 1 - recall ** 2)  # NaN = no proposals yet
    canvas = draw_pr_curves([Curve("Easy AP 0.5", recall, precision, SETTING_COLORS["easy"])], (640, 480), "t")
    assert canvas.shape == (480, 640, 3) and canvas.dtype == np.uint8
    # The curve's colour appears, and at (recall 0.5, precision 0.75) in the plot area.
    assert (canvas == SETTING_COLORS["easy"]).all(axis=2).sum() > 300
    x, y = round(90 + 0.5 * (640 - 120)), round(50 + 0.25 * (480 - 120))
    patch = canvas[y - 3 : y + 4, x - 3 : x + 4].astype(int)
    assert (np.abs(patch - SETTING_COLORS["easy"]).sum(axis=2) < 60).any()
    with pytest.raises(ValueError, match="too small"):
        draw_pr_curves([], (100, 100))


def test_save_pr_curves_reports_unwritable_file(real_run, tmp_path):
    with pytest.raises(FeatherFaceError, match="cannot write the PR-curve image"):
        save_pr_curves(real_run["results"]["result"], tmp_path / "curves.notanimage")


# -------------------------------------------- made-up dataset, random-init V2 (shipped images)


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    """A dataset in the WIDER layout: the shipped sample photos plus a corrupt JPEG and a JPEG cut
    short (sorted first, so the run must continue past them), and a random-init V2 checkpoint."""
    root = tmp_path_factory.mktemp("made_up")
    images = root / "images"
    (images / "0--Broken").mkdir(parents=True)
    (images / "0--Broken" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    whole = (SAMPLE_IMAGES / "group_8.jpg").read_bytes()  # cv2.imread would decode this one, grey below the cut
    (images / "0--Broken" / "cut_short.jpg").write_bytes(whole[: len(whole) // 2])
    shutil.copytree(SAMPLE_IMAGES, images / "1--Sample")
    torch.manual_seed(0)
    weights = root / "v2_random.pth"
    save_checkpoint(weights, build_model("v2"))
    return images, weights


def made_up_args(made_up, save_folder, *extra):
    images, weights = made_up
    return ["--weights", weights, "--dataset_folder", images, "--save_folder", save_folder,
            "--image_size", "160", "--quiet", *extra]


def test_random_v2_writes_consistent_files_and_skips_corrupt_image(made_up, tmp_path):
    save = tmp_path / "pred"
    results, out = run_main(test_widerface, made_up_args(made_up, save))
    assert results["prediction"]["unreadable"] == ["0--Broken/corrupt.jpg", "0--Broken/cut_short.jpg"]
    assert "0--Broken/corrupt.jpg" in out and "0--Broken/cut_short.jpg" in out and "unreadable" in out
    names = sorted(p.name for p in SAMPLE_IMAGES.iterdir())
    assert prediction_files(save) == [f"1--Sample/{Path(n).stem}.txt" for n in names]  # none for the broken two
    assert results["prediction"]["written"] == len(names)
    detector = published_protocol_detector(made_up[1], image_size=160)
    for name in names:
        path = save / "1--Sample" / f"{Path(name).stem}.txt"
        lines = path.read_text().splitlines()
        assert lines[0] == Path(name).stem
        assert int(lines[1]) == len(lines) - 2 > 0
        assert all(len(line.split()) == 5 for line in lines[2:])
        # Written boxes are exactly the shared detector's output (integer x, y, w, h; float32 score).
        assert_same_predictions(read_prediction_file(path),
                                to_xywh_score(detector.detect_array(cv2.imread(str(SAMPLE_IMAGES / name)))))


def assert_same_predictions(written: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(written[:, :4], expected[:, :4])
    np.testing.assert_array_equal(np.float32(written[:, 4]), np.float32(expected[:, 4]))


def test_resume_skips_and_overwrite_rewrites(made_up, tmp_path):
    save = tmp_path / "pred"
    run_main(test_widerface, made_up_args(made_up, save))
    files = [save / f for f in prediction_files(save)]
    old = 1_000_000_000
    for f in files:
        os.utime(f, (old, old))
    # A file cut short by a killed run does not count as done.
    broken = files[0]
    broken.write_text(broken.read_text().splitlines()[0] + "\n5\n1 2 3 4 0.5\n")
    os.utime(broken, (old, old))

    results, _ = run_main(test_widerface, made_up_args(made_up, save))
    assert results["prediction"]["skipped"] == len(files) - 1 and results["prediction"]["written"] == 1
    assert [f.stat().st_mtime for f in files[1:]] == [old] * (len(files) - 1)
    read_prediction_file(broken)  # rewritten, parses again

    with pytest.raises(FeatherFaceError, match="confidence_threshold"):  # other settings: no silent mixing
        run_main(test_widerface, made_up_args(made_up, save, "--confidence_threshold", "0.5"))

    results, _ = run_main(test_widerface, made_up_args(made_up, save, "--overwrite"))
    assert results["prediction"]["written"] == len(files) and results["prediction"]["skipped"] == 0
    assert all(f.stat().st_mtime != old for f in files)


def test_partial_overwrite_with_other_settings_is_refused(made_up, tmp_path):
    # --overwrite for a subset with new settings would leave the other files under a record
    # claiming the new settings: refused, and nothing is rewritten; the whole set is allowed.
    save = tmp_path / "pred"
    run_main(test_widerface, made_up_args(made_up, save))
    files = {f: (save / f).read_bytes() for f in prediction_files(save)}
    record = (tmp_path / "pred_settings.json").read_text()
    listing = tmp_path / "one.txt"
    listing.write_text("1--Sample/group_8.jpg\n")
    with pytest.raises(FeatherFaceError, match=r"would leave 2 prediction file\(s\) of the earlier settings"):
        run_main(test_widerface, made_up_args(made_up, save, "--overwrite", "--image_list", listing,
                                              "--confidence_threshold", "0.5"))
    assert {f: (save / f).read_bytes() for f in prediction_files(save)} == files
    assert (tmp_path / "pred_settings.json").read_text() == record
    results, _ = run_main(test_widerface, made_up_args(made_up, save, "--overwrite", "--image_list", listing))
    assert results["prediction"]["written"] == 1  # same settings: a partial overwrite is harmless
    results, _ = run_main(test_widerface, made_up_args(made_up, save, "--overwrite", "--confidence_threshold", "0.5"))
    assert results["prediction"]["written"] == len(files)
    assert json.loads((tmp_path / "pred_settings.json").read_text())["confidence_threshold"] == 0.5


def test_images_sharing_a_prediction_file_are_refused(made_up, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "1--Ev" / "sub").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGES / "group_8.jpg", images / "1--Ev" / "x.jpg")
    shutil.copy(SAMPLE_IMAGES / "astronaut.png", images / "1--Ev" / "x.png")
    shutil.copy(SAMPLE_IMAGES / "group_8.jpg", images / "1--Ev" / "sub" / "deep.jpg")
    args = made_up_args(made_up, tmp_path / "pred")
    args[args.index("--dataset_folder") + 1] = images
    with pytest.raises(FeatherFaceError, match="1--Ev/x.jpg and 1--Ev/x.png would both write"):
        run_main(test_widerface, args)
    assert not (tmp_path / "pred").exists()
    assert list_images(images) == ["1--Ev/x.jpg", "1--Ev/x.png"]
    assert "1 image(s) in sub-folders of an event are not predicted" in capsys.readouterr().out


def test_listed_images_stored_with_another_extension_are_found(made_up, tmp_path):
    # An image list of the official .jpg names (Windows line endings, './' prefixes) over a folder
    # whose copies are .PNG / .JPG: the one same-named image of the event is predicted.
    images = tmp_path / "images"
    (images / "1--Ev").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGES / "astronaut.png", images / "1--Ev" / "a.PNG")
    shutil.copy(SAMPLE_IMAGES / "group_8.jpg", images / "1--Ev" / "b.JPG")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"1--Ev/a.jpg\r\n./1--Ev/b.jpg\r\n1--Ev/missing.jpg\r\n")
    args = made_up_args(made_up, tmp_path / "pred", "--image_list", listing)
    args[args.index("--dataset_folder") + 1] = images
    results, _ = run_main(test_widerface, args)
    assert results["prediction"]["written"] == 2 and results["prediction"]["unreadable"] == ["1--Ev/missing.jpg"]
    assert prediction_files(tmp_path / "pred") == ["1--Ev/a.txt", "1--Ev/b.txt"]
    detector = published_protocol_detector(made_up[1], image_size=160)
    assert_same_predictions(read_prediction_file(tmp_path / "pred" / "1--Ev" / "b.txt"),
                            to_xywh_score(detector.detect_array(cv2.imread(str(SAMPLE_IMAGES / "group_8.jpg")))))


def test_bad_sizes_and_scales_stop_before_the_model_loads(made_up, tmp_path, capsys):
    for extra, message in ((["--image_size", "0"], "error: image_size must be a positive"),
                           (["--max_size", "-5"], "error: max_size must be a positive"),
                           (["--scales", "0", "1"], "error: --scales must all be positive")):
        args = test_widerface.get_args_parser().parse_args([str(a) for a in made_up_args(made_up, tmp_path / "p")]
                                                            + extra)
        args.weights = str(made_up[1])
        with pytest.raises(SystemExit) as exit_info:
            run_cli(test_widerface.main, args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "p_settings.json").exists()


def test_tta_run_matches_direct_tta_call(made_up, tmp_path):
    save = tmp_path / "pred"
    run_main(test_widerface, made_up_args(made_up, save, "--flip", "--scales", "1", "0.5"))
    detector = published_protocol_detector(made_up[1], image_size=160)
    image = cv2.imread(str(SAMPLE_IMAGES / "group_8.jpg"))
    expected = to_xywh_score(detect_with_tta(detector, image, flip=True, scales=[1.0, 0.5]))
    assert_same_predictions(read_prediction_file(save / "1--Sample" / "group_8.txt"), expected)
    settings = json.loads((tmp_path / "pred_settings.json").read_text())
    assert settings["flip"] is True and settings["scales"] == [1.0, 0.5]


def test_float_boxes_are_opt_in(made_up, tmp_path):
    run_main(test_widerface, made_up_args(made_up, tmp_path / "int"))
    run_main(test_widerface, made_up_args(made_up, tmp_path / "float", "--float_boxes"))
    exact = read_prediction_file(tmp_path / "float" / "1--Sample" / "group_8.txt")
    truncated = read_prediction_file(tmp_path / "int" / "1--Sample" / "group_8.txt")
    assert (exact[:, :4] != np.trunc(exact[:, :4])).any()
    x1, y1 = np.trunc(exact[:, 0]), np.trunc(exact[:, 1])
    x2, y2 = np.trunc(exact[:, 0] + exact[:, 2]), np.trunc(exact[:, 1] + exact[:, 3])
    np.testing.assert_allclose(truncated[:, :4], np.stack([x1, y1, x2 - x1, y2 - y1], axis=1), atol=1e-9)
    np.testing.assert_array_equal(np.float32(truncated[:, 4]), np.float32(exact[:, 4]))
    settings = json.loads((tmp_path / "float_settings.json").read_text())
    assert settings["integer_boxes"] is False and settings["nms_iou"] == "pixel_inclusive"
    assert settings["top_k"] is None and settings["keep_top_k"] is None


def test_gt_dir_is_checked_before_predicting(made_up, tmp_path):
    (tmp_path / "empty_gt").mkdir()
    for gt_dir, message in ((tmp_path / "no_gt", "ground-truth folder .*no_gt does not exist"),
                            (tmp_path / "empty_gt", "missing ground-truth file .*wider_face_val.mat")):
        with pytest.raises(FeatherFaceError, match=message):
            run_main(test_widerface, made_up_args(made_up, tmp_path / "pred", "--gt_dir", gt_dir))
        assert not (tmp_path / "pred").exists()  # failed before the first image


def test_negative_limits_are_refused(made_up, tmp_path):
    with pytest.raises(FeatherFaceError, match="0 = no limit"):
        run_main(test_widerface, made_up_args(made_up, tmp_path / "pred", "--top_k", "-1"))


# ------------------------------------------------------- real model on four WIDER val images


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The published model (converted) over the 4 val images at original size, evaluated."""
    from utils.convert_official import convert_file

    published = shared_path("weights", "featherface_v1_original_widerface.pth")
    sample, gt_dir = shared_path(*VAL_SAMPLE), shared_path("data", "widerface_val_gt")
    root = tmp_path_factory.mktemp("real")
    weights = root / "v1_original.pth"
    convert_file(published, weights)
    save = root / "out" / "predictions"
    results, out = run_main(test_widerface, [
        "--weights", weights, "--dataset_folder", sample / "images", "--image_list", sample / "wider_subset.txt",
        "--gt_dir", gt_dir, "--save_folder", save, "--quiet"])
    return dict(results=results, out=out, save=save, sample=sample, gt_dir=gt_dir, weights=weights, root=root)


def test_real_run_writes_official_layout(real_run):
    listed = (real_run["sample"] / "wider_subset.txt").read_text().split()
    assert prediction_files(real_run["save"]) == sorted(n[:-4] + ".txt" for n in listed)
    for rel in listed:
        lines = (real_run["save"] / (rel[:-4] + ".txt")).read_text().splitlines()
        assert lines[0] == Path(rel).stem
        assert int(lines[1]) == len(lines) - 2 > 0
        boxes = np.array([line.split() for line in lines[2:]], dtype=float)
        assert (boxes[:, 2:4] > 0).all() and (boxes[:, 4] > 0.02).all() and (boxes[:, 4] <= 1).all()
        assert (np.diff(boxes[:, 4]) <= 0).all()  # best first


def test_real_run_aps_match_a_direct_evaluator_call(real_run):
    results = real_run["results"]
    assert "evaluated on 4 of 3226 val images" in real_run["out"]
    assert results["images_evaluated"] == 4 and results["images_total"] == 3226
    listed = {image_key(n) for n in (real_run["sample"] / "wider_subset.txt").read_text().split()}
    gt = [g for g in load_ground_truth(real_run["gt_dir"]) if (g.event, g.name) in listed]
    direct = evaluate_predictions(read_predictions(real_run["save"], gt), gt).to_dict()
    assert {s: results[s] for s in SETTINGS} == direct
    assert results["easy"] > 0.5 and all(0.5 < results[s] <= 1 for s in SETTINGS)
    # Measured when this test was written (published model, published protocol); the full val
    # set gives 0.9265 / 0.9024 / 0.7808 according to the model's training notebook.
    assert results["easy"] == pytest.approx(0.6326, abs=5e-3)
    assert results["medium"] == pytest.approx(0.7510, abs=5e-3)
    assert results["hard"] == pytest.approx(0.8442, abs=5e-3)


def test_default_run_writes_the_published_scripts_files(real_run):
    published = prediction_files(PUBLISHED_TXT)
    assert prediction_files(real_run["save"]) == published and len(published) == 4
    for rel in published:
        ours = (real_run["save"] / rel).read_text().splitlines()
        theirs = (PUBLISHED_TXT / rel).read_text().splitlines()
        assert ours[:2] == theirs[:2]  # image name and box count
        assert_same_published_rows(ours[2:], theirs[2:], 1e-4)


def assert_same_published_rows(ours, theirs, score_tolerance):
    """Box lines of a prediction file against the published script's: the same integer boxes in the
    same order, scores within the tolerance (float32 kernels differ), the same line layout."""
    assert [line.endswith(" ") for line in ours] == [line.endswith(" ") for line in theirs]  # "... score \n"
    ours_rows, theirs_rows = [line.split() for line in ours], [line.split() for line in theirs]
    assert [r[:4] for r in ours_rows] == [r[:4] for r in theirs_rows]  # integer boxes, same order
    scores = np.array([[float(a[4]), float(b[4])] for a, b in zip(ours_rows, theirs_rows)])
    assert np.abs(scores[:, 0] - scores[:, 1]).max() <= score_tolerance


def test_no_origin_size_resizes_as_the_published_script(tmp_path):
    # The published script's resize path (target 1600, max 2150) on two photos resized by OpenCV
    # (tests/goldens/README.md): it resizes float32 pixels; a uint8 resize moved crowd_27's scores by
    # 2e-2 and swapped two boxes.
    images = tmp_path / "val" / "images" / "resized"
    images.mkdir(parents=True)
    for name, size in [("crowd_27", (455, 711)), ("group_8", (300, 199))]:
        photo = cv2.imread(str(SAMPLE_IMAGES / f"{name}.jpg"), cv2.IMREAD_COLOR)
        cv2.imwrite(str(images / f"{name}_{size[0]}x{size[1]}.png"), cv2.resize(photo, size, interpolation=cv2.INTER_LINEAR))
    save = tmp_path / "out" / "predictions"
    run_main(test_widerface, ["--weights", ROOT / "weights" / "featherface_v1_original.pth", "--no-origin_size",
                              "--dataset_folder", images.parent, "--save_folder", save, "--quiet"])
    golden = PUBLISHED_TXT.with_name("published_widerface_txt_resized")
    assert prediction_files(save) == prediction_files(golden) == ["resized/crowd_27_455x711.txt",
                                                                  "resized/group_8_300x199.txt"]
    for rel in prediction_files(golden):
        ours, theirs = (save / rel).read_text().splitlines(), (golden / rel).read_text().splitlines()
        assert ours[:2] == theirs[:2] and int(theirs[1]) > 0
        assert_same_published_rows(ours[2:], theirs[2:], 2e-5)


def test_default_run_aps_equal_the_published_files_aps(real_run):
    listed = (real_run["sample"] / "wider_subset.txt").read_text().split()
    published, evaluated, _ = evaluate_images(PUBLISHED_TXT, real_run["gt_dir"], listed)
    assert evaluated == 4
    for setting in SETTINGS:
        assert real_run["results"][setting] == pytest.approx(published[setting], abs=5e-4)


def test_real_run_writes_json_and_png(real_run):
    saved = json.loads((real_run["root"] / "out" / "results.json").read_text())
    assert {s: saved[s] for s in SETTINGS} == {s: real_run["results"][s] for s in SETTINGS}
    assert saved["prediction"]["written"] == 4
    png = cv2.imread(str(real_run["root"] / "out" / "pr_curves.png"))
    assert png is not None and png.shape == (600, 800, 3)
    for color in SETTING_COLORS.values():
        assert (png == color).all(axis=2).sum() > 100  # all three curves drawn


def test_subset_and_missing_files_in_evaluation(real_run, tmp_path):
    listed = (real_run["sample"] / "wider_subset.txt").read_text().split()
    save = tmp_path / "pred"
    shutil.copytree(real_run["save"], save)
    (save / (listed[0][:-4] + ".txt")).unlink()
    with pytest.raises(WiderFaceEvalError, match="1 of 4 images have no prediction file.*--allow_missing"):
        evaluate_images(save, real_run["gt_dir"], listed)
    with pytest.raises(WiderFaceEvalError, match="3223 of 3226 images"):
        evaluate_images(save, real_run["gt_dir"])  # no list: the whole val set is expected
    result, evaluated, total = evaluate_images(save, real_run["gt_dir"], listed, allow_missing=True)
    assert (evaluated, total) == (4, 3226) and result["hard"] < real_run["results"]["hard"]
    with pytest.raises(WiderFaceEvalError, match="not in the validation ground truth"):
        evaluate_images(save, real_run["gt_dir"], listed + ["0--Parade/not_a_val_image.jpg"])


def test_resumed_subset_without_easy_faces_reports_the_other_aps(real_run, tmp_path):
    # 11_26 has no easy face (2 medium, 35 hard): easy AP is undefined, the others are reported;
    # nothing is predicted again, and results.json is strict JSON (null, never NaN).
    shutil.copytree(real_run["root"] / "out", tmp_path / "out")
    listing = tmp_path / "no_easy.txt"
    listing.write_text("11--Meeting/11_Meeting_Meeting_11_Meeting_Meeting_11_26.jpg\n")
    results, out = run_main(test_widerface, [
        "--weights", real_run["weights"], "--dataset_folder", real_run["sample"] / "images", "--image_list", listing,
        "--gt_dir", real_run["gt_dir"], "--save_folder", tmp_path / "out" / "predictions", "--quiet"])
    assert "0 image(s) predicted, 1 already done" in out
    assert "Easy   Val AP: n/a (none of the evaluated images has a face of this setting)" in out
    assert 0 < results["medium"] <= 1 and 0 < results["hard"] <= 1 and results["easy"] is None

    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")

    saved = json.loads((tmp_path / "out" / "results.json").read_text(), parse_constant=no_constants)
    assert saved["easy"] is None and saved["prediction"]["seconds_per_image"] is None
    assert saved["hard"] == results["hard"]
    png = cv2.imread(str(tmp_path / "out" / "pr_curves.png"))
    assert not (png == SETTING_COLORS["easy"]).all(axis=2).any()  # no easy curve
    assert (png == SETTING_COLORS["hard"]).all(axis=2).sum() > 100


# ---------------------------------------------------------------------------- comparison


def test_comparison_table_and_json(tmp_path):
    md, js = tmp_path / "cmp.md", tmp_path / "cmp.json"
    rows, out = run_main(test_v1_v2_comparison, ["--models", "v1", "v2", "--runs", "2", "--threads", "1",
                                                 "--output_md", md, "--output_json", js])
    assert "| Model | Config | Params | GFLOPs @640" in out and "| v2 (random init) | v2 | 256,156 |" in out
    assert md.read_text().strip() == out.strip()
    saved = json.loads(js.read_text())
    assert saved["settings"]["runs"] == 2 and saved["settings"]["threads"] == 1
    by_name = {row["config"]: row for row in saved["models"]}
    assert by_name["v1"]["parameters"] == 488_664 and by_name["v2"]["parameters"] == 256_156
    assert by_name["v1"]["gflops"] > by_name["v2"]["gflops"] > 0
    assert all(row["cpu_ms"] > 0 for row in saved["models"])


def test_comparison_table_shows_an_undefined_ap_as_na():
    # A subset without an easy face has easy AP None (n/a): the table prints it instead of failing.
    row = {"model": "a", "config": "v1", "parameters": 1, "gflops": 1.0, "cpu_ms": 2.0,
           "easy": None, "medium": 0.5, "hard": 0.25}
    table = test_v1_v2_comparison.markdown_table([row], 640, 1)
    assert table.splitlines()[-1] == "| a | v1 | 1 | 1.000 | 2.0 | n/a | 0.5000 | 0.2500 |"


def test_comparison_with_aps_reuses_widerface_run(tmp_path):
    sample, gt_dir = shared_path(*VAL_SAMPLE), shared_path("data", "widerface_val_gt")
    rows, out = run_main(test_v1_v2_comparison, [
        "--models", "v2", "v1_slim", "--runs", "1", "--input_size", "64", "--image_size", "128",
        "--dataset_folder", sample / "images", "--image_list", sample / "wider_subset.txt", "--gt_dir", gt_dir,
        "--save_root", tmp_path])
    assert "Easy AP" in out and "evaluated on 4 of 3226 val images" in out
    for row in rows:
        assert row["images_evaluated"] == 4 and all(0 <= row[s] <= 1 for s in SETTINGS)
    folder = tmp_path / "v2_random_init" / "predictions"
    assert len(prediction_files(folder)) == 4
    result, _, _ = evaluate_images(folder, gt_dir, (sample / "wider_subset.txt").read_text().split())
    assert result.to_dict() == {s: rows[0][s] for s in SETTINGS}


@pytest.mark.slow
def test_onnx_export_gives_the_same_aps(real_run, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (torch.onnx.export(dynamo=True))")
    from utils.checkpoint import load_model
    from utils.deploy.export import export_onnx

    model, _ = load_model(real_run["weights"])
    onnx_path = export_onnx(model, tmp_path / "v1_original.onnx", 640)
    sample = real_run["sample"]
    results, out = run_main(test_widerface, [
        "--weights", onnx_path, "--dataset_folder", sample / "images", "--image_list", sample / "wider_subset.txt",
        "--gt_dir", real_run["gt_dir"], "--save_folder", tmp_path / "out" / "predictions", "--quiet"])
    for setting in SETTINGS:
        assert results[setting] == pytest.approx(real_run["results"][setting], abs=1e-4)


# ------------------------------------------------------------------- bad input is refused up front


@pytest.mark.parametrize("argv", [["--confidence_threshold", "2"], ["--confidence_threshold", "nan"],
                                  ["--nms_threshold", "-0.1"], ["--threads", "-1"]])
def test_out_of_range_flags_are_usage_errors(argv, capsys):
    # A threshold above 1 wrote complete-looking 0-face files; NaN in the settings record refused every resume.
    with pytest.raises(SystemExit) as exit_info:
        test_widerface.get_args_parser().parse_args(["--weights", "w.pth", "--dataset_folder", "d", *argv])
    assert exit_info.value.code == 2
    assert f"argument {argv[0]}: expected" in capsys.readouterr().err


def test_threads_zero_means_the_library_default():
    parse = test_widerface.get_args_parser().parse_args
    assert parse(["--weights", "w.pth", "--dataset_folder", "d"]).threads == 0
    assert "0: the libraries' own choice" in " ".join(test_widerface.get_args_parser().format_help().split())
    with pytest.raises(SystemExit):
        test_v1_v2_comparison.get_args_parser().parse_args(["--models", "v1", "v2", "--threads", "0"])


def test_bad_output_paths_stop_before_the_model_loads(made_up, tmp_path, monkeypatch):
    monkeypatch.setattr(test_widerface, "build_detector", lambda *a, **k: pytest.fail("the model was loaded"))
    a_file, a_folder, gt = tmp_path / "a_file", tmp_path / "a_folder", tmp_path / "gt"  # gt: checked later
    a_file.write_text("keep me")
    a_folder.mkdir()
    cases = [([], a_file, "--save_folder .*a_file is a file; give a folder path"),
             (["--gt_dir", gt, "--results_json", a_folder], tmp_path / "p", "--results_json .*a_folder is a folder"),
             (["--gt_dir", gt, "--results_json", a_file / "r.json"], tmp_path / "p", "a_file is a file, not a folder"),
             (["--gt_dir", gt, "--pr_curve", a_file / "pr.png"], tmp_path / "p", "--pr_curve .*a_file is a file"),
             (["--gt_dir", gt, "--pr_curve", tmp_path / "pr.xyz"], tmp_path / "p", "use a .png file name")]
    for extra, save, message in cases:
        with pytest.raises(FeatherFaceError, match=message):
            run_main(test_widerface, made_up_args(made_up, save, *extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # no stray settings record
    assert a_file.read_text() == "keep me"


def test_comparison_checks_its_output_files_first(tmp_path, monkeypatch):
    monkeypatch.setattr(test_v1_v2_comparison, "load_entries", lambda args: pytest.fail("models were built"))
    with pytest.raises(FeatherFaceError, match="--output_json .* is a folder"):
        run_main(test_v1_v2_comparison, ["--models", "v1", "v2", "--output_json", tmp_path])


def test_settings_record_without_predictions_does_not_block_the_next_run(made_up, tmp_path):
    # A run that failed before its first image (e.g. --weights an exported *_postprocess.onnx) left only its record.
    save = tmp_path / "pred"
    (tmp_path / "pred_settings.json").write_text(json.dumps({"model": "sha256:other", "confidence_threshold": 0.9}))
    listing = tmp_path / "one.txt"
    listing.write_text("1--Sample/group_8.jpg\n")
    results, _ = run_main(test_widerface, made_up_args(made_up, save, "--image_list", listing))
    assert results["prediction"]["written"] == 1
    assert json.loads((tmp_path / "pred_settings.json").read_text())["model"] != "sha256:other"
    with pytest.raises(FeatherFaceError, match="other settings"):  # with predictions the record binds again
        run_main(test_widerface, made_up_args(made_up, save, "--image_list", listing, "--confidence_threshold", "0.5"))


def test_dangling_links_and_folders_named_like_images_are_reported_unreadable(made_up, tmp_path):
    event = tmp_path / "images" / "1--Ev"
    event.mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGES / "group_8.jpg", event / "a.jpg")
    (event / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    (event / "c.jpg").mkdir()
    assert list_images(tmp_path / "images") == ["1--Ev/a.jpg", "1--Ev/b.jpg", "1--Ev/c.jpg"]
    args = made_up_args(made_up, tmp_path / "pred")
    args[args.index("--dataset_folder") + 1] = tmp_path / "images"
    results, out = run_main(test_widerface, args)
    assert results["prediction"]["written"] == 1
    assert results["prediction"]["unreadable"] == ["1--Ev/b.jpg", "1--Ev/c.jpg"]
    assert "2 unreadable image(s)" in out and "1--Ev/b.jpg" in out and "1--Ev/c.jpg" in out


# --------------------------------------------------------------------- prediction folder names


def two_last_checkpoints(root: Path):
    """featherface_v1/last.pth and featherface_v2/last.pth, as two training runs write them (other weights)."""
    paths = []
    for seed, run in enumerate(["featherface_v1", "featherface_v2"]):
        torch.manual_seed(seed)
        paths.append(root / run / "last.pth")
        save_checkpoint(paths[-1], build_model("v2"))
    return paths


def test_weights_run_names_tell_common_weights_files_apart():
    names = ["weights/featherface_v1_original.pth", "weights/featherface_v1_original.onnx",
             "weights/featherface_v1/last.pth", "weights/featherface_v2/last.pth", "runs/v2/best.pth",
             "runs/v2/epoch_40.pth", "runs/v2/my_model.pt"]
    assert [weights_run_name(n) for n in names] == [
        "featherface_v1_original", "featherface_v1_original_onnx", "featherface_v1_last", "featherface_v2_last",
        "v2_best", "v2_epoch_40", "my_model_pt"]


def test_default_prediction_folders_of_two_last_pth_do_not_collide(made_up, tmp_path, monkeypatch):
    # Both used to go to runs/widerface/last/predictions, and the second run was refused.
    monkeypatch.chdir(tmp_path)
    two_last_checkpoints(Path("weights"))
    listing = tmp_path / "one.txt"
    listing.write_text("1--Sample/group_8.jpg\n")
    for run in ["featherface_v1", "featherface_v2"]:
        results, out = run_main(test_widerface, ["--weights", f"weights/{run}/last.pth", "--dataset_folder",
                                                 made_up[0], "--image_list", listing, "--image_size", "160", "--quiet"])
        assert results["prediction"]["written"] == 1
        assert f"-> {Path('runs', 'widerface', run + '_last', 'predictions')}" in out


def test_comparison_folders_follow_the_weights_not_their_order(tmp_path):
    sample, gt_dir = shared_path(*VAL_SAMPLE), shared_path("data", "widerface_val_gt")
    first, second = two_last_checkpoints(tmp_path)
    base = ["--runs", "1", "--input_size", "64", "--image_size", "128", "--dataset_folder", sample / "images",
            "--image_list", sample / "wider_subset.txt", "--gt_dir", gt_dir, "--save_root", tmp_path / "cmp", "--quiet"]
    rows, _ = run_main(test_v1_v2_comparison, ["--weights", first, second, *base])
    assert [row["model"] for row in rows] == ["featherface_v1_last", "featherface_v2_last"]
    rows, out = run_main(test_v1_v2_comparison, ["--weights", second, first, *base])  # was refused (last_#1)
    assert out.count("0 image(s) predicted, 4 already done") == 2
    assert [row["model"] for row in rows] == ["featherface_v2_last", "featherface_v1_last"]
    # Other settings are refused naming this script's own flag (it has no --save_folder).
    with pytest.raises(FeatherFaceError, match="pass --overwrite to redo them or choose another --save_root$"):
        run_main(test_v1_v2_comparison, ["--weights", first, *base, "--models", "v2", "--confidence_threshold", "0.5"])


def test_comparison_names_only_different_files_of_one_name_apart(tmp_path):
    first, second = two_last_checkpoints(tmp_path)
    other = tmp_path / "elsewhere" / "featherface_v1" / "last.pth"
    other.parent.mkdir(parents=True)
    shutil.copy(second, other)  # same name as `first`, other weights
    args = test_v1_v2_comparison.get_args_parser().parse_args([str(p) for p in ["--weights", first, other, first]])
    labels = [label for label, _, _ in test_v1_v2_comparison.load_entries(args)]
    assert labels[0] == labels[2] != labels[1]  # the same file twice is the same model: one folder
    assert all(label.startswith("featherface_v1_last_") for label in labels)
