"""ONNX deployment: dynamic-shape export (V1 with live DeformConv, V2), ORT/PyTorch parity, the
detection graph (decode + NMS inside) against the PyTorch pipeline, the deployment package run
as shipped, INT8 quantization and the export script's errors.

Exports take 20-40 s each on two cores, so each model is exported once per module and shared.
Random-init networks have vanishing activations (BatchNorm running stats at their defaults), which
would make any parity check trivially pass; `realistic` re-estimates the BN statistics on an image
(with a variance floor, so the network stays well conditioned), spreads the face scores and gives
the deformable convs non-zero offsets, so every op carries signal.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from data.config import ModelConfig
from data.preprocess import preprocess
from layers.prior_box import prior_boxes
from models import build_model
from models.deform_conv import DeformableConv2d
from tests.conftest import ROOT, shared_path
from utils.checkpoint import load_model, save_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

import export_dynamic_onnx as script  # noqa: E402
from utils.deploy.export import (CONFIG_KEY, DETECTION_KEY, ExportError, check_onnx_file,
                                 check_opset, export_graphs, export_onnx, fixed_input_size, op_counts, ort_session,
                                 pixel_priors, read_metadata)
from utils.deploy.package import write_deployment_package
from utils.deploy.parity import (TOLERANCES, check_detection_parity, check_parity, compare_detections,
                                 detection_graph_ok, format_parity, run_detection_graph)
from utils.deploy.quantize import detection_drift, find_images, fixed_size_input, quantize_int8  # noqa: E402
from utils.inference.detector import FaceDetector  # noqa: E402
from utils.inference.postprocess import DEMO_POSTPROCESS  # noqa: E402
from utils.errors import FeatherFaceError, run_cli  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "images"
GROUP = SAMPLE / "group_8.jpg"
# A random-init V2 with re-estimated BN finds ~90 "faces" above this on group_8.jpg: enough to
# exercise decode, threshold and NMS, few enough for ties between scores to be impossible.
RANDOM_THRESHOLD = 0.88
VAR_FLOOR = 0.1
SCORE_SPREAD = 2.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread here: with other jobs on the two cores, two busy-waiting OpenMP
    threads made single forward passes take 10 s instead of 0.1 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def needs_exporter():
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs the onnxscript package")


def realistic(name: str, seed: int = 0) -> torch.nn.Module:
    """Random-init model whose activations look like a trained one's (see module docstring)."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DeformableConv2d):  # offsets of about a pixel, masks around 1
                module.offset_conv.weight.normal_(0, 0.02)
                module.offset_conv.bias.normal_(0, 0.7)
                module.modulator_conv.weight.normal_(0, 0.02)
                module.modulator_conv.bias.normal_(0, 0.5)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # cumulative average over the calibration pass
        # One natural image and one of the uniform-noise inputs check_parity uses.
        image = torch.nn.functional.interpolate(preprocess(cv2.imread(str(GROUP)))[None], size=(128, 160),
                                                mode="bilinear")
        noise = torch.rand(1, 3, 128, 160) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
        model.train()
        model(torch.cat([image, noise]))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                # A channel that barely varied in the calibration batch would get a huge gain
                # and make the network amplify float32 rounding beyond any parity tolerance.
                module.running_var.clamp_(min=VAR_FLOOR)
        for conv in model.class_head.convs:  # spread the face scores: distinct values for NMS
            conv.weight.mul_(SCORE_SPREAD)
    return model.eval()


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    needs_exporter()
    model = realistic("v1")
    path = export_onnx(model, tmp_path_factory.mktemp("v1") / "v1.onnx", image_size=256)
    return model, path


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    needs_exporter()
    model = realistic("v2", seed=1)
    folder = tmp_path_factory.mktemp("v2")
    raw, detection = export_graphs(model, folder / "v2.onnx", folder / "v2_postprocess.onnx", image_size=256)
    return model, raw, detection


@pytest.fixture(scope="module")
def v2_package(v2, tmp_path_factory):
    model, raw, detection = v2
    return write_deployment_package(model, tmp_path_factory.mktemp("pkg") / "v2_package", raw, detection,
                                       score_threshold=RANDOM_THRESHOLD)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


SHAPES = [(1, 256, 256), (2, 256, 256), (1, 375, 500), (2, 192, 320)]  # 3 sizes, batches 1 and 2


