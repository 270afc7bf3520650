"""ONNX deployment of FeatherFace: dynamic-shape export, parity checks, a detection graph with
decode + NMS inside, static INT8 quantization and a self-contained deployment package.

Two graphs are exported, both with the dynamo exporter (`torch.onnx.export(dynamo=True)`, spec
section 4: the only exporter that maps `torchvision::deform_conv2d` to the standard ONNX
DeformConv op, opset >= 19):

- raw graph: `input` (B, 3, H, W) float32 BGR minus mean -> `bbox_regressions` (B, N, 4),
  `classifications` (B, N, 2) softmax, `landmarks` (B, N, 10); batch, height and width dynamic.
  The model config is stored as JSON in the metadata entry `featherface_model_config`, so
  `FaceDetector(path, backend="onnx")` rebuilds priors and decoding from the file alone.
- detection graph: `input` (1, 3, H, W) and `score_threshold` (scalar) -> `faces` (K, 15)
  [x1, y1, x2, y2, score, 5 x (x, y)] in input pixels, sorted by score. Priors are computed in
  the graph from H and W, then decode, score threshold, top-k and ONNX NonMaxSuppression;
  NMS IoU, top-k and keep-top-k are fixed at export time and recorded in the metadata.
"""
from __future__ import annotations

import json
import shutil
import string
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou, nms

from data.config import MEAN_BGR, ModelConfig
from data.preprocess import preprocess, resize_scale
from layers.box_utils import decode, decode_landmarks
from models.featherface import count_parameters
from utils.checkpoint import save_checkpoint
from utils.detector import INPUT_NAME, ONNX_CONFIG_KEY, OUTPUT_NAMES
from utils.errors import FeatherFaceError
from utils.timing import measure_latency

PathLike = Union[str, Path]

SCORE_THRESHOLD_NAME = "score_threshold"
FACES_NAME = "faces"
CONFIG_KEY = ONNX_CONFIG_KEY  # metadata entry holding ModelConfig JSON, read by FaceDetector's OnnxBackend
DETECTION_KEY = "featherface_detection"  # detection graph: its fixed NMS settings (JSON)

DEFAULT_OPSET = 20
MIN_DEFORM_OPSET = 19  # DeformConv entered the ONNX standard in opset 19
MIN_SIDE = 32  # smallest input side the networks accept (one stride-32 cell)
MAX_SIDE = 8192

# Parity limits (max |ORT - PyTorch|): scores are probabilities, boxes/landmarks regressions.
TOLERANCES: Dict[str, float] = {"bbox_regressions": 1e-3, "classifications": 1e-4, "landmarks": 1e-3}
# (batch, height, width) checked by `--test_sizes`: squares, a non-square and a size that is
# not a multiple of 32, then batches 1-8 at a small size.
PARITY_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (1, 320, 320), (1, 416, 416), (1, 640, 640), (1, 832, 832), (1, 1024, 1024),
    (1, 480, 640), (1, 375, 500), (1, 256, 256), (2, 256, 256), (4, 256, 256), (8, 256, 256),
)

# Post-processing defaults of the deployment package (RetinaFace demo values).
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_NMS_THRESHOLD = 0.4
DEFAULT_TOP_K = 5000
DEFAULT_KEEP_TOP_K = 750

TEMPLATE_DIR = Path(__file__).resolve().parent / "deploy_template"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ExportError(FeatherFaceError):
    """Export, parity, quantization or packaging cannot proceed; the message says why."""


