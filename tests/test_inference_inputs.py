"""Bad input to the inference path (FaceDetector, detect.py, run_cli) gets one clear error and
loses nothing: settings out of range, unusable devices, image dtypes and shapes, ONNX graphs
that are not raw-output exports, output paths, folders with broken entries, failed runs."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.config import get_config
from models import build_model
from tests.conftest import ROOT, shared_path
from utils.errors import FeatherFaceError, run_cli
from utils.inference.detector import ONNX_CONFIG_KEY, FaceDetector, OnnxBackend, as_bgr

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = ROOT / "data" / "sample" / "images"
MISSING = ROOT / "missing_weights.pth"  # settings are checked before the weights are read


@pytest.fixture(scope="module")
def group_8() -> np.ndarray:
    return cv2.imread(str(SAMPLE / "group_8.jpg"))


@pytest.fixture(scope="module")
def detector(real_checkpoint) -> FaceDetector:
    return FaceDetector(real_checkpoint)


# ---------------------------------------------------------------------------- FaceDetector settings


@pytest.mark.parametrize("kwargs, message", [
    ({"conf": 2.0}, "conf_threshold must be a number from 0 to 1"),
    ({"conf": float("nan")}, "conf_threshold must be"),
    ({"conf": -1.0}, "conf_threshold must be"),
    ({"nms": -1.0}, "nms_threshold must be"),
    ({"nms": 5.0}, "nms_threshold must be"),
    ({"keep_top_k": -1}, "keep_top_k must be None or an integer >= 0"),
    ({"top_k": -5}, "top_k must be"),
    ({"fixed_size": (0, 0)}, "fixed_size must be"),
    ({"fixed_size": (-5, 640)}, "fixed_size must be"),
    ({"fixed_size": (640,)}, "fixed_size must be"),
    ({"fixed_size": 640}, "fixed_size must be"),
])
def test_detector_refuses_bad_settings_before_loading(kwargs, message):
    with pytest.raises(FeatherFaceError, match=message):
        FaceDetector(MISSING, **kwargs)


def test_top_k_0_means_no_limit(detector, real_checkpoint, group_8):
    """As test_widerface.py's --top_k 0 / --keep_top_k 0; the API used to return no face."""
    unlimited = FaceDetector(real_checkpoint, top_k=0, keep_top_k=0)
    assert unlimited.top_k is None and unlimited.keep_top_k is None
    np.testing.assert_array_equal(unlimited.detect_array(group_8), detector.detect_array(group_8))
    assert len(unlimited.detect(group_8)) == 8


@pytest.mark.parametrize("device", ["foo", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_unusable_torch_device_is_one_sentence(device):
    with pytest.raises(FeatherFaceError, match=f"torch device '{device}'") as info:
        FaceDetector(build_model("v2"), device=device)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------- image arrays


def test_uint16_is_scaled_to_8_bits(detector, group_8):
    """cv2.imread(..., IMREAD_UNCHANGED) of a 16-bit PNG: used to give 178 false faces at score 1."""
    wide = (group_8.astype(np.uint16) << 8) | 0x7F
    np.testing.assert_array_equal(as_bgr(wide), group_8)
    np.testing.assert_array_equal(detector.detect_array(wide), detector.detect_array(group_8))


def test_bgra_loses_its_alpha(detector, group_8):
    bgra = cv2.cvtColor(group_8, cv2.COLOR_BGR2BGRA)
    np.testing.assert_array_equal(detector.detect_array(bgra), detector.detect_array(group_8))


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.int8), "got dtype int8"),
    (np.zeros((32, 32, 3), bool), "got dtype bool"),
    (np.zeros((32, 32, 3), np.float16), "got dtype float16"),
    (np.zeros((0, 0, 3), np.uint8), "the image is empty"),
    (np.zeros((0, 0), np.uint8), "the image is empty"),
    (np.zeros((32, 32, 2), np.uint8), "HxWx3"),
])
def test_refused_images(image, message):
    with pytest.raises(FeatherFaceError, match=message):
        as_bgr(image)


def test_boxes_are_documented_as_not_clipped():
    assert "not clipped" in FaceDetector.detect.__doc__


# -------------------------------------------------------------------------------------- ONNX


