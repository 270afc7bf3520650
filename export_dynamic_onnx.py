"""Export a FeatherFace checkpoint to ONNX with dynamic batch/height/width, check it against
PyTorch, and optionally build a detection graph (decode + NMS inside), an INT8 copy and a
self-contained deployment package.

    python export_dynamic_onnx.py --weights weights/v2.pth --test_sizes --deployment_package
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.config import CONFIGS
from models.featherface import count_parameters
from utils.deploy.export import (DEFAULT_KEEP_TOP_K, DEFAULT_NMS_THRESHOLD, DEFAULT_OPSET, DEFAULT_SCORE_THRESHOLD,
                                 DEFAULT_TOP_K, ExportError, MIN_DEFORM_OPSET, check_onnx_file, check_opset,
                                 export_graphs, export_onnx, op_counts, require_exporter)
from utils.deploy.package import write_deployment_package
from utils.deploy.parity import check_detection_parity, check_parity, detection_graph_ok, format_parity
from utils.deploy.quantize import detection_drift, find_images, onnx_latency_ms, quantize_int8, read_image
from utils.errors import CheckpointError, FeatherFaceError, run_cli

SAMPLE_IMAGES = Path(__file__).resolve().parent / "data" / "sample" / "images"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export FeatherFace to ONNX (dynamic shapes), verify, quantize, package")
    p.add_argument("--model", type=str, default=None, choices=sorted(CONFIGS),
                   help="model name; read from the checkpoint when omitted (a different one is an error)")
    p.add_argument("--weights", type=str, default=None, help="FeatherFace checkpoint (.pth) to export")
    p.add_argument("--random_init", action="store_true", help="export an untrained --model on purpose (no weights)")
    p.add_argument("--output", type=str, default=None, help="ONNX file (default: the checkpoint path with .onnx)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (>= {MIN_DEFORM_OPSET} for V1 models: DeformConv)")
    p.add_argument("--image_size", type=int, default=640, help="square size of the example input used for tracing")
    p.add_argument("--test_sizes", action="store_true",
                   help="onnx.checker, then ONNX Runtime vs PyTorch at several sizes and batches "
                        "(non-zero exit on mismatch)")
    p.add_argument("--with_postprocess", action="store_true",
                   help="also write <output>_postprocess.onnx: image -> faces (decode + NMS in the graph, batch 1)")
    p.add_argument("--deployment_package", type=str, nargs="?", const="", default=None, metavar="DIR",
                   help="write a deployment package (default DIR: deployment/<model name>/)")
    p.add_argument("--score_threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                   help="default face score of the package and of the detection checks")
    p.add_argument("--nms_threshold", type=float, default=DEFAULT_NMS_THRESHOLD,
                   help="NMS IoU, fixed in the detection graph")
    p.add_argument("--top_k", type=int, default=DEFAULT_TOP_K, help="best anchors passed to NMS in the graph")
    p.add_argument("--keep_top_k", type=int, default=DEFAULT_KEEP_TOP_K, help="most faces the graph returns")
    p.add_argument("--quantize", type=str, default=None, choices=["int8"],
                   help="also write a static INT8 (QDQ) copy <output>_int8.onnx")
    p.add_argument("--calibration_images", type=str, default=None, help="folder of images for INT8 calibration")
    p.add_argument("--latency_runs", type=int, default=30, help="timed runs per latency measurement (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random_init")
    return p


def load(args: argparse.Namespace) -> torch.nn.Module:
    """The model to export: a checkpoint (checked against --model) or a deliberate random init."""
    from models import build_model
    from utils.checkpoint import load_model

    if args.weights and args.random_init:
        raise FeatherFaceError("give either --weights or --random_init, not both")
    if args.weights:
        model, _ = load_model(args.weights)
        if args.model is not None and args.model != model.config.name:
            raise CheckpointError(f"{args.weights} holds a '{model.config.name}' model, but --model {args.model} was "
                                  f"given; drop --model or pass a {args.model} checkpoint")
        return model
    if not args.random_init:
        raise FeatherFaceError("no weights: pass --weights CHECKPOINT, or --random_init --model NAME to export an "
                               "untrained model on purpose")
    if args.model is None:
        raise FeatherFaceError("--random_init needs --model NAME")
    print(f"warning: exporting an UNTRAINED {args.model} model (--random_init); its detections are meaningless",
          file=sys.stderr)
    torch.manual_seed(args.seed)
    return build_model(args.model).eval()


def sample_images(folder: Path, limit: int = 3) -> dict:
    paths = find_images(folder)[:limit] if folder.is_dir() else []
    return {p.name: read_image(p) for p in paths}


def main(args: argparse.Namespace) -> dict:
    model = load(args)
    config = model.config
    check_opset(config, args.opset)
    calibration = find_images(args.calibration_images) if args.quantize else []
    if args.quantize and not args.calibration_images:
        raise FeatherFaceError("--quantize int8 needs --calibration_images DIR")
    require_exporter()
    default = Path(args.weights).with_suffix(".onnx") if args.weights else Path(f"weights/{config.name}_random_init.onnx")
    raw = Path(args.output) if args.output else default
    package = None if args.deployment_package is None else Path(args.deployment_package or f"deployment/{config.name}")
    detection = raw.with_name(raw.stem + "_postprocess.onnx") if (args.with_postprocess or package) else None
    print(f"exporting {config.name} ({count_parameters(model):,} parameters), opset {args.opset}, traced at "
          f"{args.image_size}x{args.image_size}", flush=True)
    if detection:
        export_graphs(model, raw, detection, args.image_size, args.opset, args.nms_threshold, args.top_k,
                         args.keep_top_k)
    else:
        export_onnx(model, raw, args.image_size, args.opset)
    written = {"onnx": raw, "postprocess": detection}
    for path in filter(None, (raw, detection)):
        check_onnx_file(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {op_counts(path).get('DeformConv', 0)} DeformConv "
              "nodes), onnx.checker ok")

    failures, parity_report = [], None
    if args.test_sizes:
        rows = check_parity(model, raw)
        parity_report = format_parity(rows)
        print(parity_report)
        failures += [f"raw graph at {r.shape}" for r in rows if not r.ok]
        images = sample_images(SAMPLE_IMAGES)
        if detection and images:
            # An untrained network gives near-identical scores everywhere, so NMS keeps an arbitrary
            # subset of tied boxes: the comparison is then shown but cannot fail the export.
            note = " (untrained: tied scores, informational only)" if args.random_init else ""
            print(f"detection graph vs PyTorch decode + NMS (score > {args.score_threshold}){note}:")
            for diff in check_detection_parity(model, detection, images, args.score_threshold):
                print("  " + diff.line())
                if not (args.random_init or detection_graph_ok(diff)):
                    failures.append(f"detection graph on {diff.name}")

    int8_path = None
    if args.quantize:
        int8 = quantize_int8(raw, raw.with_name(raw.stem + "_int8.onnx"), calibration, args.image_size)
        written["int8"] = int8_path = int8.path
        print(f"wrote {int8.path}: {int8.fp32_bytes / 1e6:.2f} MB -> {int8.int8_bytes / 1e6:.2f} MB, calibrated on "
              f"{int8.calibration_images} images" + (f"; left in float32: {int8.float_ops}" if int8.float_ops else ""))
        size = (args.image_size, args.image_size)
        for threads in (1, 2):
            fp32_ms = onnx_latency_ms(raw, size, threads, args.latency_runs)
            int8_ms = onnx_latency_ms(int8.path, size, threads, args.latency_runs)
            print(f"  latency {size[0]}x{size[1]}, {threads} thread(s): FP32 {fp32_ms:.1f} ms, INT8 {int8_ms:.1f} ms "
                  f"(median of {args.latency_runs})")
        drift_images = sample_images(SAMPLE_IMAGES) or sample_images(Path(args.calibration_images))
        for diff in detection_drift(raw, int8.path, drift_images, args.score_threshold):
            print("  INT8 vs FP32 " + diff.line())

    if package:
        write_deployment_package(model, package, raw, detection, args.score_threshold, args.opset, int8_path,
                                    parity_report)
        written["package"] = package
        print(f"deployment package in {package}/ (try: python {package}/usage_example.py IMAGE --output out.jpg)")
    if failures:
        raise ExportError("ONNX Runtime and PyTorch disagree beyond tolerance: " + "; ".join(failures))
    return written


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