def require_exporter() -> None:
    """The dynamo exporter needs onnxscript; say so in one line instead of a deep ImportError."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            "ONNX export needs the 'onnxscript' package (torch.onnx.export(dynamo=True)); "
            f"install it with `pip install onnxscript` ({exc})"
        ) from None


def check_opset(config: ModelConfig, opset: int) -> None:
    """V1 models contain deformable convs, which ONNX has only from opset 19 (DeformConv)."""
    if config.deformable and opset < MIN_DEFORM_OPSET:
        raise ExportError(
            f"model '{config.name}' has deformable convolutions, which need ONNX opset >= "
            f"{MIN_DEFORM_OPSET} (DeformConv); got --opset {opset}"
        )
    if opset < 18:
        raise ExportError(f"opset {opset} is too old for the dynamo exporter; use >= 18 ({DEFAULT_OPSET} recommended)")


def _size_pair(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise ExportError(f"image size {h}x{w} is outside {MIN_SIDE}..{MAX_SIDE} pixels per side")
    return int(h), int(w)


def _export(module: nn.Module, args: Tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
            output_names: Sequence[str], dynamic_shapes: Tuple, opset: int) -> None:
    require_exporter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torchvision's nms meta kernel and the exporter emit deprecation chatter at every call.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dynamic_shapes, verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; keep its message
            raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {exc}") from exc
    # One self-contained file (the models are < 3 MB): no external-data side file to lose.
    program.save(str(path), external_data=False)


def set_metadata(path: PathLike, entries: Dict[str, str]) -> None:
    """Add or replace metadata_props entries of an ONNX file in place."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_metadata(path: PathLike) -> Dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def model_metadata(config: ModelConfig) -> Dict[str, str]:
    """Metadata every exported graph carries: config JSON, preprocessing and output layout."""
    return {
        CONFIG_KEY: json.dumps(config.to_dict()),
        "featherface_mean_bgr": json.dumps(list(MEAN_BGR)),
        "featherface_variance": json.dumps(list(config.variance)),
        "featherface_input": "float32 (B, 3, H, W): BGR pixels minus featherface_mean_bgr, no scaling",
    }


def export_onnx(model: nn.Module, path: PathLike, image_size: Union[int, Sequence[int]] = 640,
                opset: int = DEFAULT_OPSET) -> Path:
    """Export the raw-output graph with dynamic batch, height and width; returns the path."""
    config: ModelConfig = model.config
    check_opset(config, opset)
    h, w = _size_pair(image_size)
    model = model.eval()
    path = Path(path)
    _export(model, (torch.zeros(1, 3, h, w),), path, [INPUT_NAME], OUTPUT_NAMES, (_input_dims(),), opset)
    set_metadata(path, model_metadata(config))
    return path


def _input_dims() -> Dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch", min=1, max=1024),
            2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)}


def pixel_priors(config: ModelConfig, height: Union[int, torch.SymInt], width: Union[int, torch.SymInt]) -> torch.Tensor:
    """Priors (N, 4) [cx, cy, w, h] in input pixels, from H and W alone (graph-friendly).

    Same order and values as layers.prior_box.prior_boxes times (W, H, W, H); written with
    integer ceil-division and arange so it traces on symbolic sizes. Pixel units make the
    decoded boxes pixels directly (decode is linear in the prior).
    """
    levels = []
    for step, sizes in zip(config.steps, config.min_sizes):
        rows = (height + step - 1) // step
        cols = (width + step - 1) // step
        cy = (torch.arange(rows, dtype=torch.float32) + 0.5) * step
        cx = (torch.arange(cols, dtype=torch.float32) + 0.5) * step
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        shape = (rows, cols, len(sizes))
        wh = torch.tensor(sizes, dtype=torch.float32).expand(shape)
        level = torch.stack([grid_x[:, :, None].expand(shape), grid_y[:, :, None].expand(shape), wh, wh], dim=-1)
        levels.append(level.reshape(-1, 4))
    return torch.cat(levels)


