"""Static INT8 quantization of a raw graph, latency helpers and FP32-vs-INT8 detection drift."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from data.preprocess import IMAGE_SUFFIXES, letterbox, read_image, resize_scale
from utils.deploy.export import ExportError, PathLike, ort_session, read_metadata, set_metadata
from utils.deploy.parity import DetectionDiff, compare_detections
from utils.inference.detector import INPUT_NAME
from utils.inference.postprocess import DEMO_POSTPROCESS
from utils.timing import measure_latency



def find_images(folder: PathLike) -> List[Path]:
    """Image files (data.preprocess.IMAGE_SUFFIXES) in `folder` and its subfolders, sorted; a folder
    named like an image is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"calibration image folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def find_calibration_images(folder: PathLike) -> List[Path]:
    """find_images(folder), each decoded once up front, so that an unreadable image stops the
    export before anything is traced (calibration itself runs after the FP32 export)."""
    images = find_images(folder)
    bad = [f"{p}: {why}" for p in images for why in [read_image(p)[1]] if why]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ExportError(f"{len(bad)} of {len(images)} calibration images cannot be used: "
                          + "; ".join(bad[:3]) + more)
    return images


def load_image(path: PathLike) -> np.ndarray:
    image, why = read_image(path)
    if image is None:
        raise ExportError(f"cannot use image {path}: {why}")
    return image


def sample_images(folder: PathLike, limit: int = 3) -> Dict[str, np.ndarray]:
    """The first `limit` images of `folder` by file name ({} when the folder does not exist)."""
    folder = Path(folder)
    return {p.name: load_image(p) for p in (find_images(folder)[:limit] if folder.is_dir() else [])}


def fixed_size_input(image_bgr: np.ndarray, size: int) -> np.ndarray:
    """(1, 3, size, size) float32: longer side resized to `size`, zero-padded bottom/right after
    mean removal (the padding preprocess_batch uses)."""
    scale = resize_scale(image_bgr.shape[0], image_bgr.shape[1], None, size)  # only ever shrinks
    return letterbox(image_bgr, (size, size), scale)[0].unsqueeze(0).numpy()


def _calibration_reader(images: Sequence[Path], size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        """Feeds each calibration image once, preprocessed like inference."""

        def __init__(self) -> None:
            self._paths = iter(images)

        def get_next(self):
            path = next(self._paths, None)
            return None if path is None else {INPUT_NAME: fixed_size_input(load_image(path), size)}

    return ImageReader()


@dataclass
class QuantizationReport:
    path: Path
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int
    float_ops: Dict[str, int] = field(default_factory=dict)  # op type -> nodes left in float32


def quantize_int8(fp32_path: PathLike, out_path: PathLike, calibration_images: Sequence[Path],
                  image_size: int = 640, per_channel: bool = True) -> QuantizationReport:
    """Static INT8 (QDQ, per-channel weights, MinMax calibration) of a raw graph.

    onnxruntime.quantization has no DeformConv quantizer, so V1's DeformConv nodes (and, in a graph
    exported without the rewrites, the BatchNormalization right after each, which ORT cannot fold
    into a DeformConv) stay float32: they read dequantized inputs and the next quantized op
    re-quantizes their output. The stem and the pools' border planes stay float32 too
    (_float_candidates).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not calibration_images:
        raise ExportError("INT8 quantization needs at least one calibration image")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prepared = out_path.with_name(out_path.stem + "_prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        float_nodes = _float_candidates(prepared)
        # The quantizer computes a scale for every calibrated tensor, the -inf border planes that stay
        # float32 included (NaN, with numpy warnings); the scales the INT8 graph uses are checked below.
        with np.errstate(divide="ignore", invalid="ignore"):
            quantize_static(
                str(prepared), str(out_path), _calibration_reader(calibration_images, image_size),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=per_channel, nodes_to_exclude=[n.name for n in float_nodes],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types
        raise ExportError(f"INT8 quantization of {fp32_path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        prepared.unlink(missing_ok=True)
    bad = _non_finite_scales(out_path)
    if bad:
        out_path.unlink(missing_ok=True)
        raise ExportError(f"INT8 quantization of {fp32_path} gave non-finite scales for {len(bad)} tensors "
                          f"(first: {', '.join(bad[:3])}): their calibrated range is not finite")
    set_metadata(out_path, read_metadata(fp32_path))
    float_ops: Dict[str, int] = {}
    for node in float_nodes:
        float_ops[node.op_type] = float_ops.get(node.op_type, 0) + 1
    return QuantizationReport(out_path, fp32_path.stat().st_size, out_path.stat().st_size,
                              len(calibration_images), float_ops)


STEM_CONVS = 2  # convs at the input end kept in float32 (see _float_candidates)


def _float_candidates(path: Path) -> List:
    """Nodes left in float32:
    - DeformConv, and the BatchNormalization nodes that read a DeformConv output (no quantizer);
    - the border plane of V1's same-padding max-pool (ConstantOfShape(-inf) -> Pad -> MaxPool -> Max,
      utils/deploy/export.py): its -inf values have no INT8 range, and quantizing them would turn
      the pooled maps into NaN;
    - the stem: the first STEM_CONVS convs from the image (the 3-channel stride-2 conv and the 8-channel
      depthwise conv after it) and their activations. In INT8 they ran slower than in float32, and a
      quantized image input is dequantized again for every Shape node that reads it (README, INT8).
    """
    import onnx

    graph = onnx.load(str(path)).graph
    nodes = graph.node
    producer = {out: n for n in nodes for out in n.output}
    consumers: Dict[str, List] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def made_by(name: str, op_type: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    deform_outputs = {n.output[0] for n in nodes if n.op_type == "DeformConv"}
    chosen = [n for n in nodes if n.op_type == "DeformConv"
              or (n.op_type == "BatchNormalization" and n.input[0] in deform_outputs)]
    for node in nodes:
        if node.op_type != "Max":
            continue
        for name in node.input:
            pool = made_by(name, "MaxPool")
            pad = made_by(pool.input[0], "Pad") if pool is not None else None
            if pad is not None and made_by(pad.input[0], "ConstantOfShape") is not None:
                chosen += [pad, pool, node]
    chosen += _stem(graph.input[0].name, consumers)
    return chosen


def _stem(image: str, consumers: Dict[str, List]) -> List:
    """The first STEM_CONVS Conv nodes on the path from the image, each with the activation right
    after it: a chain of Conv -> activation nodes, the activation being the conv's only consumer."""
    stem = []
    convs = [n for n in consumers.get(image, []) if n.op_type == "Conv"]
    node = convs[0] if len(convs) == 1 else None
    while node is not None and node.op_type == "Conv" and len(stem) < 2 * STEM_CONVS:
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type not in ("LeakyRelu", "Relu"):
            break
        stem += [node, after[0]]
        nxt = consumers.get(after[0].output[0], [])
        node = nxt[0] if len(nxt) == 1 else None
    return stem


