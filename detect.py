"""Detect faces in an image, a folder of images or a video; write annotated copies and a JSON.

    python detect.py --weights weights/featherface_v1_original_widerface_converted.pth --input photo.jpg
    python detect.py --weights featherface.onnx --input clips/street.mp4 --output out/

Writes `<output>/<name>` (annotated image or .avi video) and `<output>/detections.json`
({"images": [...], "videos": [...], "errors": [...]}). Unreadable files are reported and
skipped; exit 0 when at least one input was processed, 2 when none was.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

import cv2
import torch
from tqdm import tqdm

from utils.detector import FaceDetector, backend_for
from utils.errors import FeatherFaceError, run_cli
from utils.visualize import draw_faces, has_display, show_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Detect faces with a FeatherFace checkpoint or ONNX export.")
    p.add_argument("--weights", type=Path, required=True, help="checkpoint (.pth) or exported model (.onnx)")
    p.add_argument("--input", type=Path, required=True, help="an image, a folder of images or a video file")
    p.add_argument("--output", type=Path, default=Path("out"), help="folder for annotated files and detections.json")
    p.add_argument("--conf", type=float, default=0.5, help="minimum face score")
    p.add_argument("--nms", type=float, default=0.4, help="NMS IoU threshold")
    p.add_argument("--image_size", type=int, default=None, help="resize the shorter side to this (default: original size)")
    p.add_argument("--max_size", type=int, default=None, help="cap on the longer side after resizing")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto", help="auto: onnx for .onnx files")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (torch backend)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: library default)")
    p.add_argument("--show", action="store_true", help="also display the results in a window (needs a display)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class Runner:
    """Detects, annotates, writes and records; failures go to `errors` instead of aborting."""

    def __init__(self, detector: FaceDetector, args: argparse.Namespace) -> None:
        self.detector, self.args = detector, args
        self.show = args.show and has_display()
        if args.show and not self.show:
            print("warning: --show ignored: no display available", file=sys.stderr)
        self.results: Dict[str, List[dict]] = {"images": [], "videos": [], "errors": []}
        self.progress = not args.quiet and sys.stderr.isatty()

    def fail(self, path: Path, message: str) -> None:
        print(f"warning: skipping {path}: {message}", file=sys.stderr)
        self.results["errors"].append({"file": str(path), "error": message})

    def target(self, path: Path, suffix: str) -> Path:
        out = self.args.output / (path.stem + suffix)
        if out.resolve() == path.resolve():
            raise FeatherFaceError(f"--output {self.args.output} would overwrite the input {path}; choose another folder")
        return out

    def image(self, path: Path) -> None:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            return self.fail(path, "cannot read the image (missing, corrupt or unsupported format)")
        faces = self.detector.detect(image)
        annotated = draw_faces(image, faces)
        out = self.target(path, path.suffix if path.suffix.lower() in IMAGE_SUFFIXES else ".jpg")
        if not cv2.imwrite(str(out), annotated):
            return self.fail(path, f"cannot write {out}")
        self.results["images"].append({"file": str(path), "output": str(out), "width": image.shape[1],
                                       "height": image.shape[0], "faces": [f.to_dict() for f in faces]})
        if self.show:
            self.show = show_image(annotated, 0)

    def video(self, path: Path) -> None:
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            return self.fail(path, "cannot open the video (missing, corrupt or unsupported codec)")
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0) or None  # streams report -1 or 0
        out, writer, frames = self.target(path, ".avi"), None, []
        with tqdm(total=total, desc=path.name, unit="frame", disable=not self.progress) as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                faces = self.detector.detect(frame)
                annotated = draw_faces(frame, faces)
                if writer is None:
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), fps, annotated.shape[1::-1])
                    if not writer.isOpened():
                        capture.release()
                        return self.fail(path, f"cannot write {out} (MJPG/AVI writer unavailable)")
                writer.write(annotated)
                frames.append({"frame": len(frames), "faces": [f.to_dict() for f in faces]})
                if self.show:
                    self.show = show_image(annotated, 1)
                bar.update()
        capture.release()
        if writer is None:
            return self.fail(path, "the video has no readable frames")
        writer.release()
        self.results["videos"].append({"file": str(path), "output": str(out), "fps": fps, "frames": frames})


def collect_inputs(path: Path) -> List[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    if not path.exists():
        raise FeatherFaceError(f"input not found: {path}")
    return [path]


def main(args: argparse.Namespace) -> int:
    inputs = collect_inputs(args.input)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = backend_for(args.weights) if args.backend == "auto" else args.backend
    detector = FaceDetector(args.weights, backend=backend, device=args.device, image_size=args.image_size,
                            conf=args.conf, nms=args.nms, max_size=args.max_size, threads=args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    runner = Runner(detector, args)
    for path in tqdm(inputs, desc="files", unit="file", disable=not runner.progress or len(inputs) < 2):
        (runner.video if path.suffix.lower() in VIDEO_SUFFIXES else runner.image)(path)
    report = args.output / "detections.json"
    settings = {"weights": str(args.weights), "backend": backend, "conf": args.conf, "nms": args.nms,
                "image_size": args.image_size, "max_size": args.max_size}
    report.write_text(json.dumps({**settings, **runner.results}, indent=1))
    done = len(runner.results["images"]) + len(runner.results["videos"])
    if runner.show:
        cv2.destroyAllWindows()
    if done == 0:
        raise FeatherFaceError(f"nothing could be processed in {args.input} (see {report})")
    faces = sum(len(r["faces"]) for r in runner.results["images"])
    print(f"{done} file(s) processed, {faces} face(s) in images, {len(runner.results['errors'])} skipped; "
          f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, get_args_parser().parse_args()))
