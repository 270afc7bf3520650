"""Detect faces in an image, a folder of images or a video; write annotated copies and a JSON.

    python detect.py --input photo.jpg      # the shipped published model (weights/featherface_v1_original.pth)
    python detect.py --weights featherface.onnx --input clips/street.mp4 --output out/

Images larger than --max_size (default 1920 px on the longer side) are scaled down for the
network and the boxes scaled back; --original_size runs them at full size.

Writes `<output>/<name>` (annotated image or .avi video) and `<output>/detections.json`
({"images": [...], "videos": [...], "errors": [...]}). Unreadable files (and, in a folder, broken
links or folders with an image name) are reported and skipped; exit 0 when at least one input
was processed, 2 when none was (an earlier detections.json in --output is then left as it was).
Boxes and landmarks are not clipped to the image (FaceDetector.detect).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import torch
from tqdm import tqdm

from utils.errors import FeatherFaceError, check_output_path, non_negative_int, run_cli, unit_float
from utils.inference.detector import PUBLISHED_WEIGHTS, FaceDetector, backend_for
from utils.inference.postprocess import DEMO_POSTPROCESS
from utils.inference.media import VIDEO_SUFFIXES, MediaRunner, collect_inputs

# Longer-side cap of the demo: memory grows with the pixel count. An 8000x8000 photo with the
# shipped model, 1 thread: peak RSS 5.6 GB and 154 s at its own size, 1.3 GB and 11 s capped at
# 1920. Faces smaller than ~16 px after the cap are lost; --original_size keeps every pixel.
# Evaluation (test_widerface.py) never caps.
DEFAULT_MAX_SIZE = 1920


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Detect faces with a FeatherFace checkpoint or ONNX export.")
    p.add_argument("--weights", type=Path, default=PUBLISHED_WEIGHTS,
                   help="checkpoint (.pth) or exported model (.onnx); default: the shipped published model")
    p.add_argument("--input", type=Path, required=True, help="an image, a folder of images or a video file")
    p.add_argument("--output", type=Path, default=Path("out"), help="folder for annotated files and detections.json")
    p.add_argument("--conf", type=unit_float, default=DEMO_POSTPROCESS.conf_threshold,
                   help="minimum face score (0 to 1)")
    p.add_argument("--nms", type=unit_float, default=DEMO_POSTPROCESS.nms_threshold,
                   help="NMS IoU threshold (0 to 1)")
    p.add_argument("--image_size", type=int, default=None, help="resize the shorter side to this (default: original size)")
    p.add_argument("--max_size", type=int, default=DEFAULT_MAX_SIZE,
                   help="larger images are scaled down so their longer side is at most this (never up)")
    p.add_argument("--original_size", action="store_true",
                   help="no cap on the longer side: run every image at its own size (memory grows with it)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto", help="auto: onnx for .onnx files")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (torch backend)")
    p.add_argument("--threads", type=non_negative_int, default=None,
                   help="CPU threads for inference (default or 0: the library's default)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile the network (on a 2-core CPU each call took about 0.77x "
                        "as long; every new input size compiles for up to a minute first, so use it for videos "
                        "or same-size images)")
    p.add_argument("--show", action="store_true", help="also display the results in a window (needs a display)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    if args.max_size is not None and args.max_size < 32:
        raise FeatherFaceError(f"--max_size must be at least 32 pixels, got {args.max_size}")
    max_size = None if args.original_size else args.max_size
    inputs, skipped = collect_inputs(args.input)  # nothing to process: stop before the output is touched
    check_output_path(args.output, "--output", folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = backend_for(args.weights) if args.backend == "auto" else args.backend
    detector = FaceDetector(args.weights, backend=backend, device=args.device, image_size=args.image_size,
                            conf=args.conf, nms=args.nms, max_size=max_size, threads=args.threads,
                            compile=args.compile)
    args.output.mkdir(parents=True, exist_ok=True)
    runner = MediaRunner(detector, args.output, args.show, args.quiet)
    for path, why in skipped:
        runner.fail(path, why)
    for path in tqdm(inputs, desc="files", unit="file", disable=not runner.progress or len(inputs) < 2):
        (runner.video if path.suffix.lower() in VIDEO_SUFFIXES else runner.image)(path)
    report = args.output / "detections.json"
    settings = {"weights": str(args.weights), "backend": backend, "conf": args.conf, "nms": args.nms,
                "image_size": args.image_size, "max_size": max_size}
    done = len(runner.results["images"]) + len(runner.results["videos"])
    kept = done == 0 and report.exists()  # a failed run does not replace an earlier run's results
    if not kept:
        report.write_text(json.dumps({**settings, **runner.results}, indent=1))
    if runner.show:
        cv2.destroyAllWindows()
    if done == 0:
        raise FeatherFaceError(f"nothing could be processed in {args.input} "
                               + (f"(the earlier {report} is kept)" if kept else f"(see {report})"))
    faces = sum(len(r["faces"]) for r in runner.results["images"])
    print(f"{done} file(s) processed, {faces} face(s) in images, {len(runner.results['errors'])} skipped; "
          f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser().parse_args()))