class DetectionGraph(nn.Module):
    """FeatherFace + in-graph priors, decode, score threshold, top-k and NMS.

    forward(image (B, 3, H, W) BGR minus mean, score_threshold () float) -> (bbox_regressions,
    classifications, landmarks) as the model returns them, and faces (K, 15) of the FIRST image
    [x1, y1, x2, y2, score, l0x, l0y, ..., l4x, l4y] in input pixels, highest score first: the
    steps of utils.postprocess.detect_faces with scale 1. Exported once, it is split into the
    raw graph and the (batch-1) detection graph.
    """

    def __init__(self, model: nn.Module, nms_threshold: float = DEFAULT_NMS_THRESHOLD,
                 top_k: int = DEFAULT_TOP_K, keep_top_k: int = DEFAULT_KEEP_TOP_K) -> None:
        super().__init__()
        self.model = model
        self.nms_threshold, self.top_k, self.keep_top_k = float(nms_threshold), int(top_k), int(keep_top_k)

    def forward(self, image: torch.Tensor, score_threshold: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        loc, conf, landm = self.model(image)
        config: ModelConfig = self.model.config
        priors = pixel_priors(config, image.shape[2], image.shape[3])
        scores = conf[0, :, 1]
        # top-k of all scores, then the threshold: the same set as detect_faces' threshold-then-
        # top-k, with one data-dependent step instead of two.
        order = torch.topk(scores, torch.sym_min(self.top_k, scores.shape[0])).indices
        order = order[scores[order] > score_threshold]
        # Gather priors and outputs by index instead of broadcasting them: the exporter cannot
        # prove that N from the heads equals N from the prior formula, but indexing needs no proof.
        kept_priors = priors[order]
        boxes = decode(loc[0, order], kept_priors, config.variance)
        points = decode_landmarks(landm[0, order], kept_priors, config.variance)
        scores = scores[order]
        kept = nms(boxes, scores, self.nms_threshold)[: self.keep_top_k]
        faces = torch.cat([boxes[kept], scores[kept, None], points[kept]], dim=1)
        return loc, conf, landm, faces


def export_graphs(model: nn.Module, raw_path: PathLike, detection_path: PathLike,
                  image_size: Union[int, Sequence[int]] = 640, opset: int = DEFAULT_OPSET,
                  nms_threshold: float = DEFAULT_NMS_THRESHOLD, top_k: int = DEFAULT_TOP_K,
                  keep_top_k: int = DEFAULT_KEEP_TOP_K) -> Tuple[Path, Path]:
    """Export the raw graph and the detection graph from ONE trace of `DetectionGraph`.

    Tracing dominates export time (about 20-40 s on two CPU cores per model), so the combined
    graph is exported once and split with onnx.utils.extract_model: raw graph `input` ->
    bbox_regressions/classifications/landmarks (dynamic batch, H, W); detection graph `input`
    (1, 3, H, W), `score_threshold` -> `faces` (dynamic H, W, batch 1). Returns both paths.
    """
    import onnx
    import onnx.utils

    config: ModelConfig = model.config
    check_opset(config, opset)
    h, w = _size_pair(image_size)
    graph = DetectionGraph(model.eval(), nms_threshold, top_k, keep_top_k).eval()
    raw_path, detection_path = Path(raw_path), Path(detection_path)
    combined = detection_path.with_name(detection_path.stem + "_combined.onnx")
    args = (torch.zeros(1, 3, h, w), torch.tensor(DEFAULT_SCORE_THRESHOLD))
    try:
        _export(graph, args, combined, [INPUT_NAME, SCORE_THRESHOLD_NAME], [*OUTPUT_NAMES, FACES_NAME],
                (_input_dims(), None), opset)
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.utils.extract_model(str(combined), str(raw_path), [INPUT_NAME], list(OUTPUT_NAMES))
        onnx.utils.extract_model(str(combined), str(detection_path), [INPUT_NAME, SCORE_THRESHOLD_NAME], [FACES_NAME])
    finally:
        combined.unlink(missing_ok=True)
    _fix_batch_one(detection_path)
    set_metadata(raw_path, model_metadata(config))
    settings = {"nms_threshold": graph.nms_threshold, "top_k": graph.top_k, "keep_top_k": graph.keep_top_k,
                "batch": 1, "output": "faces (K, 15) [x1, y1, x2, y2, score, l0x, l0y, ..., l4x, l4y] in input pixels"}
    set_metadata(detection_path, {**model_metadata(config), DETECTION_KEY: json.dumps(settings)})
    return raw_path, detection_path


def _fix_batch_one(path: Path) -> None:
    """The detection graph reads image 0 only: declare its input batch as 1 so ORT rejects more."""
    import onnx

    model = onnx.load(str(path))
    for value in model.graph.input:
        if value.name == INPUT_NAME:
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(path))


def check_onnx_file(path: PathLike) -> None:
    """onnx.checker with full shape inference; raises ExportError with the checker's message."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker raises ValidationError / InferenceError
        raise ExportError(f"{path} fails onnx.checker: {exc}") from exc


def ort_session(path: PathLike, threads: Optional[int] = None):
    """CPU ONNX Runtime session (the CPU provider implements DeformConv)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_counts(path: PathLike) -> Dict[str, int]:
    """Node count per op type, e.g. {'DeformConv': 15, 'Conv': 101, ...}."""
    import onnx

    counts: Dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@dataclass(frozen=True)
