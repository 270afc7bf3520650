"""Validate a WIDER FACE label file and its images before training.

Finds every missing, empty, truncated or undecodable image, malformed or non-numeric label
line, wrong face count and box lying outside its image, each with the label file and line.
Degenerate boxes (w or h <= 0) are not problems: they are dropped and counted, as are faces
with the official "invalid" flag (left out of training by default). Never raises on bad data.

    python -m data.check LABELS [--images DIR]     # exit 0 when training can start, 2 when not
    python -m data.check LABELS --labels_only      # the label file alone, no images opened

Training uses it as::

    report = check_dataset(label_file, image_root)
    dataset = WiderFaceDataset(label_file, image_root, transform, skip=report.bad_samples,
                               skip_bad_faces=True)   # what --skip_bad_samples does

Decoding every image is the slow part, so it runs in ``num_workers`` processes, and its
outcome (size, or why the image is unusable) is cached per image, keyed by (path, file size,
mtime), under ``$FEATHERFACE_CACHE`` (default ``~/.cache/featherface``)``/data_check``: a
resumed run re-checks the labels but decodes only images that changed. ``CheckReport.timing()``
says how many images were decoded, and how fast.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from data.preprocess import read_image
from utils.errors import FeatherFaceError, positive_int, run_cli
from data.wider_face import (LabelRecord, PathLike, Problem, image_problems, read_label_file,
                             resolve_image_path)

__all__ = ["CheckReport", "check_dataset", "get_args_parser", "main"]


@dataclass
class CheckReport:
    """Outcome of `check_dataset`.

    `bad_samples` are the record indices (label-file order) of images with a problem that
    makes the whole image unusable; a problem confined to one face line (`Problem.face`) only
    loses that face. `dropped_boxes` are warnings for degenerate boxes left out; `num_faces`
    counts the usable faces, `num_invalid` those among them flagged invalid.
    """

    label_file: str
    format: str
    num_images: int = 0
    num_faces: int = 0
    num_invalid: int = 0
    num_empty: int = 0  # images listed with no face (valid negatives)
    file_problems: int = 0  # problems of the label file itself (unreadable, stray lines), not of one image
    problems: List[Problem] = field(default_factory=list)
    bad_samples: Set[int] = field(default_factory=set)
    dropped_boxes: List[Problem] = field(default_factory=list)
    labels_only: bool = False
    decoded: int = 0  # images decoded by this check
    cached: int = 0  # images whose decode outcome came from the cache
    seconds: float = 0.0  # wall time of the whole check

    def timing(self) -> str:
        """One line: how long the check took and how fast it decoded."""
        seconds = max(self.seconds, 1e-9)
        return (f"data check: {self.num_images} images in {self.seconds:.2f} s ({self.num_images / seconds:.0f} "
                f"images/s): {self.decoded} decoded, {self.cached} known unchanged from the cache")

    @property
    def ok(self) -> bool:
        """True when training can start on this file as it is."""
        return not self.problems

    @property
    def bad_faces(self) -> int:
        return sum(1 for p in self.problems if p.face)

    def counts(self) -> str:
        return (f"{self.format} format, {self.num_images} images ({self.num_empty} without faces), "
                f"{self.num_faces} faces, {len(self.dropped_boxes)} degenerate boxes dropped, "
                f"{self.num_invalid} faces flagged invalid (left out of training unless --keep_invalid_faces)")

    def summary(self) -> str:
        checked = "labels only, images not opened; " if self.labels_only else ""
        if self.ok:
            return f"{self.label_file}: OK ({checked}{self.counts()})"
        head = f"{self.label_file}: {len(self.problems)} problem(s) ({checked}{self.counts()}). Training refuses to start"
        if self.file_problems:
            return (f"{head}, also with --skip_bad_samples: {self.file_problems} of them concern the label file "
                    f"itself, not one image")
        return (f"{head}; with --skip_bad_samples it leaves out the {len(self.bad_samples)} image(s) with a problem "
                f"and the {self.bad_faces} unusable face line(s)")


# Bump whenever probe_image's checks change, so that cached outcomes are decoded again.
CACHE_VERSION = 1
Probe = Tuple[int, int, str]  # (width, height, why the image is unusable or "")


def probe_image(path: Path) -> Probe:
    """Decode one image fully (the only reliable test): its size, or why it cannot be used."""
    image, why = read_image(path)
    if image is None:
        return 0, 0, f"{why}: {path}"
    height, width = image.shape[:2]
    return width, height, ""


def _probe_chunk(paths: Sequence[str]) -> List[Probe]:
    return [probe_image(Path(p)) for p in paths]


def cache_dir() -> Path:
    """Where decode outcomes are cached: $FEATHERFACE_CACHE, else ~/.cache/featherface."""
    root = os.environ.get("FEATHERFACE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "featherface")
    return Path(root) / "data_check"


def _cache_file(label_file: PathLike) -> Path:
    key = hashlib.sha1(str(Path(label_file).resolve()).encode()).hexdigest()[:20]
    return cache_dir() / f"{key}.json"


def _load_cache(path: Path) -> Dict[str, list]:
    try:
        blob = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return blob.get("images", {}) if isinstance(blob, dict) and blob.get("version") == CACHE_VERSION else {}


def _save_cache(path: Path, images: Dict[str, list]) -> None:
    """Atomic write; a cache that cannot be written only costs speed next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "images": images}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _probe_all(paths: Sequence[str], num_workers: int) -> List[Probe]:
    """probe_image over `paths`, in `num_workers` processes when there are enough images."""
    if num_workers <= 1 or len(paths) < 4 * num_workers:
        return _probe_chunk(paths)
    # fork starts in milliseconds and needs nothing importable; elsewhere the default method.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    size = max(1, min(64, len(paths) // (num_workers * 4)))
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        return [probe for chunk in pool.map(_probe_chunk, chunks) for probe in chunk]


