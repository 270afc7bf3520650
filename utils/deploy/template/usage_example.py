"""Find faces in one image with the FeatherFace ONNX package; needs only numpy, opencv and onnxruntime.

    python usage_example.py photo.jpg --output annotated.jpg

It feeds `model_postprocess.onnx` (network + prior boxes + decode + NMS in one graph), so the
only work left here is preprocessing: BGR pixels minus the mean in deployment_config.json,
laid out (1, 3, H, W) float32. The graph returns faces (K, 15): x1, y1, x2, y2, score and five
landmarks (left eye, right eye, nose, left and right mouth corner) as (x, y), in input pixels.
A package exported with --static_size has one input size (input.fixed_size in the config): each
image is letterboxed into it and the faces are mapped back to the image's pixels.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
LANDMARK_COLOURS = [(0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0)]  # BGR


def load_config(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read the package config {path}: {getattr(exc, 'strerror', None) or exc}")


def load_session(path, config, threads):
    """An ONNX Runtime session for the detection graph; exits with an error for a file that is not one
    (a raw model.onnx, another detector's graph, a broken file)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # Idle ORT workers stop spinning after each run, so the NMS below gets the cores.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several types for missing or invalid files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SystemExit(f"error: ONNX Runtime cannot load {path}: {first_line}")
    inputs = sorted(i.name for i in session.get_inputs())
    outputs = [o.name for o in session.get_outputs()]
    if inputs != sorted([config["input"]["name"], "score_threshold"]) or "faces" not in outputs:
        raise SystemExit(f"error: {path} is not a FeatherFace detection graph like model_postprocess.onnx (it takes "
                         f"{', '.join(inputs)} and returns {', '.join(outputs)}, not {config['input']['name']} and "
                         f"score_threshold -> faces)")
    return session


def check_output(path, flag, source, image=False):
    """Exit with an error, before any work, when `path` cannot be written as a file or is the input `source`."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; give a file path")
    if target.exists() and Path(source).exists() and target.samefile(source):
        raise SystemExit(f"error: {flag} {path} is the input image; choose another file")
    if not target.parent.is_dir():
        raise SystemExit(f"error: {flag} {path}: folder {target.parent} does not exist")
    if image and not cv2.haveImageWriter(str(target)):
        raise SystemExit(f"error: {flag} {path}: OpenCV cannot write this image type; use .jpg or .png")


JPEG_MARKER = re.compile(b"\xff[^\x00\xd0-\xd7\xff]")  # not a stuffed 00, a restart code or a fill byte


def jpeg_has_end(data):
    """True when the JPEG's own end marker (FF D9) follows its image data: segments are skipped by
    their length (an EXIF thumbnail has its own end marker), scan data up to the next marker; bytes
    after the end marker (a motion photo's video) are not looked at (as data/preprocess.py does)."""
    pos = 2
    while True:
        found = JPEG_MARKER.search(data, pos)
        if found is None:
            return False
        code, pos = data[found.start() + 1], found.end()
        if code == 0xD9:
            return True
        if code not in (0x01, 0xD8):  # markers with a length field
            if pos + 2 > len(data):
                return False
            pos += int.from_bytes(data[pos:pos + 2], "big")


def read_image(path):
    """The image as OpenCV decodes it; exits with an error for a missing or undecodable file and for a
    JPEG or PNG cut short, which OpenCV would return with grey in place of the missing part."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"error: cannot read {path}: {exc.strerror or exc}")
    if data[:2] == b"\xff\xd8" and not jpeg_has_end(data):
        raise SystemExit(f"error: {path}: JPEG is truncated (no end-of-image marker after the image data)")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data:
        raise SystemExit(f"error: {path}: PNG is truncated (no IEND chunk)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise SystemExit(f"error: cannot decode image {path} (empty, corrupt or unsupported format)")
    return image


def to_input(image_bgr, mean_bgr):
    """HxWx3 BGR (uint8 or float32) -> (1, 3, H, W) float32, mean removed, no scaling."""
    x = image_bgr.astype(np.float32) - np.asarray(mean_bgr, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def resize(image_bgr, scale):
    """Bilinear resize of the float32 pixels, as FeatherFace's own code resizes (OpenCV sizes the output
    and maps pixels by `scale`; a side that would round to 0 px keeps 1)."""
    height, width = image_bgr.shape[:2]
    size = (round(width * scale), round(height * scale))
    dsize = None if min(size) >= 1 else (max(1, size[0]), max(1, size[1]))
    return cv2.resize(image_bgr.astype(np.float32), dsize, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)


def letterbox(image_bgr, size, mean_bgr):
    """For graphs of fixed input size (H, W): the image resized by the largest scale that fits, on a
    canvas of the mean colour (0 after mean removal) at the top left. Returns (canvas, scale)."""
    scale = min(size[0] / image_bgr.shape[0], size[1] / image_bgr.shape[1])
    resized = resize(image_bgr, scale)[: size[0], : size[1]]
    canvas = np.empty((size[0], size[1], 3), np.float32)
    canvas[:] = np.asarray(mean_bgr, dtype=np.float32)
    canvas[: resized.shape[0], : resized.shape[1]] = resized
    return canvas, scale


def detect(session, image_bgr, config, score_threshold, max_size=None):
    """faces (K, 15) in the pixels of `image_bgr`, highest score first."""
    scale = 1.0
    fixed_size = config["input"].get("fixed_size")
    if fixed_size:  # exported with --static_size: every image is letterboxed into that size
        image_bgr, scale = letterbox(image_bgr, fixed_size, config["mean_bgr"])
    elif max_size and max(image_bgr.shape[:2]) > max_size:
        scale = max_size / max(image_bgr.shape[:2])
        image_bgr = resize(image_bgr, scale)
    inputs = {
        config["input"]["name"]: to_input(image_bgr, config["mean_bgr"]),
        "score_threshold": np.array(score_threshold, dtype=np.float32),
    }
    faces = session.run(["faces"], inputs)[0]
    faces[:, :4] /= scale
    faces[:, 5:] /= scale
    return faces


def draw(image_bgr, faces):
    out = image_bgr.copy()
    for face in faces:
        x1, y1, x2, y2 = (int(round(v)) for v in face[:4])
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), 2)
        cv2.putText(out, f"{face[4]:.2f}", (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
        for k, colour in enumerate(LANDMARK_COLOURS):
            cv2.circle(out, (int(round(face[5 + 2 * k])), int(round(face[6 + 2 * k]))), 2, colour, -1)
    return out


def bounded(kind, description, accept):
    """An argparse type: a `kind` value that `accept` allows, else argparse's one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not accept(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {description}, got {text}")
        return value
    return parse


def get_args_parser():
    parser = argparse.ArgumentParser(description="FeatherFace face detection with ONNX Runtime")
    parser.add_argument("image", type=str, help="image file to search for faces")
    parser.add_argument("--output", type=str, default=None, help="write the image with faces drawn here")
    parser.add_argument("--json", type=str, default=None, help="also write the faces as JSON here")
    parser.add_argument("--model", type=str, default=str(HERE / "model_postprocess.onnx"),
                        help="detection graph (default: model_postprocess.onnx beside this script)")
    parser.add_argument("--config", type=str, default=str(HERE / "deployment_config.json"),
                        help="deployment_config.json of the package")
    parser.add_argument("--threshold", type=bounded(float, "a score from 0 to 1", lambda v: 0 <= v <= 1),
                        default=None,
                        help="minimum face score (default: thresholds.score in deployment_config.json)")
    parser.add_argument("--max_size", type=bounded(int, "a positive integer", lambda v: v >= 1), default=None,
                        help="downscale images whose longer side exceeds this (faster; boxes stay in original pixels)")
    parser.add_argument("--threads", type=bounded(int, "an integer >= 0", lambda v: v >= 0), default=0,
                        help="ONNX Runtime intra-op threads (0 = its default)")
    return parser


def main(args):
    check_output(args.output, "--output", args.image, image=True)
    check_output(args.json, "--json", args.image)
    config = load_config(args.config)
    image = read_image(args.image)
    threshold = config["thresholds"]["score"] if args.threshold is None else args.threshold
    session = load_session(args.model, config, args.threads)
    faces = detect(session, image, config, threshold, args.max_size)

    print(f"{len(faces)} face(s) in {args.image} (score >= {threshold:g})")
    for i, face in enumerate(faces):
        box = ", ".join(f"{v:.1f}" for v in face[:4])
        points = " ".join(f"({face[5 + 2 * k]:.1f}, {face[6 + 2 * k]:.1f})" for k in range(5))
        print(f"  {i + 1:3d}: score {face[4]:.3f}  box [{box}]  landmarks {points}")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"image": args.image, "faces": faces.tolist()}, f)
        except OSError as exc:
            raise SystemExit(f"error: cannot write {args.json}: {exc.strerror or exc}")
    if args.output:
        try:
            written = cv2.imwrite(args.output, draw(image, faces))
        except cv2.error:
            written = False
        if not written:
            raise SystemExit(f"error: cannot write {args.output}")
        print(f"annotated image written to {args.output}")
    return faces


if __name__ == "__main__":
    main(get_args_parser().parse_args(sys.argv[1:]))
