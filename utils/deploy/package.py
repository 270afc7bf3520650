"""The deployment package: graphs, checkpoint, config JSON, a usage example and a README."""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Dict, Optional, Tuple

from torch import nn

from data.config import MEAN_BGR, ModelConfig
from models.featherface import count_parameters
from utils.checkpoint import save_checkpoint
from utils.deploy.export import (DEFAULT_OPSET, FACES_NAME, MIN_DEFORM_OPSET, MIN_SIDE, SCORE_THRESHOLD_NAME,
                                 PathLike, detection_settings, fixed_input_size, op_counts)
from utils.inference.detector import INPUT_NAME, OUTPUT_NAMES
from utils.inference.postprocess import DEMO_POSTPROCESS

TEMPLATE_DIR = Path(__file__).resolve().parent / "template"
CONFIG_FILE = "deployment_config.json"
PACKAGE_FILES = ("model.pth", "model.onnx", "model_postprocess.onnx", "model_int8.onnx", CONFIG_FILE,
                 "usage_example.py", "README.md")


def not_a_package(folder: PathLike) -> Optional[str]:
    """Why the existing, non-empty `folder` may not be replaced by a new deployment package, or None
    when it is an earlier package holding nothing but package files (which the new one replaces)."""
    names = {p.name for p in Path(folder).iterdir()}
    if CONFIG_FILE not in names:
        return f"it is not a deployment package (no {CONFIG_FILE})"
    foreign = sorted(names - set(PACKAGE_FILES) - {"__pycache__"})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds files that are not part of a deployment package ({shown})"
    return None


def deployment_config(model: nn.Module, score_threshold: float = DEMO_POSTPROCESS.conf_threshold,
                      nms_threshold: float = DEMO_POSTPROCESS.nms_threshold, top_k: int = DEMO_POSTPROCESS.top_k,
                      keep_top_k: int = DEMO_POSTPROCESS.keep_top_k, opset: int = DEFAULT_OPSET,
                      fixed_size: Optional[Tuple[int, int]] = None) -> Dict:
    """Everything a runtime needs to feed the graphs and read their outputs (JSON-ready). fixed_size:
    the (H, W) of graphs exported with --static_size, which take letterboxed images."""
    config: ModelConfig = model.config
    height, width = fixed_size or ("height", "width")
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
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, height, width],
                  "channels": "BGR", "normalization": "pixel - mean_bgr, no scaling",
                  "min_side": MIN_SIDE, "fixed_size": list(fixed_size) if fixed_size else None,
                  "letterbox": ("fixed_size: resize by min(H / h, W / w), then pad bottom/right with 0 after mean "
                                "removal; divide output coordinates by that scale") if fixed_size else None},
        "raw_graph": {"file": "model.onnx",
                      "outputs": {OUTPUT_NAMES[0]: ["batch", "priors", 4], OUTPUT_NAMES[1]: ["batch", "priors", 2],
                                  OUTPUT_NAMES[2]: ["batch", "priors", 10]}},
        "detection_graph": {"file": "model_postprocess.onnx", "batch": 1,
                            "inputs": {INPUT_NAME: [1, 3, height, width], SCORE_THRESHOLD_NAME: []},
                            "outputs": {FACES_NAME: ["faces", 15]},
                            "columns": ["x1", "y1", "x2", "y2", "score"]
                            + [f"l{i}{a}" for i in range(5) for a in "xy"]},
        "thresholds": {"score": score_threshold, "nms_iou": nms_threshold, "top_k": top_k, "keep_top_k": keep_top_k},
    }


def _fill_template(name: str, values: Dict[str, str]) -> str:
    return string.Template((TEMPLATE_DIR / name).read_text()).substitute(values)


