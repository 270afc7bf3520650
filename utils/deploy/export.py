"""ONNX export of FeatherFace: the dynamic-shape raw graph and the detection graph.

Two graphs are exported, both with the dynamo exporter (`torch.onnx.export(dynamo=True)`: the
only exporter that maps `torchvision::deform_conv2d` to the standard ONNX DeformConv op,
opset >= 19; see docs/ARCHITECTURE.md):

- raw graph: `input` (B, 3, H, W) float32 BGR minus mean -> `bbox_regressions` (B, N, 4),
  `classifications` (B, N, 2) softmax, `landmarks` (B, N, 10); batch, height and width dynamic.
  The model config is stored as JSON in the metadata entry `featherface_model_config`, so
  `FaceDetector(path, backend="onnx")` rebuilds priors and decoding from the file alone.
- detection graph: `input` (1, 3, H, W) and `score_threshold` (scalar) -> `faces` (K, 15)
  [x1, y1, x2, y2, score, 5 x (x, y)] in input pixels, sorted by score. Priors are computed in
  the graph from H and W, then decode, score threshold, top-k and ONNX NonMaxSuppression;
  NMS IoU, top-k and keep-top-k are fixed at export time and recorded in the metadata.

Both graphs are traced from the deployment form of the model (`utils.deploy.rewrites`: BN, fusion
weights, shuffles and heads folded, cheaper CBAM and deformable-conv forms; same outputs) unless
`rewrite=False`. `deform="gridsample"` builds the deformable convs from standard ops only (no
DeformConv node), for runtimes without DeformConv. The form used is recorded in the metadata.

Parity checks live in `utils.deploy.parity`, INT8 in `utils.deploy.quantize`, the deployment
package in `utils.deploy.package`.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from data.config import MEAN_BGR, ModelConfig
from layers.box_utils import decode, decode_landmarks, torchvision_ops
from utils.deploy.rewrites import DEFORM_FORMS, STEM_BLOCK, deploy_model
from utils.inference.detector import INPUT_NAME, ONNX_CONFIG_KEY, OUTPUT_NAMES, ort_session_options
from utils.inference.postprocess import DEMO_POSTPROCESS, PostProcessConfig
from utils.errors import FeatherFaceError

PathLike = Union[str, Path]

SCORE_THRESHOLD_NAME = "score_threshold"
FACES_NAME = "faces"
CONFIG_KEY = ONNX_CONFIG_KEY  # metadata entry holding ModelConfig JSON, read by FaceDetector's OnnxBackend
DETECTION_KEY = "featherface_detection"  # detection graph: its fixed NMS settings (JSON)
GRAPH_FORM_KEY = "featherface_graph_form"  # how the graph was built: rewrites on/off, deformable-conv form (JSON)

DEFAULT_OPSET = 20
MIN_DEFORM_OPSET = 19  # DeformConv entered the ONNX standard in opset 19
MIN_SIDE = 32  # smallest input side the networks accept (one stride-32 cell)
MAX_SIDE = 8192



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


def check_opset(config: ModelConfig, opset: int, deform: str = "auto") -> None:
    """V1 models contain deformable convs, which ONNX has only from opset 19 (DeformConv); the
    standard-op form needs GridSample (opset 16, the dynamo exporter's floor of 18 covers it)."""
    if config.deformable and deform != "gridsample" and opset < MIN_DEFORM_OPSET:
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


def _same_max_pool_onnx(x):
    """ONNX form of models.bifpn.same_max_pool_op, exact for both parities of H and W.

    MaxPool(auto_pad=SAME_UPPER) pads TF-"same" ((0, 1) on an even side, (1, 1) on an odd one) but
    ignores the padded cells, where the model pads with zeros; so the pooled map is raised to
    `border`, 0 at every window that reaches the padding and -inf elsewhere. `border` is that same
    zero-pad-and-pool applied to a one-channel -inf plane of the input's size, so the (B, C, H, W)
    map itself is never padded or copied (the Pad form before it spent about 0.8 ms of a 640x640 v1
    call, 2 threads, in the six padded copies of 52-channel maps, outside ORT's blocked layout).
    """
    import onnx
    from onnxscript import opset18 as op

    pooled, _ = op.MaxPool(x, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    size = op.Shape(x, start=2)
    parity = op.Mod(size, op.Constant(value_ints=[2]))
    zeros, ones = op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[1, 1])
    minus_inf = onnx.helper.make_tensor("minus_inf", onnx.TensorProto.FLOAT, [1], [float("-inf")])
    plane = op.ConstantOfShape(op.Concat(ones, size, axis=0), value=minus_inf)  # (1, 1, H, W)
    border, _ = op.MaxPool(op.Pad(plane, op.Concat(zeros, parity, zeros, ones, axis=0)),
                           kernel_shape=[3, 3], strides=[2, 2])
    return op.Max(pooled, border)


def _translations() -> Dict:
    """Custom ops of the models and their ONNX forms (torch.onnx.export custom_translation_table)."""
    from models.bifpn import same_max_pool_op

    return {same_max_pool_op._opoverload: _same_max_pool_onnx}


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
                custom_translation_table=_translations(),
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; keep its message
            raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {exc}") from exc
    # One self-contained file (the models are < 3 MB): no external-data side file to lose.
    program.save(str(path), external_data=False)


def set_metadata(path: PathLike, entries: Dict[str, str]) -> None:
    """Add or replace metadata_props entries of an ONNX file in place."""
    import onnx

    model = onnx.load(str(path))
    _put_metadata(model, entries)
    onnx.save(model, str(path))


def _put_metadata(model, entries: Dict[str, str]) -> None:
    """Add or replace metadata_props entries of a loaded onnx.ModelProto."""
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def read_metadata(path: PathLike) -> Dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def detection_settings(path: PathLike) -> PostProcessConfig:
    """The NMS, top-k and keep-top-k a detection graph was exported with (its metadata), on the
    deployment defaults (DEMO_POSTPROCESS) for anything it does not record."""
    stored = json.loads(read_metadata(path).get(DETECTION_KEY, "{}"))
    fields = ("nms_threshold", "top_k", "keep_top_k")
    return replace(DEMO_POSTPROCESS, **{k: stored[k] for k in fields if k in stored})


def model_metadata(config: ModelConfig) -> Dict[str, str]:
    """Metadata every exported graph carries: config JSON, preprocessing and output layout."""
    return {
        CONFIG_KEY: json.dumps(config.to_dict()),
        "featherface_mean_bgr": json.dumps(list(MEAN_BGR)),
        "featherface_variance": json.dumps(list(config.variance)),
        "featherface_input": "float32 (B, 3, H, W): BGR pixels minus featherface_mean_bgr, no scaling",
    }


def graph_module(model: nn.Module, rewrite: bool = True, deform: str = "auto", stem_padded: bool = False) -> nn.Module:
    """What gets traced: the deployment form of `model` (utils.deploy.rewrites) or, with
    rewrite=False, the model as built (then `deform` must be "auto": DeformConv as is, and the stem
    not padded). The callers have checked `deform` (`_check_deform`)."""
    if rewrite:
        return deploy_model(model, target="onnx", deform=deform, stem_padded=stem_padded)
    if deform != "auto":
        raise ExportError(f"--deform_form {deform} needs the graph rewrites (drop --no_rewrites)")
    if stem_padded:
        raise ExportError("--pad_stem needs the graph rewrites (drop --no_rewrites)")
    return model.eval()


def _check_deform(deform: str) -> None:
    if deform not in DEFORM_FORMS:
        raise ExportError(f"unknown deformable-conv form {deform!r}; choose one of {', '.join(DEFORM_FORMS)}")


def graph_form(rewrite: bool, deform: str, stem_padded: bool = False,
               fixed_size: Optional[Tuple[int, int]] = None) -> Dict[str, str]:
    return {GRAPH_FORM_KEY: json.dumps({"rewrites": bool(rewrite), "deformable_conv": deform if rewrite else "deformconv",
                                        "stem_channels": STEM_BLOCK if stem_padded else 8,
                                        "input_size": list(fixed_size) if fixed_size else "dynamic"})}


def export_onnx(model: nn.Module, path: PathLike, image_size: Union[int, Sequence[int]] = 640,
                opset: int = DEFAULT_OPSET, rewrite: bool = True, deform: str = "auto",
                stem_padded: bool = False, static_size: bool = False) -> Path:
    """Export the raw-output graph with dynamic batch, height and width (static_size: H and W fixed
    at image_size, the batch still dynamic); returns the path."""
    config: ModelConfig = model.config
    _check_deform(deform)
    check_opset(config, opset, deform)
    h, w = _size_pair(image_size)
    module = graph_module(model, rewrite, deform, stem_padded)
    path = Path(path)
    _export(module, (torch.zeros(1, 3, h, w),), path, [INPUT_NAME], OUTPUT_NAMES, (_input_dims(static_size),), opset)
    form = graph_form(rewrite, deform, stem_padded, (h, w) if static_size else None)
    set_metadata(path, {**model_metadata(config), **form})
    return path


def _input_dims(static_size: bool = False) -> Dict[int, torch.export.Dim]:
    batch = {0: torch.export.Dim("batch", min=1, max=1024)}
    if static_size:
        return batch
    return {**batch, 2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
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
    steps of utils.inference.postprocess.detect_faces with scale 1. Exported once, it is split into the
    raw graph and the (batch-1) detection graph.
    """

    def __init__(self, model: nn.Module, nms_threshold: float = DEMO_POSTPROCESS.nms_threshold,
                 top_k: int = DEMO_POSTPROCESS.top_k, keep_top_k: int = DEMO_POSTPROCESS.keep_top_k) -> None:
        super().__init__()
        torchvision_ops()  # imported now, not while the exporter traces forward()
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
        kept = torchvision_ops().nms(boxes, scores, self.nms_threshold)[: self.keep_top_k]
        faces = torch.cat([boxes[kept], scores[kept, None], points[kept]], dim=1)
        return loc, conf, landm, faces


def export_graphs(model: nn.Module, raw_path: PathLike, detection_path: PathLike,
                  image_size: Union[int, Sequence[int]] = 640, opset: int = DEFAULT_OPSET,
                  nms_threshold: float = DEMO_POSTPROCESS.nms_threshold, top_k: int = DEMO_POSTPROCESS.top_k,
                  keep_top_k: int = DEMO_POSTPROCESS.keep_top_k, rewrite: bool = True, deform: str = "auto",
                  stem_padded: bool = False, static_size: bool = False) -> Tuple[Path, Path]:
    """Export the raw graph and the detection graph from ONE trace of `DetectionGraph`.

    Tracing dominates export time (about 20-40 s on two CPU cores per model), so the combined
    graph is exported once and split with onnx.utils.extract_model: raw graph `input` ->
    bbox_regressions/classifications/landmarks (dynamic batch, H, W); detection graph `input`
    (1, 3, H, W), `score_threshold` -> `faces` (dynamic H, W, batch 1). static_size: H and W fixed at
    image_size in both. Returns both paths.
    """
    import onnx
    import onnx.utils

    config: ModelConfig = model.config
    _check_deform(deform)
    check_opset(config, opset, deform)
    h, w = _size_pair(image_size)
    graph = DetectionGraph(graph_module(model, rewrite, deform, stem_padded), nms_threshold, top_k, keep_top_k).eval()
    raw_path, detection_path = Path(raw_path), Path(detection_path)
    combined = detection_path.with_name(detection_path.stem + "_combined.onnx")
    args = (torch.zeros(1, 3, h, w), torch.tensor(DEMO_POSTPROCESS.conf_threshold))
    try:
        _export(graph, args, combined, [INPUT_NAME, SCORE_THRESHOLD_NAME], [*OUTPUT_NAMES, FACES_NAME],
                (_input_dims(static_size), None), opset)
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        onnx.utils.extract_model(str(combined), str(raw_path), [INPUT_NAME], list(OUTPUT_NAMES))
        onnx.utils.extract_model(str(combined), str(detection_path), [INPUT_NAME, SCORE_THRESHOLD_NAME], [FACES_NAME])
    finally:
        combined.unlink(missing_ok=True)
    form = graph_form(rewrite, deform, stem_padded, (h, w) if static_size else None)
    set_metadata(raw_path, {**model_metadata(config), **form})
    settings = {"nms_threshold": graph.nms_threshold, "top_k": graph.top_k, "keep_top_k": graph.keep_top_k,
                "batch": 1, "output": "faces (K, 15) [x1, y1, x2, y2, score, l0x, l0y, ..., l4x, l4y] in input pixels"}
    detection = onnx.load(str(detection_path))
    _declare_batch_one(detection)
    _put_metadata(detection, {**model_metadata(config), **form, DETECTION_KEY: json.dumps(settings)})
    onnx.save(detection, str(detection_path))
    return raw_path, detection_path


def _declare_batch_one(model) -> None:
    """The detection graph reads image 0 only: declare its input batch as 1 so ORT rejects more."""
    for value in model.graph.input:
        if value.name == INPUT_NAME:
            value.type.tensor_type.shape.dim[0].Clear()
            value.type.tensor_type.shape.dim[0].dim_value = 1


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

    options = ort_session_options(threads)
    if threads:
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fixed_input_size(path: PathLike) -> Optional[Tuple[int, int]]:
    """(H, W) of a graph exported with a fixed input size (--static_size), None for dynamic H and W."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    height, width = (d.dim_value if d.HasField("dim_value") else None for d in dims[2:4])
    return (height, width) if height and width else None


def op_counts(path: PathLike) -> Dict[str, int]:
    """Node count per op type, e.g. {'DeformConv': 15, 'Conv': 101, ...}."""
    import onnx

    counts: Dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