def _probe_cached(label_file: PathLike, records: Sequence[LabelRecord], paths: Sequence[Path],
                  num_workers: int, use_cache: bool, report: "CheckReport") -> List[Optional[Probe]]:
    """Probe per record (None: no image path or file missing), decoding only what the cache
    does not know; updates report.decoded / report.cached."""
    cache_path = _cache_file(label_file) if use_cache else None
    cache = _load_cache(cache_path) if cache_path is not None else {}
    probes: List[Optional[Probe]] = [None] * len(records)
    seen: Dict[str, list] = {}
    to_decode: Dict[str, List[int]] = {}
    for i, (record, path) in enumerate(zip(records, paths)):
        if not record.has_path:
            continue  # reported by the parser
        try:
            st = path.stat()
        except OSError:
            continue  # missing
        if st.st_size == 0:
            probes[i] = (0, 0, f"image file is empty (0 bytes): {path}")
            continue
        key = str(path.resolve())
        hit = cache.get(key)
        if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
            probes[i] = (hit[2], hit[3], hit[4])
            seen[key] = hit
            report.cached += 1
        else:
            to_decode.setdefault(key, []).append(i)
            seen[key] = [st.st_size, st.st_mtime_ns]
    keys = list(to_decode)
    for key, probe in zip(keys, _probe_all([str(paths[to_decode[k][0]]) for k in keys], num_workers)):
        seen[key] = seen[key][:2] + list(probe)
        for i in to_decode[key]:
            probes[i] = probe
    report.decoded = len(keys)
    if cache_path is not None and keys:
        _save_cache(cache_path, seen)
    return probes


def _check_image(label_file: str, record: LabelRecord, path: Path, probe: Optional[Probe]) -> List[Problem]:
    where = (label_file, record.line)
    if probe is None:
        return [Problem(*where, f"image not found: {path}")]
    width, height, error = probe
    if error:
        return [Problem(*where, error)]
    return image_problems(label_file, record, width, height)


def check_dataset(label_file: PathLike, image_root: Optional[PathLike] = None,
                  num_workers: int = 1, labels_only: bool = False, use_cache: bool = True) -> CheckReport:
    """Parse `label_file`, open every image (unless `labels_only`; in `num_workers` processes;
    not again when the cache knows it unchanged), and report every problem found (never raises)."""
    start = time.perf_counter()
    parsed = read_label_file(label_file)
    name = str(label_file)
    report = CheckReport(label_file=name, format=parsed.format, num_images=len(parsed.records),
                         num_faces=parsed.num_faces, num_invalid=parsed.num_invalid,
                         num_empty=sum(1 for r in parsed.records if len(r.boxes) == 0 and not r.problems
                                       and not r.dropped),
                         dropped_boxes=parsed.dropped_boxes(), labels_only=labels_only)
    problems = list(parsed.problems)
    report.file_problems = len(problems)
    paths = [resolve_image_path(label_file, r.image, image_root) for r in parsed.records]

    probes = [] if labels_only else _probe_cached(label_file, parsed.records, paths, num_workers, use_cache, report)
    image_results = [[] if labels_only or not record.has_path  # an unusable path is reported by the parser
                     else _check_image(name, record, path, probe)
                     for record, path, probe in zip(parsed.records, paths, probes or [None] * len(paths))]
    for record, found in zip(parsed.records, image_results):
        found = record.problems + found
        if any(not p.face for p in found):
            report.bad_samples.add(record.index)
        problems.extend(found)
    report.problems = sorted(problems, key=lambda p: p.line)
    report.seconds = time.perf_counter() - start
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Check a WIDER FACE label file (RetinaFace label.txt or official bbx_gt format) "
                    "and its images; exit 0 when clean, 2 when problems were found.")
    parser.add_argument("labels", type=str, help="label file (label.txt or wider_face_*_bbx_gt.txt)")
    parser.add_argument("--images", type=str, default=None,
                        help="images root (default: <label dir>/images, then the label dir)")
    parser.add_argument("--workers", type=positive_int, default=4, help="processes that decode images")
    parser.add_argument("--no_cache", action="store_true",
                        help="decode every image, ignoring (and not updating) the cache of earlier checks")
    parser.add_argument("--labels_only", action="store_true",
                        help="check the label file alone (no image is opened): counts and label problems")
    parser.add_argument("--show_dropped", action="store_true", help="list every degenerate box dropped")
    return parser


def main(args: argparse.Namespace) -> int:
    if not Path(args.labels).is_file():  # a path typo is not a problem "in the label file"
        what = "is a folder, not a label file" if Path(args.labels).is_dir() else "not found"
        raise FeatherFaceError(f"label file {args.labels} {what}")
    if args.images is not None and not args.labels_only and not Path(args.images).is_dir():
        what = "is a file, not a folder" if Path(args.images).exists() else "not found"
        raise FeatherFaceError(f"images folder {args.images} {what}")  # not one "image not found" per image
    report = check_dataset(args.labels, args.images, num_workers=args.workers, labels_only=args.labels_only,
                           use_cache=not args.no_cache)
    for problem in report.problems:
        print(problem)
    shown = report.dropped_boxes if args.show_dropped else report.dropped_boxes[:5]
    for warning in shown:
        print(f"warning: {warning}")
    if len(shown) < len(report.dropped_boxes):
        print(f"warning: ... {len(report.dropped_boxes) - len(shown)} more degenerate boxes dropped (--show_dropped lists them)")
    print(report.summary())
    if not args.labels_only:
        print(report.timing())
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