def onnx_graph(path: Path, inputs, outputs, metadata: bool = True) -> Path:
    """A graph with the given (name, shape) inputs and outputs (each output a Reshape of the first
    input); with FeatherFace's config in its metadata when `metadata`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, shapes = [], []
    for i, (name, shape) in enumerate(outputs):
        target = [0, -1, shape[-1]] if len(shape) == 3 else [-1, shape[-1]]
        shapes.append(numpy_helper.from_array(np.asarray(target, np.int64), f"shape{i}"))
        nodes.append(helper.make_node("Reshape", [inputs[0][0], f"shape{i}"], [name]))
    value = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value(*i) for i in inputs], [value(*o) for o in outputs], shapes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(model, {ONNX_CONFIG_KEY: json.dumps(get_config("v2").to_dict())})
    onnx.save(model, str(path))
    return path


RAW_OUTPUTS = [("bbox_regressions", ["B", "N", 4]), ("classifications", ["B", "N", 2]),
               ("landmarks", ["B", "N", 10])]


def test_onnx_backend_takes_only_raw_output_graphs(tmp_path):
    pytest.importorskip("onnxruntime")
    raw = onnx_graph(tmp_path / "raw.onnx", [("input", ["B", 3, "H", "W"])], RAW_OUTPUTS)
    assert OnnxBackend(raw).config == get_config("v2")
    # The exporter's detection graph (as *_postprocess.onnx): used to fail at the first image with
    # "ValueError: Required inputs (['score_threshold']) are missing".
    detection = onnx_graph(tmp_path / "m_postprocess.onnx", [("input", [1, 3, "H", "W"]), ("score_threshold", [])],
                           [("faces", ["K", 15])])
    with pytest.raises(FeatherFaceError, match="is not a FeatherFace raw-output export: expected inputs "
                                               r"input \(rank 4\) and outputs bbox_regressions") as info:
        FaceDetector(detection)
    assert "score_threshold (rank 0)" in str(info.value) and "faces (rank 2)" in str(info.value)
    # RetinaFace-style names (loc, conf, landmarks) are refused too.
    retina = onnx_graph(tmp_path / "retina.onnx", [("input", ["B", 3, "H", "W"])],
                        [("loc", ["B", "N", 4]), ("conf", ["B", "N", 2]), ("landmarks", ["B", "N", 10])])
    with pytest.raises(FeatherFaceError, match="not a FeatherFace raw-output export"):
        OnnxBackend(retina)


def test_onnx_backend_refuses_the_retinaface_baseline():
    pytest.importorskip("onnxruntime")
    with pytest.raises(FeatherFaceError, match="not a FeatherFace raw-output export.*got inputs input"):
        OnnxBackend(shared_path("weights", "retinaface_mnet025.onnx"))


# ------------------------------------------------------------------------------ run_cli, detect.py


@pytest.mark.parametrize("error", [FileExistsError(17, "File exists", "/data/out"),
                                   NotADirectoryError(20, "Not a directory", "/data/out"),
                                   IsADirectoryError(21, "Is a directory", "/data/out"),
                                   PermissionError(13, "Permission denied", "/data/out"),
                                   FileNotFoundError(2, "No such file or directory", "/data/out")])
def test_run_cli_turns_path_errors_into_one_line(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {error.strerror}: /data/out\n"


def test_run_cli_still_exits_130_on_ctrl_c():
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 130


@pytest.mark.parametrize("flag, value", [("--conf", "2"), ("--conf", "nan"), ("--conf", "-1"), ("--nms", "-1"),
                                         ("--nms", "5"), ("--threads", "-1")])
def test_detect_refuses_out_of_range_flags(flag, value, capsys):
    import detect

    with pytest.raises(SystemExit) as exit_info:
        detect.get_args_parser().parse_args(["--input", "x.jpg", flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert detect.get_args_parser().parse_args(["--input", "x.jpg", "--threads", "0"]).threads == 0


def run_detect(*argv: str) -> int:
    """detect.py's exit status for `argv` (run in-process through run_cli)."""
    import detect

    try:
        return run_cli(detect.main, detect.get_args_parser().parse_args([*argv, "--quiet", "--image_size", "384"]))
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if detect.py loads the model."""
    import detect

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(detect, "FaceDetector", refuse)


def test_detect_output_path_problems_stop_before_the_model(tmp_path, no_model, capsys):
    (tmp_path / "file").write_text("keep me")
    image = str(SAMPLE / "group_8.jpg")
    assert run_detect("--input", image, "--output", str(tmp_path / "file")) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output {tmp_path / 'file'} is a file; give a folder path\n"
    assert run_detect("--input", image, "--output", str(tmp_path / "file" / "sub")) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep me"


def test_detect_with_no_inputs_touches_nothing(tmp_path, no_model, capsys):
    (tmp_path / "empty").mkdir()
    assert run_detect("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")) == 2
    assert "no image or video files in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "y.jpg").mkdir()
    (tmp_path / "broken" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert run_detect("--input", str(tmp_path / "broken"), "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "gone.png: broken symbolic link" in err and "y.jpg: a folder, not a file" in err
    assert not (tmp_path / "out").exists()


def big_png_header(width: int, height: int) -> bytes:
    """A PNG (with IEND) whose header claims more pixels than OpenCV decodes: cv2.error."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


def test_detect_folder_records_bad_entries_and_keeps_going(real_checkpoint, tmp_path):
    """A bomb-sized PNG used to abort the run with a cv2.error traceback and no detections.json;
    broken links and folders named like images used to be skipped silently."""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    (folder / "group_8.jpg").write_bytes((SAMPLE / "group_8.jpg").read_bytes())
    (folder / "bomb.png").write_bytes(big_png_header(100_000, 100_000))
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "y.jpg").mkdir()
    assert run_detect("--weights", str(real_checkpoint), "--input", str(folder), "--output", str(out)) == 0
    report = json.loads((out / "detections.json").read_text())
    assert [Path(r["file"]).name for r in report["images"]] == ["group_8.jpg"]
    errors = {Path(e["file"]).name: e["error"] for e in report["errors"]}
    assert set(errors) == {"bomb.png", "gone.jpg", "y.jpg"}
    assert errors["bomb.png"].startswith("image cannot be decoded (OpenCV refused it")
    assert errors["gone.jpg"].startswith("broken symbolic link") and errors["y.jpg"] == "a folder, not a file"


def test_failed_run_keeps_the_earlier_report(real_checkpoint, tmp_path, capsys):
    out = tmp_path / "od_keep"
    assert run_detect("--weights", str(real_checkpoint), "--input", str(SAMPLE / "group_8.jpg"),
                      "--output", str(out)) == 0
    good = (out / "detections.json").read_text()
    (tmp_path / "zero_byte.jpg").write_bytes(b"")
    assert run_detect("--weights", str(real_checkpoint), "--input", str(tmp_path / "zero_byte.jpg"),
                      "--output", str(out)) == 2
    assert f"(the earlier {out / 'detections.json'} is kept)" in capsys.readouterr().err
    assert (out / "detections.json").read_text() == good
