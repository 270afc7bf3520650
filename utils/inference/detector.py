"""FaceDetector: the one inference path behind the Python API, detect.py, test_widerface.py
and the benchmark.

    from utils.inference.detector import FaceDetector
    detector = FaceDetector("weights/featherface_v1_original.pth")        # or an exported .onnx file
    faces = detector.detect(cv2.imread("photo.jpg"))          # [Face(box, score, landmarks)]

Preprocessing (data/preprocess.py), priors (cached per input size), decode and NMS
(utils/inference/postprocess.py) are shared with training, evaluation and the exported package; only
the network call differs between the PyTorch and ONNX Runtime backends.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from data.config import ModelConfig
from data.preprocess import letterbox, preprocess, resize_scale
from layers.prior_box import prior_boxes_for
from utils.errors import FeatherFaceError
from utils.deploy.rewrites import deploy_model
from utils.inference.memory import keep_freed_memory
from utils.inference.postprocess import DEMO_POSTPROCESS, PostProcessConfig, detect_faces

# The published FeatherFace, converted and shipped with the repository (weights/README.md).
PUBLISHED_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "featherface_v1_original.pth"
ONNX_CONFIG_KEY = "featherface_model_config"  # metadata_props entry holding ModelConfig JSON
INPUT_NAME = "input"  # names of the exported raw-output graph (utils/deploy/export.py writes them)
OUTPUT_NAMES: Tuple[str, str, str] = ("bbox_regressions", "classifications", "landmarks")


@dataclass(frozen=True)
class Face:
    """One detection in original-image pixels."""

    box: Tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    landmarks: Tuple[Tuple[float, float], ...]  # 5 (x, y): left eye, right eye, nose, mouth left, mouth right

    @classmethod
    def from_row(cls, row: np.ndarray) -> "Face":
        return cls(tuple(float(v) for v in row[:4]), float(row[4]),
                   tuple((float(row[5 + 2 * i]), float(row[6 + 2 * i])) for i in range(5)))

    def to_dict(self, digits: int = 2) -> Dict[str, object]:
        """JSON-ready dict; pixel coordinates rounded to `digits`, the score to 5 digits."""
        return {"box": [round(v, digits) for v in self.box], "score": round(self.score, 5),
                "landmarks": [[round(x, digits), round(y, digits)] for x, y in self.landmarks]}


def backend_for(weights: Union[str, Path, nn.Module]) -> str:
    """The backend that runs `weights`: "onnx" for a .onnx file, else "torch"."""
    return "onnx" if isinstance(weights, (str, Path)) and Path(weights).suffix.lower() == ".onnx" else "torch"


def torch_device(device: Union[str, torch.device]) -> torch.device:
    """`device` as a torch.device that this machine can use, else FeatherFaceError (an unknown
    name, 'cuda' without a GPU, a GPU index that does not exist)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise FeatherFaceError(f"unknown torch device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    try:
        torch.empty(0, device=parsed)  # fails for a device this machine lacks
    except (RuntimeError, AssertionError) as exc:
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        reason = first_line.split(". ")[0].rstrip(".")  # torch's first sentence
        raise FeatherFaceError(f"torch device {device!r} is not available on this machine ({reason}); "
                               f"use 'cpu'") from exc
    return parsed


class TorchBackend:
    """Runs a FeatherFace nn.Module (eval mode, inference_mode).

    Speed-ups (outputs equal within 1e-4, tests/test_detector.py): `fuse` runs the deployment form
    of the model (a copy with batch norms, fusion weights, shuffles and heads folded,
    utils/deploy/rewrites.py; the caller's model is left as it was); `channels_last` (default: on
    CPU) runs the convs in NHWC layout, which oneDNN's CPU kernels, the depthwise ones
    especially, run about a quarter faster; `keep_memory` (on the CPU) sets the process to keep
    freed memory for the next call (utils/inference/memory.py; as ONNX Runtime's arena does).

    `compile`: run the model through `torch.compile` (inductor), which fuses the many small
    tensor ops of the deformable convs' sampling plans, CBAM and the BiFPN. It pays where many
    inputs share one size (a video, a camera, same-size photos): each new input size compiles
    again (22-65 s on the 2-core CPU here; 14 s for v1 from inductor's disk cache). On the CPU
    it needs a C++ compiler. (Inductor's `freezing` option is not used: it changed the trained
    published model's scores by up to 0.16.)
    """

    def __init__(self, model: nn.Module, device: Union[str, torch.device] = "cpu", fuse: bool = True,
                 channels_last: Optional[bool] = None, keep_memory: bool = True, compile: bool = False) -> None:
        self.device = torch_device(device)
        self.config: ModelConfig = model.config
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if keep_memory and self.device.type == "cpu":
            keep_freed_memory()
        deployed = deploy_model(model, target="torch") if fuse else model
        self.model = deployed.to(self.device, memory_format=self.memory_format).eval()
        self.compiled = torch.compile(self.model, dynamic=False) if compile else None

    def __call__(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device, memory_format=self.memory_format)
        with torch.inference_mode():
            if self.compiled is None:
                return self.model(batch)
            return self._compiled_call(batch)

    def _compiled_call(self, batch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch._dynamo.exc
        import torch._inductor.exc

        try:
            return self.compiled(batch)
        except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise FeatherFaceError(f"torch.compile failed for input {tuple(batch.shape)} (on the CPU it needs a "
                                   f"working C++ compiler; run without --compile / compile=False): "
                                   f"{first_line}") from exc


def ort_session_options(threads: Optional[int] = None):
    """ONNX Runtime session options used for every FeatherFace session: `threads` intra-op threads
    (ORT's default when None) and a thread pool that stops spinning when a run ends.

    With spinning left on, ORT's idle workers keep a core busy after each run, and whatever the
    process does next competes with them: measured on the 2-core CPU, a FaceDetector PyTorch v1
    call right after a RetinaFace run took 131-156 ms against 68-98 ms alone; with the stop, 72-79
    against 74-79. ORT's own latency is unchanged (alternating blocks: 0.97-1.02x). The detector's decode and NMS
    after the network, and benchmark.py's comparisons, depend on it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def session_input_size(session) -> Optional[Tuple[int, int]]:
    """(H, W) of an ONNX Runtime session's image input when fixed (--static_size), None when dynamic."""
    height, width = session.get_inputs()[0].shape[2:]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def _ranks(args) -> Dict[str, int]:
    """name -> rank of an ONNX Runtime session's inputs or outputs (-1: unknown)."""
    return {a.name: -1 if a.shape is None else len(a.shape) for a in args}


def _listed(ranks: Dict[str, int]) -> str:
    return ", ".join(f"{name} (rank {rank})" for name, rank in ranks.items())


def check_raw_output_graph(session, path: Union[str, Path]) -> None:
    """FeatherFaceError unless the session's graph has the raw-output export's interface (what
    utils/deploy/export.py writes): input `input` (B, 3, H, W), outputs bbox_regressions,
    classifications, landmarks (B, N, C). Refuses e.g. the *_postprocess.onnx detection graph."""
    inputs, outputs = _ranks(session.get_inputs()), _ranks(session.get_outputs())
    expected_inputs, expected_outputs = {INPUT_NAME: 4}, {name: 3 for name in OUTPUT_NAMES}
    if (inputs, outputs) != (expected_inputs, expected_outputs):
        raise FeatherFaceError(
            f"{path} is not a FeatherFace raw-output export: expected inputs {_listed(expected_inputs)} and "
            f"outputs {_listed(expected_outputs)}, got inputs {_listed(inputs)} and outputs {_listed(outputs)} "
            f"(a *_postprocess.onnx detection graph is for the deployment package; pass the raw .onnx export)")


class OnnxBackend:
    """Runs an exported raw-output graph with ONNX Runtime (CPU unless providers say otherwise)."""

    def __init__(self, path: Union[str, Path], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FeatherFaceError(f"ONNX model not found: {path}")
        try:
            self.session = ort.InferenceSession(str(path), ort_session_options(threads),
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad files
            raise FeatherFaceError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        check_raw_output_graph(self.session, path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if ONNX_CONFIG_KEY not in meta:
            raise FeatherFaceError(f"{path} has no FeatherFace model config in its metadata; export it with export_dynamic_onnx.py")
        self.config = ModelConfig.from_dict(json.loads(meta[ONNX_CONFIG_KEY]))
        self.device = torch.device("cpu")
        self.fixed_size = session_input_size(self.session)  # FaceDetector letterboxes into it

    def __call__(self, batch: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)


def as_bgr(image: np.ndarray) -> np.ndarray:
    """An image as the network takes it: HxWx3 BGR with 0-255 values.

    Accepted: uint8; float32/float64 holding 0-255 values (one whose values are all <= 1, scaled
    to 0-1, is refused rather than silently finding nothing); uint16 (cv2.imread with
    IMREAD_UNCHANGED of a 16-bit PNG or TIFF), converted to 8 bits by dropping the low byte
    (value >> 8). A grayscale (H, W) or (H, W, 1) array is repeated into three channels (as
    detect.py reads grayscale files); a BGRA (H, W, 4) one loses its alpha channel. Other dtypes
    (bool, signed integers, float16, ...), other shapes and empty images raise FeatherFaceError."""
    if not isinstance(image, np.ndarray):
        raise FeatherFaceError(f"expected an image array, got {type(image).__name__} "
                               f"(cv2.imread returns None for unreadable files)")
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise FeatherFaceError(f"expected a uint8 image (or uint16, or float32/float64 with 0-255 values), "
                               f"got dtype {image.dtype}")
    if image.size == 0:
        raise FeatherFaceError(f"the image is empty (shape {image.shape})")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        image = np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = np.ascontiguousarray(image[:, :, :3])  # BGRA -> BGR
    if image.ndim != 3 or image.shape[2] != 3:
        raise FeatherFaceError(f"expected a BGR image of shape HxWx3 (or grayscale HxW, or BGRA HxWx4), "
                               f"got shape {image.shape}")
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype.kind == "f" and float(np.nanmax(image)) <= 1.0:
        raise FeatherFaceError("float image with all values <= 1: FeatherFace takes 0-255 BGR pixels; "
                               "pass (image * 255) or the uint8 image")
    return image


def checked_fixed_size(size: Optional[Sequence[int]]) -> Optional[Tuple[int, int]]:
    """FaceDetector's fixed_size as an (H, W) tuple of positive ints (None stays None)."""
    if size is None:
        return None
    valid = (isinstance(size, (tuple, list)) and len(size) == 2
             and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size))
    if not valid:
        raise FeatherFaceError(f"fixed_size must be (height, width) in positive whole pixels, got {size!r}")
    return int(size[0]), int(size[1])


class FaceDetector:
    """Find faces with a FeatherFace checkpoint (.pth), an exported .onnx file or a model.

    backend: "auto" (default: onnx for a .onnx file, torch otherwise), "torch" (checkpoint or
    nn.Module) or "onnx" (exported file).
    fuse, channels_last: torch-backend speed-ups that keep outputs within 1e-4 (see TorchBackend);
    channels_last None means on for CPU. compile: torch.compile the network (torch backend; pays
    for many inputs of one size, see TorchBackend).
    threads: intra-op threads for ONNX Runtime (the torch backend follows torch.set_num_threads).
    conf, nms, top_k, keep_top_k: post-processing (PostProcessConfig, which checks them: thresholds
    from 0 to 1, top_k / keep_top_k None or >= 0 with 0 = no limit).
    image_size: None runs each image at its own size; an int resizes so the shorter side is
    that many pixels (longer side capped at `max_size` when given). fixed_size (H, W), or an ONNX
    graph exported with a fixed input size (--static_size), letterboxes each image into that size
    instead (data.preprocess.letterbox; image_size and max_size do not apply; both sides positive
    whole pixels). Boxes and landmarks are returned in original-image pixels, not clipped (see detect).
    """

    def __init__(self, weights: Union[str, Path, nn.Module], backend: str = "auto", device: str = "cpu",
                 image_size: Optional[int] = None, conf: float = DEMO_POSTPROCESS.conf_threshold,
                 nms: float = DEMO_POSTPROCESS.nms_threshold, top_k: Optional[int] = DEMO_POSTPROCESS.top_k,
                 keep_top_k: Optional[int] = DEMO_POSTPROCESS.keep_top_k, max_size: Optional[int] = None,
                 threads: Optional[int] = None, fuse: bool = True, channels_last: Optional[bool] = None,
                 pixel_inclusive_nms: bool = DEMO_POSTPROCESS.pixel_inclusive_nms, compile: bool = False,
                 fixed_size: Optional[Tuple[int, int]] = None) -> None:
        self.postprocess = PostProcessConfig(conf, nms, top_k, keep_top_k, pixel_inclusive_nms)  # checks them
        for name, size in (("image_size", image_size), ("max_size", max_size)):
            if size is not None and not size > 0:
                raise FeatherFaceError(f"{name} must be a positive number of pixels, got {size}")
        fixed_size = checked_fixed_size(fixed_size)
        if backend == "auto":
            backend = backend_for(weights)
        if backend == "torch":
            if isinstance(weights, nn.Module):
                model = weights
            else:
                from utils.checkpoint import load_model

                model, _ = load_model(weights)
            self.backend = TorchBackend(model, device, fuse, channels_last, compile=compile)
        elif backend == "onnx":
            if compile:
                raise FeatherFaceError("compile applies to the torch backend only, not to ONNX Runtime")
            self.backend = OnnxBackend(weights, threads=threads)
        else:
            raise FeatherFaceError(f"unknown backend {backend!r}; use 'torch', 'onnx' or 'auto'")
        self.config = self.backend.config
        self.image_size, self.max_size = image_size, max_size
        graph_size = getattr(self.backend, "fixed_size", None)
        if fixed_size is not None and graph_size is not None and fixed_size != graph_size:
            raise FeatherFaceError(f"fixed_size {fixed_size} differs from the graph's input size {graph_size}")
        self.fixed_size = fixed_size if fixed_size is not None else graph_size

    # Short names of the post-processing settings (read-only views of self.postprocess).
    conf = property(lambda self: self.postprocess.conf_threshold)
    nms = property(lambda self: self.postprocess.nms_threshold)
    top_k = property(lambda self: self.postprocess.top_k)
    keep_top_k = property(lambda self: self.postprocess.keep_top_k)

    @classmethod
    def with_settings(cls, weights: Union[str, Path, nn.Module], settings: PostProcessConfig,
                      **kwargs) -> "FaceDetector":
        """A detector post-processing with `settings` (e.g. WIDER_POSTPROCESS for evaluation)."""
        return cls(weights, conf=settings.conf_threshold, nms=settings.nms_threshold, top_k=settings.top_k,
                   keep_top_k=settings.keep_top_k, pixel_inclusive_nms=settings.pixel_inclusive_nms, **kwargs)

    def scale_for(self, image: np.ndarray) -> float:
        return resize_scale(image.shape[0], image.shape[1], self.image_size, self.max_size)

    def detect_arrays(self, images: Sequence[np.ndarray], scale: Optional[float] = None) -> List[np.ndarray]:
        """Detections per image as (K, 15) float32 arrays [x1, y1, x2, y2, score, 10 landmark
        coords] in original pixels, sorted by score. Each image is resized by its own scale
        (or by `scale` when given); images of equal network-input size share one network call.

        Images of different sizes are not padded into one batch: padding would change the
        result (CBAM's global pools and the border activations see the padded area), and each
        image must get the same faces as `detect` on its own.
        """
        images = [as_bgr(image) for image in images]
        fixed_size = self.fixed_size
        if fixed_size is not None:
            if scale is not None:
                raise FeatherFaceError(f"this detector letterboxes into one input size {fixed_size[0]}x"
                                       f"{fixed_size[1]} (fixed_size, or a graph exported with --static_size): it "
                                       f"cannot run images at a given scale; use a dynamic-size export for that")
            boxed = [letterbox(im, fixed_size) for im in images]
            tensors, scales = [t for t, _ in boxed], [s for _, s in boxed]
        else:
            scales = [self.scale_for(im) if scale is None else scale for im in images]
            tensors = [preprocess(im, s) for im, s in zip(images, scales)]
        by_size: Dict[Tuple[int, int], List[int]] = {}
        detect_kwargs = dataclasses.asdict(self.postprocess)
        for i, t in enumerate(tensors):
            by_size.setdefault((t.shape[1], t.shape[2]), []).append(i)
        results: List[np.ndarray] = [np.empty(0)] * len(images)
        for size, indices in by_size.items():
            loc, conf, landm = self.backend(torch.stack([tensors[i] for i in indices]))
            priors = prior_boxes_for(self.config, size, device=loc.device)  # cached per (H, W)
            for row, i in enumerate(indices):
                results[i] = detect_faces(loc[row], conf[row], landm[row], priors, self.config.variance, size,
                                          scales[i], **detect_kwargs)
        return results

    def detect_array(self, image: np.ndarray, scale: Optional[float] = None) -> np.ndarray:
        return self.detect_arrays([image], scale)[0]

    def detect(self, image: np.ndarray) -> List[Face]:
        """Faces in one BGR (or grayscale HxW) image with 0-255 values, highest score first (the
        dtypes and shapes accepted: `as_bgr`).

        Boxes and landmarks are not clipped to the image: a face at the border can get coordinates
        slightly outside it (e.g. x1 = -0.13). They are left as the network decodes them because the
        WIDER FACE protocol and the published numbers use them unclipped; clip them yourself for
        cropping (e.g. np.clip(x, 0, width))."""
        return [Face.from_row(row) for row in self.detect_array(image)]

    def detect_batch(self, images: Sequence[np.ndarray]) -> List[List[Face]]:
        """Faces per image for several BGR images (one network call)."""
        return [[Face.from_row(r) for r in rows] for rows in self.detect_arrays(images)]