def _runtime_note(config: ModelConfig, onnx_path: PathLike, opset: int) -> str:
    """README paragraph on which runtimes can run the graphs (DeformConv is the risk, docs/ARCHITECTURE.md §4)."""
    import onnxruntime

    if not config.deformable:
        return ("This model has no deformable convolutions: `model.onnx` uses only common ONNX ops (Conv, "
                "pooling, Resize, Softmax, ...) and `model_postprocess.onnx` adds `NonMaxSuppression`, `TopK` and "
                f"`NonZero`. Any runtime with opset {opset} support should run it; check yours with "
                "`usage_example.py`.")
    deform_nodes = op_counts(onnx_path).get("DeformConv", 0)
    if deform_nodes == 0:
        return ("This model's **deformable convolutions** are built from standard ONNX ops (`Conv`, `GridSample` "
                "(opset >= 16), `Mul`, `ReduceSum`; export option `--deform_form gridsample`), so runtimes without "
                "`DeformConv` (OpenVINO, TensorRT, mobile builds) can run it; the export checked that it gives the "
                "same outputs as PyTorch. In ONNX Runtime's CPU provider the default export (DeformConv) is faster.")
    return (f"This model contains **deformable convolutions** (ONNX `DeformConv`, opset >= {MIN_DEFORM_OPSET}, "
            f"{deform_nodes} nodes). ONNX Runtime's CPU execution provider runs "
            f"them (checked with ONNX Runtime {onnxruntime.__version__}). Other runtimes and execution providers "
            "(ONNX Runtime's CUDA, TensorRT or mobile builds, TensorRT itself, OpenVINO, TFLite converters, older "
            "ONNX Runtime releases) may not implement DeformConv: check your runtime before you rely on it, for "
            "example by running `usage_example.py` there. The graphs were never made DeformConv-free by "
            "replacing the deformable convs with plain ones, which would silently change the model.")


def write_deployment_package(model: nn.Module, out_dir: PathLike, onnx_path: PathLike, detection_path: PathLike,
                             score_threshold: float = DEMO_POSTPROCESS.conf_threshold, opset: int = DEFAULT_OPSET,
                             int8_path: Optional[PathLike] = None, parity_report: Optional[str] = None) -> Path:
    """Assemble out_dir: model.pth, model.onnx, model_postprocess.onnx, deployment_config.json,
    usage_example.py and README.md, plus model_int8.onnx when `int8_path` is given.
    `parity_report` (the `format_parity` table) is quoted in the README. Returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = detection_settings(detection_path)
    fixed_size = fixed_input_size(onnx_path)
    config = deployment_config(model, score_threshold, settings.nms_threshold, settings.top_k, settings.keep_top_k,
                               opset, fixed_size)
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
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(TEMPLATE_DIR / "usage_example.py", out / "usage_example.py")
    m: ModelConfig = model.config
    thresholds = config["thresholds"]
    values = {
        "model_name": m.name, "arch": m.arch, "parameters": f"{config['parameters']:,}", "opset": str(opset),
        "mean": ", ".join(f"{v:g}" for v in MEAN_BGR), "variance": ", ".join(f"{v:g}" for v in m.variance),
        "score_threshold": f"{score_threshold:g}", "nms_threshold": f"{thresholds['nms_iou']:g}",
        "top_k": str(thresholds["top_k"]), "keep_top_k": str(thresholds["keep_top_k"]),
        "input_size": (f"fixed input size {fixed_size[0]}x{fixed_size[1]} (images are letterboxed into it), dynamic "
                       "batch" if fixed_size else "dynamic batch/height/width"),
        "size_note": (
            f"H and W are fixed at {fixed_size[0]}x{fixed_size[1]} (exported with `--static_size`; the batch stays "
            f"dynamic), so letterbox each image into that size: resize it by `s = min({fixed_size[0]} / h, "
            f"{fixed_size[1]} / w)`, pad bottom/right with 0 after mean removal, and divide the coordinates that "
            f"come back by `s` (`usage_example.py` does this)." if fixed_size else
            "Any H, W >= 32 works; no resizing or padding to a multiple of 32 is needed. Boxes come back in the "
            "pixels of the tensor you fed, so if you resize an image by a factor `s`, divide the coordinates by `s`."),
        "max_size_note": ("`--max_size` does not apply to this package (every photo is letterboxed into the graph's "
                          "fixed size)" if fixed_size else "`--max_size` downscales large photos first (coordinates "
                          "are still returned in original pixels)"),
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