def test_v1_dynamic_shapes_match_pytorch_with_live_deformconv(v1):
    model, path = v1
    check_onnx_file(path)
    assert op_counts(path).get("DeformConv") == 15  # 5 per SSH x 3 levels, none replaced by Conv
    # The 6 narrowing (projected) layers sample taps made by a MatMul, which ORT keeps out of its blocked
    # layout (a 1x1 Conv there would need its 234-channel output reordered); the other 9 read the map.
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str:
        node = producer.get(name)
        while node is not None and node.op_type == "Reshape":
            node = producer.get(node.input[0])
        return node.op_type if node is not None else name

    sources = Counter(source(n.input[0]) for n in graph.node if n.op_type == "DeformConv")
    assert sources["MatMul"] == 6 and "Conv" not in sources, sources
    rows = check_parity(model, path, SHAPES)
    assert [r.shape for r in rows] == SHAPES
    assert all(r.ok for r in rows), format_parity(rows)
    # The offsets matter: zeroing them changes the outputs far beyond the parity tolerance.
    x = torch.rand(1, 3, 256, 256) * 255 - 117
    zeroed = realistic("v1")
    with torch.no_grad():
        for module in zeroed.modules():
            if isinstance(module, DeformableConv2d):
                module.offset_conv.weight.zero_(), module.offset_conv.bias.zero_()
        assert (model(x)[0] - zeroed(x)[0]).abs().max() > 100 * TOLERANCES["bbox_regressions"]


def test_v2_dynamic_shapes_match_pytorch(v2):
    model, raw, _ = v2
    check_onnx_file(raw)
    assert "DeformConv" not in op_counts(raw)
    rows = check_parity(model, raw, SHAPES)
    assert all(r.ok for r in rows), format_parity(rows)


@pytest.mark.slow  # 45 s: an opt-in form; tests/test_rewrites.py checks its PyTorch side in the default run
def test_padded_stem_export_matches_pytorch(tmp_path):
    """--pad_stem: the stem's convs are 16 channels wide in the graph, ORT agrees with the model."""
    needs_exporter()
    model = realistic("v2", seed=4)
    path = export_onnx(model, tmp_path / "v2_padded.onnx", image_size=128, stem_padded=True)
    graph = onnx.load(str(path)).graph
    weights = {t.name: tuple(t.dims) for t in graph.initializer}
    first = [n for n in graph.node if n.op_type == "Conv" and n.input[0] == "input"]
    assert len(first) == 1 and weights[first[0].input[1]] == (16, 3, 3, 3)
    assert json.loads(read_metadata(path)["featherface_graph_form"])["stem_channels"] == 16
    rows = check_parity(model, path, [(1, 128, 128), (2, 97, 131)])
    assert all(r.ok for r in rows), format_parity(rows)


