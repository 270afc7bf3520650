"""Export a FeatherFace checkpoint to ONNX with dynamic batch/height/width (or a fixed size), check it against
PyTorch, and optionally build a detection graph (decode + NMS inside), an INT8 copy and a
self-contained deployment package.

    python export_dynamic_onnx.py --weights weights/featherface_v2/last.pth --test_sizes --deployment_package
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from data.config import CONFIGS
from models.featherface import count_parameters
from utils.deploy.export import (DEFAULT_OPSET, ExportError, MIN_DEFORM_OPSET, check_onnx_file, check_opset,
                                 export_graphs, export_onnx, op_counts, require_exporter)
from utils.deploy.package import not_a_package, write_deployment_package
from utils.deploy.parity import verify_export
from utils.deploy.quantize import find_calibration_images, quantize_and_report, sample_images
from utils.deploy.rewrites import DEFORM_FORMS
from utils.deploy.staging import staged
from utils.errors import CheckpointError, FeatherFaceError, positive_int, run_cli, unit_float
from utils.inference.postprocess import DEMO_POSTPROCESS

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
    p.add_argument("--score_threshold", type=unit_float, default=DEMO_POSTPROCESS.conf_threshold,
                   help="default face score of the package and of the detection checks")
    p.add_argument("--nms_threshold", type=unit_float, default=DEMO_POSTPROCESS.nms_threshold,
                   help="NMS IoU, fixed in the detection graph")
    p.add_argument("--top_k", type=positive_int, default=DEMO_POSTPROCESS.top_k, help="best anchors passed to NMS in the graph")
    p.add_argument("--keep_top_k", type=positive_int, default=DEMO_POSTPROCESS.keep_top_k, help="most faces the graph returns")
    p.add_argument("--quantize", type=str, default=None, choices=["int8"],
                   help="also write a static INT8 (QDQ) copy <output>_int8.onnx")
    p.add_argument("--calibration_images", type=str, default=None, help="folder of images for INT8 calibration")
    p.add_argument("--latency_runs", type=positive_int, default=30, help="timed runs per latency measurement (median)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random_init")
    p.add_argument("--deform_form", default="auto", choices=DEFORM_FORMS,
                   help="deformable convs (V1): auto = DeformConv, projected where that samples fewer values "
                        "(fastest in ONNX Runtime); gridsample = standard ops only, no DeformConv (OpenVINO, "
                        "TensorRT, mobile runtimes)")
    p.add_argument("--pad_stem", action="store_true",
                   help="widen the 8-channel stem to 16 zero channels (same outputs): faster in ONNX Runtime "
                        "on x86 with AVX-512, slower without its 16-channel blocked layout (README, Speed)")
    p.add_argument("--static_size", action="store_true",
                   help="fix H and W at --image_size, the batch stays dynamic (faster in ONNX Runtime); FaceDetector "
                        "and the package's usage example letterbox every image into that size")
    p.add_argument("--no_rewrites", action="store_true",
                   help="trace the model as built instead of its deployment form (same outputs, slower graph)")
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


def main(args: argparse.Namespace) -> dict:
    model = load(args)
    config = model.config
    graph = dict(rewrite=not args.no_rewrites, deform=args.deform_form, stem_padded=args.pad_stem,
                 static_size=args.static_size)
    check_opset(config, args.opset, args.deform_form)
    if args.quantize and not args.calibration_images:
        raise FeatherFaceError("--quantize int8 needs --calibration_images DIR")
    calibration = find_calibration_images(args.calibration_images) if args.quantize else []
    require_exporter()
    default = Path(args.weights).with_suffix(".onnx") if args.weights else Path(f"weights/{config.name}_random_init.onnx")
    raw = Path(args.output) if args.output else default
    package = None if args.deployment_package is None else Path(args.deployment_package or f"deployment/{config.name}")
    detection = raw.with_name(raw.stem + "_postprocess.onnx") if (args.with_postprocess or package) else None
    int8 = raw.with_name(raw.stem + "_int8.onnx") if args.quantize else None
    targets = {"onnx": raw, "postprocess": detection, "int8": int8, "package": package}
    targets = {k: v for k, v in targets.items() if v is not None}
    form = "as built" if args.no_rewrites else (f"deployment rewrites, deformable convs: {args.deform_form}"
                                                + (", stem padded to 16 channels" if args.pad_stem else ""))
    print(f"exporting {config.name} ({count_parameters(model):,} parameters), opset {args.opset}, traced at "
          f"{args.image_size}x{args.image_size}{' (fixed)' if args.static_size else ''}, {form}", flush=True)
    # Targets are checked first (no input overwritten, no foreign folder replaced), everything is written to
    # hidden folders beside them and moved into place only after every check passed: a failure leaves nothing.
    with staged(list(targets.values()), [package], [args.weights], check_folder=not_a_package) as paths:
        out = dict(zip(targets, paths))
        if detection:
            export_graphs(model, out["onnx"], out["postprocess"], args.image_size, args.opset, args.nms_threshold,
                          args.top_k, args.keep_top_k, **graph)
        else:
            export_onnx(model, out["onnx"], args.image_size, args.opset, **graph)
        for key in ("onnx", "postprocess"):
            if key in out:
                check_onnx_file(out[key])
                print(f"{targets[key].name}: {out[key].stat().st_size / 1e6:.2f} MB, "
                      f"{op_counts(out[key]).get('DeformConv', 0)} DeformConv nodes, onnx.checker ok")
        failures, parity_report = [], None
        if args.test_sizes:
            # An untrained network ties scores everywhere: its detection comparison cannot fail the export.
            failures, parity_report = verify_export(model, out["onnx"], out.get("postprocess"),
                                                    sample_images(SAMPLE_IMAGES), args.score_threshold,
                                                    detections_decide=not args.random_init)
        int8_path = out.get("int8")
        if int8_path:
            drift_images = sample_images(SAMPLE_IMAGES) or sample_images(Path(args.calibration_images))
            quantize_and_report(out["onnx"], int8_path, calibration, args.image_size, drift_images,
                                args.score_threshold, args.latency_runs)
        if package:
            write_deployment_package(model, out["package"], out["onnx"], out["postprocess"], args.score_threshold,
                                     args.opset, int8_path, parity_report)
        if failures:
            raise ExportError("ONNX Runtime and PyTorch disagree beyond tolerance: " + "; ".join(failures)
                              + "; nothing was written")
    for key, path in targets.items():
        print(f"wrote {path}" + ("/" if key == "package" else ""))
    if package:
        print(f"deployment package in {package}/ (try: python {package}/usage_example.py IMAGE --output out.jpg)")
    return {"postprocess": None, **targets}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
