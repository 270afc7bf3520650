"""WIDER FACE validation: predict with a checkpoint (or .onnx export), then easy / medium / hard AP.

    python test_widerface.py --weights weights/featherface_v1_original.pth \
        --dataset_folder data/widerface/WIDER_val/images --gt_dir data/widerface/ground_truth

Without extra flags this is the published FeatherFace test_widerface.py's protocol, the one its
reported APs come from: original image size, confidence > 0.02, no top-k, NMS 0.4 with its
inclusive-pixel IoU, no keep-top-k, integer boxes x = int(x1), w = int(x2) - int(x1). With the
converted published checkpoint it writes the published script's boxes (tests/test_eval_scripts.py).
Writes `<save_folder>/<event>/<image>.txt` (official layout; resumable), and with --gt_dir (checked
before predicting) the APs (JSON) and the PR curves (PNG) beside the prediction folder.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

import torch

from utils.errors import FeatherFaceError, non_negative_int, run_cli
from utils.evaluation.predict import file_digest
from utils.evaluation.run import add_inference_args, build_detector, output_paths, run_widerface, weights_run_name


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict WIDER FACE val images and compute easy/medium/hard AP.")
    parser.add_argument("--weights", type=str, required=True, help="checkpoint (.pth) or exported model (.onnx)")
    parser.add_argument("--backend", type=str, default="auto", choices=("auto", "torch", "onnx"),
                        help="auto: onnx for a .onnx file, torch otherwise")
    parser.add_argument("--save_folder", type=str, default=None,
                        help="prediction folder (default runs/widerface/<name>/predictions, <name> from the "
                             "weights file: v1.pth -> v1, featherface_v2/last.pth (or best, epoch_N) -> "
                             "featherface_v2_last, v1.onnx -> v1_onnx)")
    parser.add_argument("--results_json", type=str, default=None,
                        help="APs as JSON (default <save_folder>/../results.json)")
    parser.add_argument("--pr_curve", type=str, default=None, help="PR-curve PNG (default beside the JSON)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="CPU threads for torch and ONNX Runtime (default 0: the libraries' own choice)")
    add_inference_args(parser)
    return parser


def main(args: argparse.Namespace) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.weights).is_file():
        raise FeatherFaceError(f"weights not found: {args.weights}")
    save_folder = Path(args.save_folder or Path("runs", "widerface", weights_run_name(args.weights), "predictions"))
    results_json, pr_curve = (Path(p) if p else None for p in (args.results_json, args.pr_curve))
    output_paths(args, save_folder, results_json, pr_curve)  # a bad output path fails before the model loads
    detector = build_detector(args, args.weights, args.backend)
    model_id = f"sha256:{file_digest(args.weights)}"
    return run_widerface(args, detector, Path(args.weights).name, model_id, save_folder, results_json, pr_curve)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