@pytest.mark.slow  # 30 s: an opt-in export form (--static_size)
def test_static_size_export_is_fixed_and_letterboxed_everywhere(tmp_path):
    """--static_size: H and W fixed (the batch dynamic), up-sampling as scale-2 Resize, ORT equal to the
    model; FaceDetector, the detection graph's check and the package's usage example letterbox each
    photo into the fixed size and map the faces back to its pixels."""
    needs_exporter()
    model = realistic("v2", seed=5)
    raw, detection = export_graphs(model, tmp_path / "v2_128.onnx", tmp_path / "v2_128_postprocess.onnx",
                                   image_size=128, static_size=True)
    graph = onnx.load(str(raw)).graph
    assert dims(graph.input[0]) == ["batch", 3, 128, 128]
    assert dims(onnx.load(str(detection)).graph.input[0]) == [1, 3, 128, 128]
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 4 and all(len(n.input) == 3 and n.input[2] for n in resizes)  # scales, no sizes
    assert json.loads(read_metadata(raw)["featherface_graph_form"])["input_size"] == [128, 128]
    assert fixed_input_size(raw) == (128, 128) and fixed_input_size(tmp_path / "v2_128.onnx") == (128, 128)
    rows = check_parity(model, raw, [(1, 128, 128), (3, 128, 128)])
    assert all(r.ok for r in rows), format_parity(rows)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        ort_session(raw).run(None, {"input": np.zeros((1, 3, 96, 96), np.float32)})

    image = cv2.imread(str(GROUP))  # landscape: letterboxed with padding at the bottom
    detector = FaceDetector(raw, backend="onnx", conf=0.7)  # 16 faces here
    assert detector.fixed_size == (128, 128)
    faces = detector.detect_array(image)
    # The same by hand: resize to fit (float32 pixels, as data.preprocess does), pad with the mean colour
    # (0 after mean removal), run the model.
    scale = min(128 / image.shape[0], 128 / image.shape[1])
    small = cv2.resize(image.astype(np.float32), None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    canvas = np.empty((128, 128, 3), np.float32)
    canvas[:] = (104, 117, 123)
    canvas[: small.shape[0], : small.shape[1]] = small
    expected = FaceDetector(model, backend="torch", conf=0.7).detect_array(canvas, scale=1.0)
    expected[:, [0, 1, 2, 3, *range(5, 15)]] /= scale
    diff = compare_detections("group_8 letterboxed", expected, faces)
    assert len(expected) > 5 and detection_graph_ok(diff), diff.line()
    with pytest.raises(FeatherFaceError, match="one input size 128x128"):
        detector.detect_array(image, scale=0.5)
    [graph_diff] = check_detection_parity(model, detection, {"group_8": image}, 0.7)
    assert graph_diff.reference == len(faces) and detection_graph_ok(graph_diff), graph_diff.line()

    package = write_deployment_package(model, tmp_path / "package", raw, detection, score_threshold=0.7)
    config = json.loads((package / "deployment_config.json").read_text())
    assert config["input"]["fixed_size"] == [128, 128] and config["input"]["shape"] == ["batch", 3, 128, 128]
    readme = (package / "README.md").read_text()
    assert "fixed input size 128x128" in readme and "H and W are fixed at 128x128" in readme
    assert "Any H, W >= 32 works" not in readme and "`--max_size` does not apply to this package" in readme
    out_json = tmp_path / "faces.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(package / "usage_example.py"), str(GROUP), "--json", str(out_json)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shipped = np.asarray(json.loads(out_json.read_text())["faces"], dtype=np.float32)
    diff = compare_detections("group_8 package", faces, shipped)
    assert detection_graph_ok(diff), diff.line()


def test_parity_check_catches_a_wrong_graph(v1, v2):
    v1_model, _ = v1
    _, v2_raw, _ = v2
    rows = check_parity(v1_model, v2_raw, [(1, 64, 64)])
    assert not rows[0].ok and "FAIL" in format_parity(rows)


def test_input_output_names_dynamic_dims_and_metadata(v1, v2):
    model, raw, detection = v2
    for path in (v1[1], raw):
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == ["input"]
        assert [o.name for o in graph.output] == ["bbox_regressions", "classifications", "landmarks"]
        batch, channels, height, width = dims(graph.input[0])
        assert channels == 3 and all(isinstance(d, str) for d in (batch, height, width))
        assert [dims(o)[2] for o in graph.output] == [4, 2, 10]
        meta = read_metadata(path)
        assert json.loads(meta[CONFIG_KEY])["name"] in ("v1", "v2")
        assert json.loads(meta["featherface_mean_bgr"]) == [104.0, 117.0, 123.0]
    assert ModelConfig.from_dict(json.loads(read_metadata(raw)[CONFIG_KEY])) == model.config
    graph = onnx.load(str(detection)).graph
    assert [i.name for i in graph.input] == ["input", "score_threshold"]
    assert dims(graph.input[0])[:2] == [1, 3] and all(isinstance(d, str) for d in dims(graph.input[0])[2:])
    assert dims(graph.input[1]) == []
    assert [o.name for o in graph.output] == ["faces"] and dims(graph.output[0])[1] == 15
    assert "NonMaxSuppression" in op_counts(detection)
    assert json.loads(read_metadata(detection)[DETECTION_KEY])["nms_threshold"] == 0.4


def test_onnx_backend_of_face_detector_reads_the_export(v2):
    model, raw, _ = v2
    image = cv2.imread(str(GROUP))
    torch_faces = FaceDetector(model, backend="torch", conf=RANDOM_THRESHOLD).detect_array(image)
    onnx_faces = FaceDetector(str(raw), backend="onnx", conf=RANDOM_THRESHOLD).detect_array(image)
    assert len(torch_faces) > 10
    assert detection_graph_ok(compare_detections("group_8", torch_faces, onnx_faces))


@pytest.mark.parametrize("size", [(640, 640), (480, 640), (375, 500), (33, 47)])
def test_pixel_priors_equal_prior_boxes(size):
    config = build_model("v2").config
    h, w = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    torch.testing.assert_close(pixel_priors(config, h, w), prior_boxes(size) * scale, rtol=1e-6, atol=1e-4)


def test_detection_graph_matches_pytorch_decode_and_nms(v2):
    model, _, detection = v2
    image = cv2.imread(str(GROUP))
    images = {"group_8": image, "group_8_crop_375x500": np.ascontiguousarray(image[100:475, 200:700])}
    diffs = check_detection_parity(model, detection, images, RANDOM_THRESHOLD)
    for diff in diffs:
        assert diff.reference > 10, diff.line()
        assert detection_graph_ok(diff), diff.line()
    # The threshold is a graph input: a higher one returns a prefix of the same faces.
    session = ort_session(detection)
    low = run_detection_graph(session, image, RANDOM_THRESHOLD)
    high = run_detection_graph(session, image, 0.9)
    assert 0 < len(high) < len(low) and (high[:, 4] > 0.9).all()
    assert np.all(np.diff(low[:, 4]) <= 0)
    assert len(run_detection_graph(session, image, 1.0)) == 0  # no face: an empty (0, 15)
    with pytest.raises(Exception):  # batch 1 only
        session.run(None, {"input": np.zeros((2, 3, 64, 64), np.float32), "score_threshold": np.array(0.5, np.float32)})


def test_deployment_package_usage_example_runs_as_shipped(v2, v2_package, tmp_path):
    model, _, _ = v2
    names = {p.name for p in v2_package.iterdir()}
    assert {"model.pth", "model.onnx", "model_postprocess.onnx", "deployment_config.json", "usage_example.py",
            "README.md"} <= names
    config = json.loads((v2_package / "deployment_config.json").read_text())
    assert config["model_name"] == "v2" and config["parameters"] == 256_156
    assert config["mean_bgr"] == [104.0, 117.0, 123.0] and config["variance"] == [0.1, 0.2]
    assert config["steps"] == [8, 16, 32] and config["min_sizes"] == [[16, 32], [64, 128], [256, 512]]
    assert config["thresholds"]["score"] == RANDOM_THRESHOLD and config["input"]["name"] == "input"
    readme = (v2_package / "README.md").read_text()
    assert "no deformable convolutions" in readme and "$" not in readme
    assert "Any H, W >= 32 works" in readme and "`--max_size` downscales large photos first" in readme
    reloaded, _ = load_model(v2_package / "model.pth")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))

    # Run it from outside the repository with no PYTHONPATH: it must need nothing of ours.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out_image, out_json = tmp_path / "annotated.jpg", tmp_path / "faces.json"
    proc = subprocess.run([sys.executable, str(v2_package / "usage_example.py"), str(GROUP), "--output",
                           str(out_image), "--json", str(out_json)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    faces = np.asarray(json.loads(out_json.read_text())["faces"], dtype=np.float32)
    assert f"{len(faces)} face(s)" in proc.stdout and "score" in proc.stdout
    expected = FaceDetector(model, backend="torch", conf=RANDOM_THRESHOLD).detect_array(cv2.imread(str(GROUP)))
    diff = compare_detections("group_8", expected, faces)
    assert len(expected) > 10 and detection_graph_ok(diff), diff.line()
    drawn = cv2.imread(str(out_image))
    assert drawn.shape == cv2.imread(str(GROUP)).shape and not np.array_equal(drawn, cv2.imread(str(GROUP)))

    # A photo cut short: one clear error, exit 1, nothing written (OpenCV alone would decode it grey-filled).
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(GROUP.read_bytes()[:20000])
    proc = subprocess.run([sys.executable, str(v2_package / "usage_example.py"), str(cut), "--output",
                           str(tmp_path / "cut_out.jpg")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "cut.jpg: JPEG is truncated" in proc.stderr, proc.stderr
    assert not (tmp_path / "cut_out.jpg").exists()


def test_usage_example_runs_images_smaller_than_one_stride(v2, v2_package, tmp_path):
    """The detection graph takes any H, W >= 1 as FaceDetector does; the example used to refuse
    images under 32 pixels a side."""
    import importlib.util

    from utils.deploy.package import not_a_package

    model, _, _ = v2
    assert not_a_package(v2_package) is None  # a later export may replace it
    spec = importlib.util.spec_from_file_location("packaged_usage_example", v2_package / "usage_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for h, w in [(1, 1), (5, 7)]:
        image = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"tiny_{h}x{w}.png"
        cv2.imwrite(str(path), image)
        faces = example.main(example.get_args_parser().parse_args([str(path), "--threshold", "0.3"]))
        expected = FaceDetector(model, backend="torch", conf=0.3).detect_array(image)
        diff = compare_detections(path.name, expected, faces)
        assert len(expected) > 0 and detection_graph_ok(diff), diff.line()
    # --max_size scales float32 pixels down as FaceDetector does, a strip's 1-pixel side kept.
    strip = np.random.default_rng(2).integers(0, 256, (1, 400, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "strip.png"), strip)
    for path, image, max_size in [(GROUP, cv2.imread(str(GROUP)), "300"), (tmp_path / "strip.png", strip, "100")]:
        faces = example.main(example.get_args_parser().parse_args([str(path), "--threshold", "0.3",
                                                                    "--max_size", max_size]))
        expected = FaceDetector(model, backend="torch", conf=0.3, max_size=int(max_size)).detect_array(image)
        diff = compare_detections(path.name, expected, faces)
        assert len(expected) > 0 and detection_graph_ok(diff), diff.line()


def test_int8_quantization_keeps_metadata_and_detections_close(v2, tmp_path):
    _, raw, _ = v2
    report = quantize_int8(raw, tmp_path / "v2_int8.onnx", find_images(SAMPLE), image_size=256)
    counts = op_counts(report.path)
    assert counts.get("QuantizeLinear", 0) > 50 and counts.get("DequantizeLinear", 0) > 50
    assert read_metadata(report.path)[CONFIG_KEY] == read_metadata(raw)[CONFIG_KEY]
    # the stem (stride-2 conv on the image, first depthwise conv, their activations) stays float32
    assert report.calibration_images == 3 and report.float_ops == {"Conv": 2, "LeakyRelu": 2}
    assert counts["QuantizeLinear"] > 50 and not any(n.op_type == "QuantizeLinear" and n.input[0] == "input"
                                                     for n in onnx.load(str(report.path)).graph.node)
    image = cv2.imread(str(GROUP))
    x = fixed_size_input(image, 256)
    assert x.shape == (1, 3, 256, 256)
    fp32 = ort_session(raw).run(None, {"input": x})
    int8 = ort_session(report.path).run(None, {"input": x})
    # Quantization noise, not garbage: outputs stay strongly correlated with FP32 (a random-init
    # network is harder to quantize than a trained one; see the report for real-weight drift).
    for a, b in zip(fp32, int8):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8
    assert np.abs(fp32[1] - int8[1]).mean() < 0.1
    [drift] = detection_drift(raw, report.path, {"group_8": image}, RANDOM_THRESHOLD)
    assert drift.reference > 10 and drift.candidate > 0 and drift.matched > 0


def test_int8_leaves_deformconv_and_the_pool_border_in_float(v1, tmp_path):
    model, raw = v1
    report = quantize_int8(raw, tmp_path / "v1_int8.onnx", [GROUP], image_size=128)
    # The BNs after the DeformConvs are folded into their bias; each of the 6 same-padding pools keeps
    # its -inf border plane (Pad -> MaxPool -> Max) in float: -inf has no INT8 range.
    assert report.float_ops == {"DeformConv": 15, "Pad": 6, "MaxPool": 6, "Max": 6, "Conv": 2, "LeakyRelu": 2}
    x = fixed_size_input(cv2.imread(str(GROUP)), 128)
    names = ["bbox_regressions", "classifications"]
    fp32 = ort_session(raw).run(names, {"input": x})
    int8 = ort_session(report.path).run(names, {"input": x})
    assert int8[1].shape == (1, 2 * (16 * 16 + 8 * 8 + 4 * 4), 2) and np.isfinite(int8[1]).all()
    for a, b in zip(fp32, int8):  # quantization noise, not a broken branch
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8


def test_int8_with_a_non_finite_range_is_refused_and_leaves_no_file(v1, tmp_path, monkeypatch):
    """Quantizing the -inf border planes too gives NaN scales: one clear error, no INT8 file."""
    from utils.deploy import quantize

    _, raw = v1
    monkeypatch.setattr(quantize, "_float_candidates",
                        lambda path: [n for n in onnx.load(str(path)).graph.node if n.op_type == "DeformConv"])
    out = tmp_path / "v1_int8.onnx"
    with pytest.raises(ExportError, match="non-finite scales"):
        quantize_int8(raw, out, [GROUP], image_size=128)
    assert not out.exists()


def test_opset_below_19_is_refused_for_deformable_models():
    with pytest.raises(ExportError, match="opset >= 19"):
        check_opset(build_model("v1_slim").config, 18)
    check_opset(build_model("v2").config, 18)  # no DeformConv: fine


def _cli(capsys, *argv):
    args = script.get_args_parser().parse_args([str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, args)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_wrong_checkpoint_is_a_clear_error(tmp_path, capsys):
    checkpoint = tmp_path / "v1.pth"
    save_checkpoint(checkpoint, build_model("v1"))
    code, err = _cli(capsys, "--model", "v2", "--weights", checkpoint, "--output", tmp_path / "x.onnx")
    assert code == 2 and "holds a 'v1' model, but --model v2" in err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_user_errors(tmp_path, capsys):
    code, err = _cli(capsys, "--model", "v2")
    assert code == 2 and "no weights" in err and "--random_init" in err
    code, err = _cli(capsys, "--weights", tmp_path / "missing.pth")
    assert code == 2 and "not found" in err
    code, err = _cli(capsys, "--model", "v1", "--random_init", "--opset", "17", "--output", tmp_path / "x.onnx")
    assert code == 2 and "opset >= 19" in err
    code, err = _cli(capsys, "--model", "v2", "--random_init", "--quantize", "int8", "--calibration_images",
                     tmp_path / "nowhere")
    assert code == 2 and "calibration image folder not found" in err
    code, err = _cli(capsys, "--model", "v2", "--random_init", "--quantize", "int8", "--output", tmp_path / "q.onnx")
    assert code == 2 and "--quantize int8 needs --calibration_images DIR" in err and not (tmp_path / "q.onnx").exists()
    code, err = _cli(capsys, "--model", "v2", "--random_init", "--pad_stem", "--no_rewrites", "--output", tmp_path / "x.onnx")
    assert code == 2 and "--pad_stem needs the graph rewrites" in err and not (tmp_path / "x.onnx").exists()


def test_cli_unreadable_calibration_image_stops_before_the_export(tmp_path, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    shutil.copyfile(GROUP, folder / "good.jpg")
    (folder / "cut.jpg").write_bytes(GROUP.read_bytes()[:20000])
    (folder / "empty.png").write_bytes(b"")
    args = script.get_args_parser().parse_args(["--model", "v2", "--random_init", "--quantize", "int8",
                                                "--calibration_images", str(folder), "--output", str(tmp_path / "q.onnx")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, args)
    code, (out, err) = exit_info.value.code, capsys.readouterr()
    assert code == 2 and "2 of 3 calibration images cannot be used" in err, err
    assert "cut.jpg: image cannot be decoded" in err and "JPEG is truncated" in err and "empty.png" in err
    assert "exporting" not in out and list(tmp_path.iterdir()) == [folder]


def test_help_works_without_weights():
    proc = subprocess.run([sys.executable, str(ROOT / "export_dynamic_onnx.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--test_sizes", "--deployment_package", "--with_postprocess", "--quantize", "--random_init", "--pad_stem",
                 "--static_size"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_cli_end_to_end_random_init_package(tmp_path):
    needs_exporter()
    out = tmp_path / "v2.onnx"
    proc = subprocess.run([sys.executable, str(ROOT / "export_dynamic_onnx.py"), "--model", "v2", "--random_init",
                           "--output", str(out), "--image_size", "320", "--test_sizes", "--deployment_package",
                           str(tmp_path / "pkg"), "--quantize", "int8", "--calibration_images", str(SAMPLE),
                           "--latency_runs", "3"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "UNTRAINED" in proc.stderr
    assert "(8, 256, 256)" in proc.stdout and "(1, 375, 500)" in proc.stdout and "FAIL" not in proc.stdout
    assert "INT8 vs FP32" in proc.stdout
    for name in ("model.pth", "model.onnx", "model_postprocess.onnx", "model_int8.onnx", "usage_example.py"):
        assert (tmp_path / "pkg" / name).is_file(), name
    assert (tmp_path / "v2_postprocess.onnx").is_file() and (tmp_path / "v2_int8.onnx").is_file()


@pytest.mark.slow
def test_real_weights_package_matches_pytorch_on_group_photo(tmp_path):
    """v1_original converted from the published checkpoint: the shipped example finds the same
    faces as FaceDetector(backend="torch") on group_8.jpg."""
    needs_exporter()
    from utils.convert_official import convert_file

    official = shared_path("weights", "featherface_v1_original_widerface.pth")
    checkpoint = tmp_path / "v1_original.pth"
    convert_file(official, checkpoint)
    model, _ = load_model(checkpoint)
    raw, detection = export_graphs(model, tmp_path / "v1_original.onnx", tmp_path / "v1_original_postprocess.onnx")
    rows = check_parity(model, raw, [(1, 320, 320), (1, 375, 500), (2, 256, 256)])
    assert all(r.ok for r in rows), format_parity(rows)
    package = write_deployment_package(model, tmp_path / "pkg", raw, detection)
    assert "DeformConv" in (package / "README.md").read_text() and "check your runtime" in (package / "README.md").read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(package / "usage_example.py"), str(GROUP), "--json",
                           str(tmp_path / "faces.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    faces = np.asarray(json.loads((tmp_path / "faces.json").read_text())["faces"], dtype=np.float32)
    expected = FaceDetector(model, backend="torch", conf=DEMO_POSTPROCESS.conf_threshold).detect_array(cv2.imread(str(GROUP)))
    diff = compare_detections("group_8", expected, faces)
    assert len(expected) >= 5 and detection_graph_ok(diff), diff.line()


@pytest.mark.slow
def test_cli_failed_check_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    needs_exporter()
    monkeypatch.setattr(script, "verify_export", lambda *args, **kwargs: (["raw graph at (1, 64, 64)"], "table"))
    out, package = tmp_path / "graphs" / "v2.onnx", tmp_path / "deployment" / "v2"
    code, err = _cli(capsys, "--model", "v2", "--random_init", "--output", out, "--image_size", "64",
                     "--test_sizes", "--deployment_package", package)
    assert code == 2 and "disagree beyond tolerance" in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no graph, no package, no hidden staging folder


@pytest.mark.slow
def test_gridsample_export_has_no_deformconv_and_matches(tmp_path):
    """The standard-op deformable conv (GridSample) graph agrees with PyTorch, hence with DeformConv."""
    needs_exporter()
    model = realistic("v1_slim", seed=3)
    path = export_onnx(model, tmp_path / "v1_slim_gridsample.onnx", image_size=128, deform="gridsample")
    counts = op_counts(path)
    assert "DeformConv" not in counts and counts["GridSample"] == 15
    rows = check_parity(model, path, [(1, 128, 160), (2, 97, 131)])
    assert all(r.ok for r in rows), format_parity(rows)
    assert json.loads(read_metadata(path)["featherface_graph_form"])["deformable_conv"] == "gridsample"


def test_same_max_pool_exports_exactly_without_padding_the_map(tmp_path):
    """V1's TF-"same" pool in ONNX: one graph, exact for both parities of H and W. The feature map
    goes through a SAME_UPPER MaxPool only (no Pad, no flips); the zero padding's effect comes from a
    one-channel border plane, so windows that reach the padding give max(window, 0) as in the model."""
    from models.bifpn import SameMaxPool, same_max_pool
    from utils.deploy.export import _export, _input_dims

    path = tmp_path / "pool.onnx"
    _export(SameMaxPool().eval(), (torch.zeros(1, 5, 64, 64),), path, ["input"], ["output"], (_input_dims(),), 20)
    graph = onnx.load(str(path)).graph
    counts = op_counts(path)
    assert counts.get("MaxPool") == 2 and counts.get("Max") == 1 and "Slice" not in counts, counts
    pool_of_input = [n for n in graph.node if n.op_type == "MaxPool" and n.input[0] == "input"]
    assert len(pool_of_input) == 1
    assert {a.name: a.s for a in pool_of_input[0].attribute}["auto_pad"] == b"SAME_UPPER"
    assert all(n.input[0] != "input" for n in graph.node if n.op_type == "Pad")  # only the plane is padded
    session = ort_session(path, threads=1)
    generator = torch.Generator().manual_seed(0)
    for h, w in [(64, 64), (65, 64), (64, 65), (33, 47), (32, 33), (3, 4), (5, 3)]:
        # Mostly negative, so the zero padding wins at the border: the case a -inf pad gets wrong.
        x = torch.randn(2, 5, h, w, generator=generator) - 2.0
        expected = same_max_pool(x)
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (2, 5, (h + 1) // 2, (w + 1) // 2)
        assert (expected == 0).any()  # the border did win somewhere
        np.testing.assert_array_equal(got, expected.numpy())
