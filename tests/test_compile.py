"""torch.compile'd inference: FaceDetector(compile=True), detect.py --compile and benchmark.py's
`compiled` backend. Compiling takes 15-65 s per model and input size on the 2-core CPU, so all
but the dispatch test are slow."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torchvision

import models.deform_conv as dc
from tests.conftest import ROOT, randomise

SAMPLE = ROOT / "data" / "sample" / "images"
FRAME = (320, 240)  # every compiled test below runs at this size, so inductor's disk cache is shared


def test_compiled_inference_takes_the_fast_deformable_path(monkeypatch):
    """Compiling without autograd traces the fast CPU path (plain tensor ops inductor can fuse);
    compiled training and every exporter keep torchvision's registered op."""
    x = torch.zeros(1, 2, 4, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert dc._uses_fast("auto", x)
        assert not dc._uses_fast("torchvision", x)
    with torch.enable_grad():
        assert not dc._uses_fast("auto", x)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with torch.no_grad():
        assert not dc._uses_fast("auto", x)


def frame() -> np.ndarray:
    return cv2.resize(cv2.imread(str(SAMPLE / "group_8.jpg")), FRAME)


@pytest.mark.slow
def test_compiled_detector_matches_the_plain_one(real_checkpoint, monkeypatch):
    from data.preprocess import preprocess
    from torch._dynamo.utils import counters
    from utils.inference.detector import FaceDetector

    def no_torchvision(*args, **kwargs):
        raise AssertionError("compiled inference must not run torchvision's deform_conv2d")

    image = frame()
    plain = FaceDetector(real_checkpoint)
    compiled = FaceDetector(real_checkpoint, compile=True)
    monkeypatch.setattr(torchvision.ops, "deform_conv2d", no_torchvision)
    x = preprocess(image, 1.0)[None]
    (loc, conf, landm), (c_loc, c_conf, c_landm) = plain.backend(x), compiled.backend(x)
    assert float((conf - c_conf).abs().max()) < 1e-4
    assert float((loc - c_loc).abs().max()) < 1e-3 and float((landm - c_landm).abs().max()) < 1e-3
    graphs = counters["stats"]["unique_graphs"]
    faces, c_faces = plain.detect_array(image), compiled.detect_array(image)  # same size: no recompile
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(faces) >= 6 and faces.shape == c_faces.shape
    np.testing.assert_allclose(c_faces, faces, atol=1e-2)


@pytest.mark.slow
def test_compiled_v1_at_an_odd_size_and_batch_3():
    from models import build_model
    from utils.inference.detector import TorchBackend

    model = randomise(build_model("v1"), seed=3)
    x = torch.randn(3, 3, 97, 131, generator=torch.Generator().manual_seed(0)) * 50
    plain = TorchBackend(model)(x)
    compiled = TorchBackend(model, compile=True)(x)
    for name, a, b, tol in zip(("boxes", "scores", "landmarks"), plain, compiled, (1e-3, 1e-4, 1e-3)):
        assert a.shape == b.shape and float((a - b).abs().max()) < tol, name


@pytest.mark.slow
def test_detect_compile_on_a_video(real_checkpoint, tmp_path):
    import detect

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, FRAME)
    for i in range(3):
        writer.write(frame() if i != 1 else cv2.flip(frame(), 1))
    writer.release()
    results = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"out{len(extra)}"
        args = detect.get_args_parser().parse_args(["--weights", str(real_checkpoint), "--input", str(video),
                                                    "--output", str(out), "--quiet", *extra])
        assert detect.main(args) == 0
        (result,) = json.loads((out / "detections.json").read_text())["videos"]
        results.append(result["frames"])
    plain, compiled = results
    assert [len(f["faces"]) for f in compiled] == [len(f["faces"]) for f in plain] and len(plain[0]["faces"]) >= 6
    for a, b in zip(plain, compiled):
        boxes = lambda faces: np.array([f["box"] for f in faces])  # noqa: E731
        np.testing.assert_allclose(boxes(b["faces"]), boxes(a["faces"]), atol=0.02)


@pytest.mark.slow
def test_compile_failure_is_one_clear_error(tmp_path, monkeypatch):
    import torch._inductor.config
    from models import build_model
    from utils.errors import FeatherFaceError
    from utils.inference.detector import TorchBackend

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached: it must compile
    backend = TorchBackend(build_model("v2"), compile=True)
    with torch._inductor.config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),), "fx_graph_cache": False}):
        with pytest.raises(FeatherFaceError, match="torch.compile failed .*C\\+\\+ compiler"):
            backend(torch.zeros(1, 3, 64, 96))


@pytest.mark.slow
def test_benchmark_compiled_backend(tmp_path):
    import benchmark

    out = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args(["--models", "v2", "--backends", "compiled", "torch", "--quick",
                                                   "--json", str(out), "--quiet"])
    benchmark.main(args)
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"compiled", "torch"} and rows["compiled"]["median_ms"] > 0