class ParityRow:
    """Max |ORT - PyTorch| per output for one input shape."""

    shape: Tuple[int, int, int]  # batch, height, width
    diffs: Dict[str, float]

    @property
    def ok(self) -> bool:
        return all(self.diffs[name] <= TOLERANCES[name] for name in OUTPUT_NAMES)


def check_parity(model: nn.Module, path: PathLike, shapes: Iterable[Tuple[int, int, int]] = PARITY_SHAPES,
                 seed: int = 0, session=None) -> List[ParityRow]:
    """Run the raw graph and the model on the same random inputs (pixel-like range) per shape."""
    session = session or ort_session(path)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    model = model.eval()
    for batch, h, w in shapes:
        # Mean-subtracted pixels lie in about [-123, 151]; uniform noise covers that range.
        x = torch.rand(batch, 3, h, w, generator=generator) * 255 - torch.tensor(MEAN_BGR).view(1, 3, 1, 1)
        with torch.inference_mode():
            expected = model(x)
        try:
            got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ExportError(f"ONNX Runtime cannot run {path} on input {(batch, 3, h, w)}: {exc}") from exc
        diffs = {}
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if tuple(g.shape) != tuple(e.shape):
                raise ExportError(f"{path}: output {name} has shape {g.shape} at input {(batch, 3, h, w)}, "
                                  f"PyTorch gives {tuple(e.shape)}")
            diffs[name] = float(np.abs(g - e.numpy()).max())
        rows.append(ParityRow((batch, h, w), diffs))
    return rows


def format_parity(rows: Sequence[ParityRow]) -> str:
    """A table of per-output max differences with the tolerances."""
    head = f"{'input (B,H,W)':>18}  " + "  ".join(f"{n:>17}" for n in OUTPUT_NAMES) + "  status"
    lines = [head]
    for row in rows:
        cells = "  ".join(f"{row.diffs[n]:>17.2e}" for n in OUTPUT_NAMES)
        lines.append(f"{str(row.shape):>18}  {cells}  {'ok' if row.ok else 'FAIL'}")
    lines.append("tolerances: " + ", ".join(f"{n} {TOLERANCES[n]:.0e}" for n in OUTPUT_NAMES))
    return "\n".join(lines)


