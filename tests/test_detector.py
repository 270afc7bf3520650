"""FaceDetector (the one inference path) and batch-norm folding: folded models equal the
originals, the real model finds the published faces, batches equal single images, and the
ONNX Runtime backend returns the same faces as PyTorch."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from data.config import get_config
from data.preprocess import letterbox, preprocess
from models import build_model
from tests.conftest import ROOT, randomise
from tests.test_convert_official import GOLDEN_GROUP_8
from utils.inference.detector import Face, FaceDetector, OnnxBackend, TorchBackend, backend_for, ort_session_options
from utils.errors import FeatherFaceError
from utils.deploy.fuse import count_batchnorms, fold_conv_bn, fuse_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = ROOT / "data" / "sample" / "images"
FOLD_TOL = 1e-4


def max_output_diff(a, b, x: torch.Tensor) -> float:
    """Max |a(x) - b(x)| over the three outputs; a, b are models or backends."""
    with torch.inference_mode():
        return max(float((p - q).abs().max()) for p, q in zip(a(x), b(x)))






@pytest.fixture(scope="module")
def group_8() -> np.ndarray:
    return cv2.imread(str(SAMPLE / "group_8.jpg"))


# ----------------------------------------------------------------------------------- folding


def test_fold_conv_bn_with_bias_and_groups():
    conv = nn.Conv2d(8, 6, 3, 2, 1, groups=2, bias=True)
    bn = randomise(nn.Sequential(nn.BatchNorm2d(6)))[0]
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        assert torch.allclose(fold_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)


@pytest.mark.parametrize("name", ["v1", "v1_original", "v1_slim", "v2"])
def test_fuse_batchnorm_keeps_outputs(name):
    torch.manual_seed(0)
    model = randomise(build_model(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_batchnorm(model)
    assert count_batchnorms(model) > 0 and count_batchnorms(fused) == 0  # every BN folded
    x = torch.randn(2, 3, 72, 96) * 60
    assert max_output_diff(model, fused, x) < FOLD_TOL
    assert max_output_diff(model, TorchBackend(model), x) < FOLD_TOL  # folded + channels-last
    # The input model is untouched (the detector folds a copy).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fuse_batchnorm_real_model(real_checkpoint, group_8):
    from utils.checkpoint import load_model

    model, _ = load_model(real_checkpoint)
    x = preprocess(group_8, 0.5).unsqueeze(0)
    assert max_output_diff(model, fuse_batchnorm(model), x) < FOLD_TOL
    fast = TorchBackend(model)  # what FaceDetector runs: folded, channels-last on CPU
    assert fast.memory_format == torch.channels_last
    assert max_output_diff(model, fast, x) < FOLD_TOL


# ------------------------------------------------------------------------------ FaceDetector


def test_detector_finds_the_published_faces(real_checkpoint, group_8):
    """The fast default and the plain model both give the published code's detections."""
    golden = np.asarray(GOLDEN_GROUP_8, dtype=np.float32)
    for fast in (True, False):
        faces = FaceDetector(real_checkpoint, conf=0.02, fuse=fast, channels_last=fast).detect(group_8)
        assert len(faces) == 8 and all(isinstance(f, Face) for f in faces)
        rows = np.asarray([[*f.box, f.score, *np.ravel(f.landmarks)] for f in faces], dtype=np.float32)
        np.testing.assert_allclose(rows[:, 4], golden[:, 4], atol=1e-5)
        np.testing.assert_allclose(np.delete(rows, 4, 1), np.delete(golden, 4, 1), atol=5e-3)


def test_detect_batch_equals_detect(real_checkpoint, group_8):
    crowd = cv2.imread(str(SAMPLE / "crowd_27.jpg"))
    images = [group_8, crowd, cv2.flip(group_8, 1)]  # two network-input sizes
    detector = FaceDetector(real_checkpoint, image_size=256, conf=0.3)
    batch = detector.detect_batch(images)
    assert [len(faces) for faces in batch] == [len(detector.detect(im)) for im in images]
    for image, faces in zip(images, batch):
        single = detector.detect(image)
        np.testing.assert_allclose([f.box for f in faces], [f.box for f in single], atol=1e-3)
        np.testing.assert_allclose([f.score for f in faces], [f.score for f in single], atol=1e-5)
    assert len(batch[0]) == 8  # all eight faces survive the resize to 256 px


def test_detector_rejects_bad_input():
    detector = FaceDetector(build_model("v2"))
    assert detector.detect_arrays([]) == []
    with pytest.raises(FeatherFaceError, match="expected an image array"):
        detector.detect(None)
    with pytest.raises(FeatherFaceError, match="HxWx3"):
        detector.detect(np.zeros((32, 32, 2), np.uint8))  # BGRA (HxWx4) loses its alpha: test_inference_inputs.py
    with pytest.raises(FeatherFaceError, match="unknown backend"):
        FaceDetector(build_model("v2"), backend="tflite")
    with pytest.raises(FeatherFaceError, match="not found"):
        FaceDetector(ROOT / "missing.onnx", backend="auto")
    assert backend_for("a/b.ONNX") == "onnx" and backend_for("a/b.pth") == "torch"


