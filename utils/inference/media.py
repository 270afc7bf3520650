"""Run a FaceDetector over images and videos: annotated copies plus a JSON-ready record
(`detect.py`'s engine). Unreadable files are recorded as errors instead of aborting the run."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import cv2
from tqdm import tqdm

from data.preprocess import IMAGE_SUFFIXES, read_image
from utils.errors import FeatherFaceError
from utils.inference.detector import FaceDetector
from utils.inference.visualize import draw_faces, has_display, show_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


class MediaRunner:
    """Detects, annotates, writes and records; failures go to `errors` instead of aborting."""

    def __init__(self, detector: FaceDetector, output: Path, show: bool = False, quiet: bool = False) -> None:
        self.detector, self.output = detector, Path(output)
        self.show = show and has_display()
        if show and not self.show:
            print("warning: --show ignored: no display available", file=sys.stderr)
        self.results: Dict[str, List[dict]] = {"images": [], "videos": [], "errors": []}
        self.written: Set[Path] = set()  # output files of this run
        self.progress = not quiet and sys.stderr.isatty()

    def fail(self, path: Path, message: str) -> None:
        print(f"warning: skipping {path}: {message}", file=sys.stderr)
        self.results["errors"].append({"file": str(path), "error": message})

    def target(self, path: Path, suffix: str) -> Path:
        """Output file for `path`: its name with `suffix`; when another input of this run already
        took that name (clip.mp4 and clip.avi both give clip.avi), the input's extension joins the
        name (clip_mp4.avi)."""
        out = self.output / (path.stem + suffix)
        if out in self.written:
            out = self.output / f"{path.stem}_{path.suffix.lstrip('.').lower()}{suffix}"
        if out.resolve() == path.resolve():
            raise FeatherFaceError(f"--output {self.output} would overwrite the input {path}; choose another folder")
        self.written.add(out)
        return out

    def image(self, path: Path) -> None:
        try:
            image, why = read_image(path)
        except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV decodes
            image, why = None, f"image cannot be decoded (OpenCV refused it: {exc.err})"
        if image is None:
            return self.fail(path, why)
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


MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES


def _why_not_a_file(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "broken symbolic link (its target does not exist)"
    if path.is_dir():
        return "a folder, not a file"
    return "not a regular file"


def collect_inputs(path: Path) -> Tuple[List[Path], List[Tuple[Path, str]]]:
    """(files to process, skipped entries with why) for `path`: an image or video file, or a
    folder's image and video files (sorted; files with other suffixes are ignored). A folder entry
    with an image or video name that is not a readable file (a broken symbolic link, a folder named
    y.jpg) is skipped with its reason. FeatherFaceError when there is nothing to process."""
    if not path.exists():
        raise FeatherFaceError(f"input not found: {path}")
    if not path.is_dir():
        return [path], []
    inputs, skipped = [], []
    for entry in sorted(p for p in path.iterdir() if p.suffix.lower() in MEDIA_SUFFIXES):
        if entry.is_file():
            inputs.append(entry)
        else:
            skipped.append((entry, _why_not_a_file(entry)))
    if not inputs:
        why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
        raise FeatherFaceError(f"no image or video files in {path} (looked for {' '.join(MEDIA_SUFFIXES)})"
                               + (f"; skipped {why}" if why else ""))
    return inputs, skipped