def match_detections(reference: np.ndarray, candidate: np.ndarray, iou: float = 0.5
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching by IoU (reference rows in score order).

    Returns (ref_index, cand_index, iou) of the matched pairs with IoU >= `iou`.
    """
    if len(reference) == 0 or len(candidate) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    ious = box_iou(torch.from_numpy(reference[:, :4]), torch.from_numpy(candidate[:, :4])).numpy()
    ref_idx, cand_idx, values = [], [], []
    taken = np.zeros(len(candidate), dtype=bool)
    for i in range(len(reference)):
        row = np.where(taken, -1.0, ious[i])
        j = int(row.argmax())
        if row[j] >= iou:
            taken[j] = True
            ref_idx.append(i), cand_idx.append(j), values.append(row[j])
    return np.asarray(ref_idx, np.int64), np.asarray(cand_idx, np.int64), np.asarray(values, np.float32)


@dataclass(frozen=True)
class DetectionDiff:
    """How one image's detections differ between a reference and another pipeline."""

    name: str
    reference: int  # faces found by the reference
    candidate: int  # faces found by the other pipeline
    matched: int  # one-to-one pairs with IoU >= 0.5
    max_coord_diff: float  # max |diff| over boxes + landmarks of matched pairs (pixels)
    max_score_diff: float
    min_iou: float
    mean_iou: float

    def line(self) -> str:
        return (f"{self.name}: reference {self.reference} faces, other {self.candidate}, matched {self.matched}, "
                f"max coord diff {self.max_coord_diff:.2e} px, max score diff {self.max_score_diff:.2e}, "
                f"IoU min {self.min_iou:.4f} mean {self.mean_iou:.4f}")


def compare_detections(name: str, reference: np.ndarray, candidate: np.ndarray) -> DetectionDiff:
    ref_i, cand_i, ious = match_detections(reference, candidate)
    if len(ref_i):
        coords = np.abs(np.delete(reference[ref_i], 4, 1) - np.delete(candidate[cand_i], 4, 1)).max()
        scores = np.abs(reference[ref_i, 4] - candidate[cand_i, 4]).max()
        min_iou, mean_iou = float(ious.min()), float(ious.mean())
    else:
        coords = scores = 0.0
        min_iou = mean_iou = 1.0 if len(reference) == len(candidate) == 0 else 0.0
    return DetectionDiff(name, len(reference), len(candidate), len(ref_i), float(coords), float(scores), min_iou,
                         mean_iou)


def run_detection_graph(session, image_bgr: np.ndarray, score_threshold: float) -> np.ndarray:
    """faces (K, 15) of one image at its own size (scale 1), from a detection-graph session."""
    x = preprocess(image_bgr).unsqueeze(0).numpy()
    return session.run([FACES_NAME], {INPUT_NAME: x, SCORE_THRESHOLD_NAME: np.array(score_threshold, np.float32)})[0]


def check_detection_parity(model: nn.Module, path: PathLike, images: Dict[str, np.ndarray],
                           score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> List[DetectionDiff]:
    """Detection graph vs the PyTorch pipeline (FaceDetector: preprocess, decode + NMS) per image."""
    from utils.detector import FaceDetector

    settings = json.loads(read_metadata(path).get(DETECTION_KEY, "{}"))
    detector = FaceDetector(model, backend="torch", conf=score_threshold,
                            nms=settings.get("nms_threshold", DEFAULT_NMS_THRESHOLD),
                            top_k=settings.get("top_k", DEFAULT_TOP_K),
                            keep_top_k=settings.get("keep_top_k", DEFAULT_KEEP_TOP_K))
    session = ort_session(path)
    return [compare_detections(name, detector.detect_array(image), run_detection_graph(session, image, score_threshold))
            for name, image in images.items()]


def detection_graph_ok(diff: DetectionDiff, coord_tol: float = 1e-2, score_tol: float = 1e-4) -> bool:
    """Same faces (count and one-to-one matches) with coordinates/scores within tolerance."""
    return (diff.reference == diff.candidate == diff.matched and diff.max_coord_diff <= coord_tol
            and diff.max_score_diff <= score_tol)


# ---------------------------------------------------------------------------------------------
# Deployment package


def deployment_config(model: nn.Module, score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                      nms_threshold: float = DEFAULT_NMS_THRESHOLD, top_k: int = DEFAULT_TOP_K,
                      keep_top_k: int = DEFAULT_KEEP_TOP_K, opset: int = DEFAULT_OPSET) -> Dict:
    """Everything a runtime needs to feed the graphs and read their outputs (JSON-ready)."""
    config: ModelConfig = model.config
    return {
        "model_name": config.name,
        "arch": config.arch,
        "parameters": count_parameters(model),
        "has_deformable_conv": config.deformable,
        "opset": opset,
        "mean_bgr": list(MEAN_BGR),
        "variance": list(config.variance),
        "min_sizes": [list(m) for m in config.min_sizes],
        "steps": list(config.steps),
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, "height", "width"],
                  "channels": "BGR", "normalization": "pixel - mean_bgr, no scaling",
                  "min_side": MIN_SIDE},
        "raw_graph": {"file": "model.onnx",
                      "outputs": {OUTPUT_NAMES[0]: ["batch", "priors", 4], OUTPUT_NAMES[1]: ["batch", "priors", 2],
                                  OUTPUT_NAMES[2]: ["batch", "priors", 10]}},
        "detection_graph": {"file": "model_postprocess.onnx", "batch": 1,
                            "inputs": {INPUT_NAME: [1, 3, "height", "width"], SCORE_THRESHOLD_NAME: []},
                            "outputs": {FACES_NAME: ["faces", 15]},
                            "columns": ["x1", "y1", "x2", "y2", "score"]
                            + [f"l{i}{a}" for i in range(5) for a in "xy"]},
        "thresholds": {"score": score_threshold, "nms_iou": nms_threshold, "top_k": top_k, "keep_top_k": keep_top_k},
    }


def _fill_template(name: str, values: Dict[str, str]) -> str:
    return string.Template((TEMPLATE_DIR / name).read_text()).substitute(values)


