"""Validate a WIDER FACE label file and its images before training.

Finds every missing, empty or undecodable image, malformed or non-numeric label line,
wrong face count, degenerate box (w or h <= 0) and box lying outside its image, each with
the label file and line. Never raises on bad data.

    python -m data.check LABELS [--images DIR]     # exit 0 when clean, 2 when problems

Training uses it as::

    report = check_dataset(label_file, image_root)
    dataset = WiderFaceDataset(label_file, image_root, transform, skip=report.bad_samples)
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

import cv2

from data.wider_face import (LabelRecord, PathLike, Problem, image_problems, read_label_file,
                             resolve_image_path)

__all__ = ["CheckReport", "check_dataset", "get_args_parser", "main"]


@dataclass
class CheckReport:
    """Outcome of `check_dataset`; `bad_samples` are record indices (label-file order)."""

    label_file: str
    format: str
    num_images: int = 0
    num_faces: int = 0
    problems: List[Problem] = field(default_factory=list)
    bad_samples: Set[int] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return (f"{self.label_file}: OK ({self.format} format, {self.num_images} images, "
                    f"{self.num_faces} faces)")
        return (f"{self.label_file}: {len(self.problems)} problem(s) in {len(self.bad_samples)} of "
                f"{self.num_images} images ({self.format} format, {self.num_faces} faces); "
                f"train with skip=report.bad_samples to leave those images out")


def _check_image(label_file: str, record: LabelRecord, path: Path) -> List[Problem]:
    where = (label_file, record.line)
    if not path.is_file():
        return [Problem(*where, f"image not found: {path}")]
    if path.stat().st_size == 0:
        return [Problem(*where, f"image file is empty (0 bytes): {path}")]
    # A full decode is the only reliable test; cv2 releases the GIL, so threads help.
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return [Problem(*where, f"image cannot be decoded (corrupt or not an image): {path}")]
    height, width = image.shape[:2]
    return image_problems(label_file, record, width, height)


def check_dataset(label_file: PathLike, image_root: Optional[PathLike] = None,
                  num_workers: int = 1) -> CheckReport:
    """Parse `label_file`, open every image, and report every problem found (never raises)."""
    parsed = read_label_file(label_file)
    name = str(label_file)
    report = CheckReport(label_file=name, format=parsed.format, num_images=len(parsed.records),
                         num_faces=sum(len(r.boxes) for r in parsed.records))
    problems = list(parsed.problems)
    paths = [resolve_image_path(label_file, r.image, image_root) for r in parsed.records]

    def check(i: int) -> List[Problem]:
        record = parsed.records[i]
        if not record.image:
            return []  # already reported by the parser
        return _check_image(name, record, paths[i])

    indices = range(len(parsed.records))
    if num_workers > 1:
        with ThreadPoolExecutor(num_workers) as pool:
            image_results = list(pool.map(check, indices))
    else:
        image_results = [check(i) for i in indices]
    for record, found in zip(parsed.records, image_results):
        found = record.problems + found
        if found:
            report.bad_samples.add(record.index)
            problems.extend(found)
    report.problems = sorted(problems, key=lambda p: p.line)
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Check a WIDER FACE label file (RetinaFace label.txt or official bbx_gt format) "
                    "and its images; exit 0 when clean, 2 when problems were found.")
    parser.add_argument("labels", type=str, help="label file (label.txt or wider_face_*_bbx_gt.txt)")
    parser.add_argument("--images", type=str, default=None,
                        help="images root (default: <label dir>/images, then the label dir)")
    parser.add_argument("--workers", type=int, default=4, help="threads used to decode images")
    return parser


def main(args: argparse.Namespace) -> int:
    report = check_dataset(args.labels, args.images, num_workers=args.workers)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
