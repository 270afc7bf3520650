"""Precision-recall curves drawn with OpenCV (no plotting library needed): axes, ticks, grid,
one polyline per curve and a legend with each curve's AP."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

import cv2
import numpy as np

from utils.errors import FeatherFaceError

Color = Tuple[int, int, int]  # BGR
SETTING_COLORS = {"easy": (60, 160, 40), "medium": (0, 140, 255), "hard": (40, 40, 220)}
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_INK, _GRID, _PAPER = (30, 30, 30), (225, 225, 225), (255, 255, 255)
# Room around the plot area (pixels): tick labels and axis titles live there.
_LEFT, _RIGHT, _TOP, _BOTTOM = 90, 30, 50, 70


@dataclass(frozen=True)
class Curve:
    """One PR curve: recall and precision per threshold (NaN precision = no proposals, skipped)."""

    label: str
    recall: np.ndarray
    precision: np.ndarray
    color: Color


def _text_size(text: str, scale: float, thickness: int = 1) -> Tuple[int, int]:
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    return w, h


def _put(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.5, color: Color = _INK,
         thickness: int = 1) -> None:
    cv2.putText(canvas, text, (int(x), int(y)), _FONT, scale, color, thickness, cv2.LINE_AA)


def _put_vertical(canvas: np.ndarray, text: str, center_x: int, center_y: int, scale: float = 0.6) -> None:
    """Text rotated 90 degrees counter-clockwise (OpenCV only draws horizontal text)."""
    w, h = _text_size(text, scale)
    patch = np.full((h + 10, w + 4, 3), _PAPER, dtype=np.uint8)
    _put(patch, text, 2, h + 3, scale)
    patch = cv2.rotate(patch, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0, x0 = center_y - patch.shape[0] // 2, center_x - patch.shape[1] // 2
    canvas[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch


def draw_pr_curves(curves: Sequence[Curve], size: Tuple[int, int] = (800, 600), title: str = "") -> np.ndarray:
    """Draw curves on a white (H, W, 3) uint8 BGR image; `size` is (width, height)."""
    width, height = size
    if width < _LEFT + _RIGHT + 100 or height < _TOP + _BOTTOM + 100:
        smallest = (_LEFT + _RIGHT + 100, _TOP + _BOTTOM + 100)
        raise ValueError(f"PR plot size {size} is too small; use at least {smallest}")
    canvas = np.full((height, width, 3), _PAPER, dtype=np.uint8)
    x0, x1, y0, y1 = _LEFT, width - _RIGHT, _TOP, height - _BOTTOM  # plot area; y grows downwards

    def to_pixels(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
        return np.stack([x0 + recall * (x1 - x0), y1 - precision * (y1 - y0)], axis=1)

    for i in range(11):  # grid every 0.1, labelled every 0.2
        v = i / 10
        px, py = int(round(x0 + v * (x1 - x0))), int(round(y1 - v * (y1 - y0)))
        cv2.line(canvas, (px, y0), (px, y1), _GRID, 1)
        cv2.line(canvas, (x0, py), (x1, py), _GRID, 1)
        cv2.line(canvas, (px, y1), (px, y1 + 5), _INK, 1)
        cv2.line(canvas, (x0 - 5, py), (x0, py), _INK, 1)
        if i % 2 == 0:
            label = f"{v:.1f}"
            w, h = _text_size(label, 0.45)
            _put(canvas, label, px - w // 2, y1 + 10 + h, 0.45)
            _put(canvas, label, x0 - 10 - w, py + h // 2, 0.45)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), _INK, 1)
    w, h = _text_size("Recall", 0.6)
    _put(canvas, "Recall", (x0 + x1 - w) // 2, height - 20, 0.6)
    _put_vertical(canvas, "Precision", 22, (y0 + y1) // 2)
    if title:
        w, h = _text_size(title, 0.65, 2)
        _put(canvas, title, (width - w) // 2, _TOP - 18, 0.65, thickness=2)

    for curve in curves:
        recall, precision = np.asarray(curve.recall, float), np.asarray(curve.precision, float)
        if recall.shape != precision.shape:
            raise ValueError(f"curve {curve.label!r}: recall {recall.shape} and precision {precision.shape} differ")
        valid = np.isfinite(recall) & np.isfinite(precision)
        points = to_pixels(np.clip(recall[valid], 0, 1), np.clip(precision[valid], 0, 1))
        if len(points):
            # shift=4: sub-pixel coordinates (1/16 px) for smooth anti-aliased lines.
            cv2.polylines(canvas, [np.round(points * 16).astype(np.int32)], False, curve.color, 2, cv2.LINE_AA, shift=4)

    # Legend, bottom left inside the plot (PR curves rarely pass there).
    line_h = 24
    legend_w = max([_text_size(c.label, 0.5)[0] for c in curves] + [0]) + 60
    lx, ly = x0 + 15, y1 - 15 - line_h * len(curves)
    if curves:
        cv2.rectangle(canvas, (lx - 8, ly - 8), (lx + legend_w, y1 - 10), _PAPER, -1)
        cv2.rectangle(canvas, (lx - 8, ly - 8), (lx + legend_w, y1 - 10), _INK, 1)
    for i, curve in enumerate(curves):
        cy = ly + i * line_h + line_h // 2
        cv2.line(canvas, (lx, cy), (lx + 35, cy), curve.color, 2, cv2.LINE_AA)
        _put(canvas, curve.label, lx + 45, cy + 5, 0.5)
    return canvas


def setting_curves(result) -> list:
    """Easy / medium / hard curves of a `WiderFaceResult`, labelled with their APs (a setting
    without faces among the evaluated images has no curve)."""
    return [Curve(f"{s.capitalize():<6} AP {result.ap[s]:.4f}", result.recall[s], result.precision[s],
                  SETTING_COLORS[s]) for s in SETTING_COLORS if np.isfinite(result.ap[s])]


def save_pr_curves(result, path: Union[str, Path], title: str = "WIDER FACE val",
                   size: Tuple[int, int] = (800, 600)) -> Path:
    """Draw a `WiderFaceResult`'s three PR curves and write them as an image file (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = draw_pr_curves(setting_curves(result), size, title)
    try:
        written = cv2.imwrite(str(path), image)
    except cv2.error:  # an extension OpenCV has no writer for
        written = False
    if not written:
        raise FeatherFaceError(f"cannot write the PR-curve image {path} (use a .png file name in a writable folder)")
    return path