def _runtime_note(config: ModelConfig, onnx_path: PathLike, opset: int) -> str:
    """README paragraph on which runtimes can run the graphs (DeformConv is the risk, spec 4)."""
    import onnxruntime

    if not config.deformable:
        return ("This model has no deformable convolutions: `model.onnx` uses only common ONNX ops (Conv, "
                "pooling, Resize, Softmax, ...) and `model_postprocess.onnx` adds `NonMaxSuppression`, `TopK` and "
                f"`NonZero`. Any runtime with opset {opset} support should run it; check yours with "
                "`usage_example.py`.")
    return (f"This model contains **deformable convolutions** (ONNX `DeformConv`, opset >= {MIN_DEFORM_OPSET}, "
            f"{op_counts(onnx_path).get('DeformConv', 0)} nodes). ONNX Runtime's CPU execution provider runs "
            f"them (checked with ONNX Runtime {onnxruntime.__version__}). Other runtimes and execution providers "
            "(ONNX Runtime's CUDA, TensorRT or mobile builds, TensorRT itself, OpenVINO, TFLite converters, older "
            "ONNX Runtime releases) may not implement DeformConv: check your runtime before you rely on it, for "
            "example by running `usage_example.py` there. The graphs were never made DeformConv-free by "
            "replacing the deformable convs with plain ones, which would silently change the model.")


def write_deployment_package(model: nn.Module, out_dir: PathLike, onnx_path: PathLike, detection_path: PathLike,
                             score_threshold: float = DEFAULT_SCORE_THRESHOLD, opset: int = DEFAULT_OPSET,
                             int8_path: Optional[PathLike] = None, parity_report: Optional[str] = None) -> Path:
    """Assemble out_dir: model.pth, model.onnx, model_postprocess.onnx, deployment_config.json,
    usage_example.py and README.md, plus model_int8.onnx when `int8_path` is given.
    `parity_report` (the `format_parity` table) is quoted in the README. Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(read_metadata(detection_path).get(DETECTION_KEY, "{}"))
    config = deployment_config(model, score_threshold, settings.get("nms_threshold", DEFAULT_NMS_THRESHOLD),
                               settings.get("top_k", DEFAULT_TOP_K), settings.get("keep_top_k", DEFAULT_KEEP_TOP_K),
                               opset)
    save_checkpoint(out / "model.pth", model)
    (out / "model.pth").chmod(0o644)  # written via a private temp file; a package is for sharing
    files = {"model.onnx": onnx_path, "model_postprocess.onnx": detection_path}
    if int8_path is not None:
        files["model_int8.onnx"] = int8_path
        config["int8_graph"] = {"file": "model_int8.onnx", "format": "QDQ, per-channel int8 weights, uint8 "
                                "activations", "inputs_outputs": "as model.onnx"}
    for name, source in files.items():
        if Path(source).resolve() != (out / name).resolve():
            shutil.copyfile(source, out / name)
    (out / "deployment_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(TEMPLATE_DIR / "usage_example.py", out / "usage_example.py")
    m: ModelConfig = model.config
    thresholds = config["thresholds"]
    values = {
        "model_name": m.name, "arch": m.arch, "parameters": f"{config['parameters']:,}", "opset": str(opset),
        "mean": ", ".join(f"{v:g}" for v in MEAN_BGR), "variance": ", ".join(f"{v:g}" for v in m.variance),
        "score_threshold": f"{score_threshold:g}", "nms_threshold": f"{thresholds['nms_iou']:g}",
        "top_k": str(thresholds["top_k"]), "keep_top_k": str(thresholds["keep_top_k"]),
        "runtime_note": _runtime_note(m, onnx_path, opset),
        "parity_note": (
            "ONNX Runtime (CPU) vs PyTorch at export time, max absolute difference per output:\n\n```\n"
            + parity_report + "\n```" if parity_report else
            "The export was not compared with PyTorch (`export_dynamic_onnx.py --test_sizes` does that)."),
        "extra_files": ("| `model_int8.onnx` | static INT8 (QDQ) copy of `model.onnx`: smaller, but its detections "
                        "drift from FP32 — measure on your data before using it |\n" if int8_path else ""),
    }
    (out / "README.md").write_text(_fill_template("README.md", values))
    return out


# ---------------------------------------------------------------------------------------------
# INT8 quantization and timing


def find_images(folder: PathLike) -> List[Path]:
    """Image files (jpg/png/bmp/webp) in `folder` and its subfolders, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"calibration image folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images


def read_image(path: PathLike) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ExportError(f"cannot read image {path}")
    return image