def test_detector_takes_grayscale_and_refuses_0_to_1_floats(real_checkpoint, group_8):
    detector = FaceDetector(real_checkpoint, conf=0.5)
    gray = cv2.cvtColor(group_8, cv2.COLOR_BGR2GRAY)
    expected = detector.detect_array(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    assert len(expected) >= 6  # the eight faces are still found in gray
    np.testing.assert_array_equal(detector.detect_array(gray), expected)  # (H, W), as detect.py reads gray files
    np.testing.assert_array_equal(detector.detect_array(gray[:, :, None]), expected)
    np.testing.assert_allclose(detector.detect_array(group_8.astype(np.float32)), detector.detect_array(group_8),
                               atol=1e-4)  # a float image with 0-255 values is fine
    with pytest.raises(FeatherFaceError, match="all values <= 1.*0-255"):
        detector.detect(group_8.astype(np.float32) / 255)  # would otherwise find no face, silently


@pytest.mark.parametrize("shape, size", [((60, 100), (32, 48)), ((100, 60), (32, 48)), ((10, 10), (32, 48))])
def test_letterbox_fits_the_image_and_pads_with_zeros(shape, size):
    """For graphs of fixed input size: the largest scale that fits, padding bottom/right, 0 after mean removal."""
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    tensor, scale = letterbox(image, size)
    assert tensor.shape == (3, *size)
    assert scale == pytest.approx(min(size[0] / shape[0], size[1] / shape[1]))
    h, w = round(shape[0] * scale), round(shape[1] * scale)
    assert (h == size[0]) or (w == size[1])  # one side fills the input
    torch.testing.assert_close(tensor[:, :h, :w], preprocess(image, scale))
    assert not tensor[:, h:].any() and not tensor[:, :, w:].any()


def test_face_to_dict_is_json_ready():
    face = Face.from_row(np.arange(15, dtype=np.float32) / 7)
    d = face.to_dict()
    assert len(d["box"]) == 4 and len(d["landmarks"]) == 5 and d["score"] == round(4 / 7, 5)


# --------------------------------------------------------------------------------------- ONNX


class TinyDetector(nn.Module):
    """A stand-in with FeatherFace's I/O contract (stride 8/16/32 cells, 2 anchors) that
    exports in seconds: checks the ONNX plumbing, not the network."""

    def __init__(self) -> None:
        super().__init__()
        self.config = get_config("v2")
        self.convs = nn.ModuleList(nn.Conv2d(3, 32, s, s) for s in self.config.steps)

    def forward(self, x: torch.Tensor):
        outs = []
        for conv, s in zip(self.convs, self.config.steps):
            # pad to whole cells so every level has ceil(H/s) x ceil(W/s) positions
            f = conv(nn.functional.pad(x, [0, (-x.shape[3]) % s, 0, (-x.shape[2]) % s]) / 64)
            outs.append(f.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 16))
        out = torch.cat(outs, 1)
        return out[..., :4], out[..., 4:6].softmax(-1), out[..., 6:]


def export_or_skip(model: nn.Module, path, image_size: int = 64):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (torch.onnx.export(dynamo=True))")
    pytest.importorskip("onnxruntime")
    from utils.deploy.export import export_onnx

    return export_onnx(model.eval(), path, image_size=image_size)


def assert_same_detections(a: np.ndarray, b: np.ndarray, coord_tol: float, score_tol: float = 1e-4):
    assert a.shape == b.shape
    np.testing.assert_allclose(a[:, 4], b[:, 4], atol=score_tol)
    np.testing.assert_allclose(np.delete(a, 4, 1), np.delete(b, 4, 1), atol=coord_tol)


def test_onnx_backend_matches_torch_tiny(tmp_path, group_8):
    torch.manual_seed(0)
    model = TinyDetector().eval()
    path = export_or_skip(model, tmp_path / "tiny.onnx")
    images = [group_8[:301, :437], group_8[:301, :437][::-1].copy(), group_8[:200, :250]]
    torch_det = FaceDetector(model, conf=0.3)
    onnx_det = FaceDetector(path, conf=0.3, threads=1)  # the default backend picks ONNX Runtime for .onnx
    assert isinstance(onnx_det.backend, OnnxBackend) and isinstance(torch_det.backend, TorchBackend)
    assert onnx_det.config == model.config
    for a, b in zip(torch_det.detect_arrays(images), onnx_det.detect_arrays(images)):
        assert len(a) > 0
        assert_same_detections(a, b, coord_tol=1e-3)


@pytest.mark.slow
def test_onnx_backend_matches_torch_real(real_checkpoint, group_8, tmp_path):
    from utils.checkpoint import load_model

    model, _ = load_model(real_checkpoint)
    path = export_or_skip(model, tmp_path / "v1_original.onnx", image_size=320)
    torch_det, onnx_det = FaceDetector(real_checkpoint), FaceDetector(path, backend="auto")
    crowd = cv2.imread(str(SAMPLE / "crowd_27.jpg"))
    a, b = torch_det.detect_array(group_8), onnx_det.detect_array(group_8)  # own size, 768x1024
    assert len(a) == 8
    assert_same_detections(a, b, coord_tol=1e-2)
    for det in (torch_det, onnx_det):
        det.image_size = 320
    for a, b in zip(torch_det.detect_arrays([group_8, crowd]), onnx_det.detect_arrays([group_8, crowd])):
        assert_same_detections(a, b, coord_tol=1e-2)


def test_onnx_sessions_stop_spinning_after_each_run():
    """Idle ORT workers must not keep spinning after a run: they would slow the decode/NMS that
    follows and any other runtime in the process (benchmark.py's comparisons)."""
    options = ort_session_options(3)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert ort_session_options().intra_op_num_threads == 0  # ORT's own default
