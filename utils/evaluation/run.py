"""The WIDER FACE val run shared by test_widerface.py and test_v1_v2_comparison.py: its command-line
flags, the detector they describe (the published protocol by default, see utils/evaluation/predict.py)
and predict -> evaluate -> JSON + PR-curve PNG."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import cv2
from torch import nn

from utils.errors import FeatherFaceError, check_output_path, unit_float
from utils.evaluation.pr_plot import save_pr_curves
from utils.evaluation.predict import (NO_LIMIT, evaluate_images, list_images, predict_images,
                                      published_protocol_detector, settings_path)
from utils.evaluation.widerface_eval import load_ground_truth, select_images
from utils.inference.detector import FaceDetector
from utils.inference.postprocess import WIDER_POSTPROCESS

RETINAFACE_RESIZE = (1600, 2150)  # short side / long-side cap of RetinaFace's test_widerface.py
# File names that say which epoch or which of a run's saves, not which model (train.py writes last.pth,
# best.pth and epoch_N.pth into one folder per run).
GENERIC_STEM = re.compile(r"(last|best|final|latest|checkpoint|model|weights)?[_-]?(epoch)?[_-]?\d*", re.IGNORECASE)


def weights_run_name(weights: Union[str, Path]) -> str:
    """A readable name for a run of a weights file, used for its default prediction folder: the file name
    without .pth (featherface_v1_original), after the folder's name where the name is generic
    (featherface_v2/last.pth -> featherface_v2_last) and with any other suffix kept (x.onnx -> x_onnx)."""
    path = Path(weights).absolute()
    name = path.stem
    if GENERIC_STEM.fullmatch(name) and path.parent.name:
        name = f"{path.parent.name}_{name}"
    if path.suffix and path.suffix.lower() != ".pth":
        name += "_" + path.suffix[1:]
    return name


def add_inference_args(parser: argparse.ArgumentParser, require_dataset: bool = True) -> None:
    """Dataset, resize, threshold and TTA flags (shared with test_v1_v2_comparison.py)."""
    parser.add_argument("--dataset_folder", type=str, required=require_dataset, default=None,
                        help="WIDER_val/images (<event>/<image>.jpg)")
    parser.add_argument("--image_list", type=str, default=None,
                        help="only these images (lines 'event/name.jpg'); evaluation is restricted to them")
    parser.add_argument("--gt_dir", type=str, default=None, help="folder with wider_face_val.mat and wider_*_val.mat")
    parser.add_argument("--allow_missing", action="store_true", help="count images without predictions as no faces")
    parser.add_argument("--origin_size", action=argparse.BooleanOptionalAction, default=None,
                        help="run at the original image size (default: yes; --no-origin_size resizes like "
                             "RetinaFace: short side 1600, long side <= 2150)")
    parser.add_argument("--image_size", type=int, default=None, help="resize the short side to this many pixels")
    parser.add_argument("--max_size", type=int, default=None, help="cap on the long side after resizing (pixels)")
    parser.add_argument("--confidence_threshold", type=unit_float, default=WIDER_POSTPROCESS.conf_threshold,
                        help="keep scores above this (0 to 1)")
    parser.add_argument("--nms_threshold", type=unit_float, default=WIDER_POSTPROCESS.nms_threshold,
                        help="NMS IoU threshold (IoU counted in inclusive pixels, as the published script)")
    # The published script has --top_k 5000 / --keep_top_k 750 flags but applies neither. Negative values are
    # refused (by published_protocol_detector, before the model loads).
    parser.add_argument("--top_k", type=int, default=NO_LIMIT,
                        help="best boxes kept before NMS; 0 (default) = all, as the published script (no top-k)")
    parser.add_argument("--keep_top_k", type=int, default=NO_LIMIT,
                        help="boxes kept after NMS; 0 (default) = all, as the published script (no keep-top-k)")
    parser.add_argument("--flip", action="store_true", help="test-time augmentation: add a mirrored pass")
    parser.add_argument("--scales", type=float, nargs="+", default=None,
                        help="test-time augmentation: resize factors on top of the base size, e.g. 0.5 1 1.5")
    parser.add_argument("--float_boxes", action="store_true",
                        help="write exact float boxes (default: the published integer boxes, x = int(x1), "
                             "w = int(x2) - int(x1))")
    parser.add_argument("--device", type=str, default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument("--overwrite", action="store_true", help="predict again even where a file exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def input_size(args: argparse.Namespace) -> Tuple[Optional[int], Optional[int]]:
    """(image_size, max_size) for the detector from --origin_size / --image_size / --max_size
    (also checks --scales, so that a bad value stops the run before the model loads; FaceDetector
    checks the sizes)."""
    if args.scales and any(not s > 0 for s in args.scales):
        raise FeatherFaceError(f"--scales must all be positive, got {' '.join(map(str, args.scales))}")
    if args.image_size is not None:
        if args.origin_size:
            raise FeatherFaceError("--origin_size and --image_size exclude each other; give one")
        return args.image_size, args.max_size
    if args.origin_size is False:
        return RETINAFACE_RESIZE[0], args.max_size or RETINAFACE_RESIZE[1]
    return None, args.max_size


def output_paths(args: argparse.Namespace, save_folder: Path, results_json: Optional[Path] = None,
                 pr_curve: Optional[Path] = None,
                 folder_flag: str = "--save_folder") -> Tuple[Optional[Path], Optional[Path]]:
    """Check every output of a run before it starts; returns where the APs (JSON) and PR curves (PNG) go
    (default: beside the prediction folder), None for both without --gt_dir (nothing is evaluated).
    `folder_flag`: the calling script's flag that sets the prediction folder (named in errors)."""
    check_output_path(save_folder, folder_flag, folder=True)
    check_output_path(settings_path(save_folder), f"the settings record of {folder_flag}")
    if args.gt_dir is None:
        return None, None
    results_json = results_json or save_folder.parent / "results.json"
    pr_curve = pr_curve or results_json.with_name("pr_curves.png")
    check_output_path(results_json, "--results_json")
    check_output_path(pr_curve, "--pr_curve")
    if not cv2.haveImageWriter(str(pr_curve)):
        raise FeatherFaceError(f"--pr_curve {pr_curve}: OpenCV cannot write this image type; use a .png file name")
    return results_json, pr_curve