def fixed_size_input(image_bgr: np.ndarray, size: int) -> np.ndarray:
    """(1, 3, size, size) float32: longer side resized to `size`, zero-padded bottom/right after
    mean removal (the padding preprocess_batch uses)."""
    scale = resize_scale(image_bgr.shape[0], image_bgr.shape[1], None, size)
    chw = preprocess(image_bgr, scale)
    out = torch.zeros(1, 3, size, size)
    out[0, :, : chw.shape[1], : chw.shape[2]] = chw[:, :size, :size]
    return out.numpy()


def _calibration_reader(images: Sequence[Path], size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):
        """Feeds each calibration image once, preprocessed like inference."""

        def __init__(self) -> None:
            self._paths = iter(images)

        def get_next(self):
            path = next(self._paths, None)
            return None if path is None else {INPUT_NAME: fixed_size_input(read_image(path), size)}

    return ImageReader()


@dataclass
class QuantizationReport:
    path: Path
    fp32_bytes: int
    int8_bytes: int
    calibration_images: int
    float_ops: Dict[str, int] = field(default_factory=dict)  # ops left in float (not quantizable)


def quantize_int8(fp32_path: PathLike, out_path: PathLike, calibration_images: Sequence[Path],
                  image_size: int = 640, per_channel: bool = True) -> QuantizationReport:
    """Static INT8 (QDQ, per-channel weights, MinMax calibration) of a raw graph.

    onnxruntime.quantization has no DeformConv quantizer, so V1's DeformConv nodes and the
    BatchNormalization right after each (which ORT cannot fold into a DeformConv) stay float32:
    they read dequantized inputs and the next quantized op re-quantizes their output.
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
        quantize_static(
            str(prepared), str(out_path), _calibration_reader(calibration_images, image_size),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=per_channel, nodes_to_exclude=_float_nodes(prepared),
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types
        raise ExportError(f"INT8 quantization of {fp32_path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        prepared.unlink(missing_ok=True)
    set_metadata(out_path, read_metadata(fp32_path))
    float_ops = {}
    for op in _float_node_types(out_path):
        float_ops[op] = float_ops.get(op, 0) + 1
    return QuantizationReport(out_path, fp32_path.stat().st_size, out_path.stat().st_size,
                              len(calibration_images), float_ops)


def _float_candidates(path: Path) -> List:
    """DeformConv nodes and the BatchNormalization nodes that read a DeformConv output."""
    import onnx

    nodes = onnx.load(str(path)).graph.node
    deform_outputs = {n.output[0] for n in nodes if n.op_type == "DeformConv"}
    return [n for n in nodes if n.op_type == "DeformConv"
            or (n.op_type == "BatchNormalization" and n.input[0] in deform_outputs)]


def _float_nodes(path: Path) -> List[str]:
    return [n.name for n in _float_candidates(path)]


def _float_node_types(path: Path) -> List[str]:
    return [n.op_type for n in _float_candidates(path)]


def median_latency_ms(fn, runs: int = 30, warmup: int = 5) -> float:
    """Median wall time of fn() in milliseconds after `warmup` untimed calls (utils.timing)."""
    return measure_latency(fn, runs, warmup).median_ms


def onnx_latency_ms(path: PathLike, size: Tuple[int, int], threads: int = 1, runs: int = 30) -> float:
    session = ort_session(path, threads)
    x = {INPUT_NAME: np.random.default_rng(0).uniform(-120, 150, (1, 3, *size)).astype(np.float32)}
    return median_latency_ms(lambda: session.run(None, x), runs)


def torch_latency_ms(model: nn.Module, size: Tuple[int, int], threads: int = 1, runs: int = 30) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.rand(1, 3, *size) * 255 - 117
    try:
        with torch.inference_mode():
            return median_latency_ms(lambda: model(x), runs)
    finally:
        torch.set_num_threads(previous)


def detection_drift(fp32_path: PathLike, int8_path: PathLike, images: Dict[str, np.ndarray],
                    score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> List[DetectionDiff]:
    """FP32 vs INT8 raw graphs through the same FaceDetector decode + NMS, per image."""
    from utils.detector import FaceDetector

    fp32 = FaceDetector(str(fp32_path), backend="onnx", conf=score_threshold)
    int8 = FaceDetector(str(int8_path), backend="onnx", conf=score_threshold)
    return [compare_detections(name, fp32.detect_array(im), int8.detect_array(im)) for name, im in images.items()]
