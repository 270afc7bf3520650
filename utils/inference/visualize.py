"""Drawing detections on images (detect.py, notebooks)."""
from __future__ import annotations

import os
import sys
from typing import Sequence, Tuple

import cv2
import numpy as np

from utils.inference.detector import Face

Color = Tuple[int, int, int]

BOX_COLOR: Color = (0, 255, 0)  # BGR
# One colour per landmark: left eye, right eye, nose, mouth left, mouth right.
LANDMARK_COLORS: Tuple[Color, ...] = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))


def draw_faces(image: np.ndarray, faces: Sequence[Face], box_color: Color = BOX_COLOR,
               show_scores: bool = True) -> np.ndarray:
    """A copy of the BGR `image` with each face's box, score and five landmarks drawn."""
    canvas = image.copy()
    # Line widths and text grow with the image so they stay visible on large photos.
    thickness = max(1, round(max(image.shape[:2]) / 500))
    radius = thickness + 1
    font_scale = 0.4 * thickness
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), box_color, thickness)
        if show_scores:
            label = f"{face.score:.2f}"
            (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
            top = max(y1 - th - base, 0)
            cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + base), box_color, -1)
            cv2.putText(canvas, label, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                        thickness, cv2.LINE_AA)
        for (x, y), color in zip(face.landmarks, LANDMARK_COLORS):
            cv2.circle(canvas, (int(round(x)), int(round(y))), radius, color, -1)
    return canvas


def has_display() -> bool:
    """Whether a window can be opened (an X11/Wayland display on Linux; assumed elsewhere)."""
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show_image(image: np.ndarray, wait_ms: int = 0, title: str = "FeatherFace") -> bool:
    """Display `image`; False (with a warning) when this OpenCV build has no GUI support."""
    try:
        cv2.imshow(title, image)
        cv2.waitKey(wait_ms)
        return True
    except cv2.error as exc:  # opencv-python-headless has no GUI
        print(f"warning: cannot open a window: {exc}", file=sys.stderr)
        return False