def build_detector(args: argparse.Namespace, weights: Union[str, Path, nn.Module],
                   backend: str = "auto") -> FaceDetector:
    """The published protocol's detector with this run's resize and thresholds (backend "auto": by suffix)."""
    image_size, max_size = input_size(args)
    return published_protocol_detector(weights, backend, args.device, image_size, max_size, args.confidence_threshold,
                                       args.nms_threshold, args.top_k, args.keep_top_k,
                                       threads=getattr(args, "threads", None))


def run_widerface(args: argparse.Namespace, detector: FaceDetector, label: str, model_id: str, save_folder: Path,
                  results_json: Optional[Path] = None, pr_curve: Optional[Path] = None,
                  folder_flag: str = "--save_folder") -> Dict[str, object]:
    """Predict the images (resuming), report, and with --gt_dir evaluate and save JSON + PNG.

    `model_id` identifies the weights in the folder's settings record (a resumed run must match);
    `folder_flag` is the calling script's flag that sets `save_folder` (errors tell the user to change it).
    """
    if args.dataset_folder is None:
        raise FeatherFaceError("--dataset_folder is required (WIDER_val/images)")
    results_json, pr_curve = output_paths(args, save_folder, results_json, pr_curve, folder_flag)
    images = list_images(args.dataset_folder, args.image_list)
    if args.gt_dir is not None:  # a wrong --gt_dir or image list fails now, not after every image has run
        gt = load_ground_truth(args.gt_dir)
        if args.image_list:
            select_images(gt, images)
    summary = predict_images(detector, args.dataset_folder, images, save_folder, args.overwrite, args.flip,
                             args.scales, model_id, not args.float_boxes, progress=not args.quiet,
                             folder_flag=folder_flag)
    print(f"{label}: {summary.written} image(s) predicted, {summary.skipped} already done"
          + (f", {summary.seconds_per_image:.3f} s/image" if summary.written else "") + f" -> {save_folder}")
    if summary.unreadable:
        print(f"{len(summary.unreadable)} unreadable image(s), no prediction file written:\n  "
              + "\n  ".join(summary.unreadable))
    results: Dict[str, object] = {"prediction": summary.to_dict()}
    if args.gt_dir is None:
        return results
    subset = images if args.image_list else None
    result, evaluated, total = evaluate_images(save_folder, args.gt_dir, subset, args.allow_missing)
    print(f"evaluated on {evaluated} of {total} val images")
    print("\n".join(result.lines()))
    results.update(result.to_dict(), images_evaluated=evaluated, images_total=total, result=result)
    results_json.parent.mkdir(parents=True, exist_ok=True)
    results_json.write_text(json.dumps({k: v for k, v in results.items() if k != "result"}, indent=2) + "\n")
    pr_curve = save_pr_curves(result, pr_curve, f"{label}: WIDER FACE val ({evaluated} images)")
    print(f"wrote {results_json} and {pr_curve}")
    return results