def _non_finite_scales(path: Path) -> List[str]:
    """Names of the quantization scales and zero points in `path` that are NaN or infinite."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    params = {name for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for name in n.input[1:]}
    return [t.name for t in graph.initializer
            if t.name in params and not np.isfinite(numpy_helper.to_array(t).astype(np.float64)).all()]


def onnx_latency_ms(path: PathLike, size: Tuple[int, int], threads: int = 1, runs: int = 30) -> float:
    session = ort_session(path, threads)
    x = {INPUT_NAME: np.random.default_rng(0).uniform(-120, 150, (1, 3, *size)).astype(np.float32)}
    return measure_latency(lambda: session.run(None, x), runs, warmup=5).median_ms


def detection_drift(fp32_path: PathLike, int8_path: PathLike, images: Dict[str, np.ndarray],
                    score_threshold: float = DEMO_POSTPROCESS.conf_threshold) -> List[DetectionDiff]:
    """FP32 vs INT8 raw graphs through the same FaceDetector decode + NMS, per image."""
    from utils.inference.detector import FaceDetector

    fp32 = FaceDetector(str(fp32_path), backend="onnx", conf=score_threshold)
    int8 = FaceDetector(str(int8_path), backend="onnx", conf=score_threshold)
    return [compare_detections(name, fp32.detect_array(im), int8.detect_array(im)) for name, im in images.items()]


def quantize_and_report(fp32_path: PathLike, int8_path: PathLike, calibration_images: Sequence[Path],
                        image_size: int, drift_images: Dict[str, np.ndarray],
                        score_threshold: float = DEMO_POSTPROCESS.conf_threshold, latency_runs: int = 30,
                        log=print) -> QuantizationReport:
    """quantize_int8, then log sizes, FP32 vs INT8 latency (1 and 2 threads) and detection drift."""
    report = quantize_int8(fp32_path, int8_path, calibration_images, image_size)
    log(f"{Path(int8_path).name}: {report.fp32_bytes / 1e6:.2f} MB -> {report.int8_bytes / 1e6:.2f} MB, calibrated "
        f"on {report.calibration_images} images" + (f"; left in float32: {report.float_ops}" if report.float_ops else ""))
    size = (image_size, image_size)
    for threads in (1, 2):
        fp32_ms = onnx_latency_ms(fp32_path, size, threads, latency_runs)
        int8_ms = onnx_latency_ms(int8_path, size, threads, latency_runs)
        log(f"  latency {size[0]}x{size[1]}, {threads} thread(s): FP32 {fp32_ms:.1f} ms, INT8 {int8_ms:.1f} ms "
            f"(median of {latency_runs})")
    for diff in detection_drift(fp32_path, int8_path, drift_images, score_threshold):
        log("  INT8 vs FP32 " + diff.line())
    return report
