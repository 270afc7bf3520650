"""Inference speed of FeatherFace models: PyTorch eager vs ONNX Runtime, on the CPU.

    python benchmark.py --models v1 v2 --weights weights/featherface_v1_original_widerface_converted.pth
    python benchmark.py --quick --json bench.json --compare other_detector.onnx

For every model x input size (square) x batch x thread count x backend: median and p90 latency
of the network call (the exact call FaceDetector makes; preprocessing, decode and NMS excluded)
over --runs timed calls after --warmup untimed ones, throughput (images / total timed time),
FLOPs and the peak resident-memory rise (see utils/timing.py for what each one counts).
Backends: torch (eager as FaceDetector runs it: batch norms folded, channels-last on CPU),
torch_plain (the model as built: batch norms, NCHW), onnx (ONNX Runtime, CPU provider).
Random-init models unless --weights; ONNX files are exported to a temporary folder.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from data.config import CONFIGS
from models import build_model
from utils.checkpoint import load_model
from utils.inference.detector import OnnxBackend, TorchBackend
from utils.errors import FeatherFaceError, run_cli
from utils.timing import count_flops, measure_latency, track_peak_memory

BACKENDS = ("torch", "torch_plain", "onnx")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark FeatherFace inference (PyTorch eager vs ONNX Runtime).")
    p.add_argument("--models", nargs="*", default=["v1", "v2"], choices=sorted(CONFIGS), help="random-init models")
    p.add_argument("--weights", nargs="*", type=Path, default=[], help="checkpoints to benchmark as well")
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640], help="square input sizes (pixels)")
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="intra-op thread counts")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["torch", "onnx"], help="what to time")
    p.add_argument("--runs", type=int, default=30, help="timed calls per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--compare", nargs="*", type=Path, default=[], help="other ONNX models (one NCHW float input) to time")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-configuration lines on stderr")
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests: size 64, 1 thread, 3 runs")
    return p


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Raw-output ONNX with dynamic batch/height/width, through the one exporter."""
    from utils.deploy.export import export_onnx as export  # the project's single export path

    # The example size only seeds tracing; batch, height and width stay dynamic.
    return export(model, path, image_size=320)


def compare_runner(path: Path, threads: int) -> Callable[[torch.Tensor], object]:
    """Run any single-input ONNX model (all outputs fetched)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def input_dims(path: Path) -> List[Optional[int]]:
    """[batch, H, W] of an ONNX model's first input; None where the dim is dynamic."""
    import onnxruntime as ort

    shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    if len(shape) != 4:
        raise FeatherFaceError(f"{path}: expected one NCHW input, got shape {shape}")
    return [d if isinstance(d, int) else None for d in (shape[0], shape[2], shape[3])]


def bench(label: str, backend: str, make: Callable[[], Callable], args: argparse.Namespace, threads: int,
          batch: int, size: Tuple[int, int], flops: Optional[int]) -> Dict:
    """Time one configuration; `make` builds the runner inside the memory measurement."""
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0)) * 50
    make()(x)  # one-time library set-up (ORT, oneDNN) must not count as this configuration's memory
    with track_peak_memory() as peak:
        run = make()
        latency = measure_latency(lambda: run(x), args.runs, args.warmup)
    row = {"model": label, "backend": backend, "threads": threads, "batch": batch, "size": f"{size[0]}x{size[1]}",
           "median_ms": round(latency.median_ms, 2), "p90_ms": round(latency.p90_ms, 2),
           "images_per_s": round(latency.images_per_s(batch), 2),
           "gflops": None if flops is None else round(flops * batch / 1e9, 3),
           "peak_mb": None if peak.mb is None else round(peak.mb, 1)}
    if not args.quiet:
        print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
    return row


def main(args: argparse.Namespace) -> List[Dict]:
    load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.quick:
        args.sizes, args.threads, args.batch, args.runs, args.warmup = [64], [1], [1], 3, 1
    if min(args.sizes) < 32 or min(args.batch) < 1 or min(args.threads) < 1 or args.runs < 1 or args.warmup < 0:
        raise FeatherFaceError("need --sizes >= 32, --batch/--threads/--runs >= 1 and --warmup >= 0")
    models = [(name, build_model(name)) for name in args.models]
    for path in args.weights:
        model, _ = load_model(path)
        models.append((f"{model.config.name} ({path.name})", model))
    if not models and not args.compare:
        raise FeatherFaceError("nothing to benchmark: give --models, --weights or --compare")
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="featherface-bench-") as tmp:
        for index, (label, model) in enumerate(models):
            model.eval()
            onnx_path = export_onnx(model, Path(tmp) / f"model{index}.onnx") if "onnx" in args.backends else None
            makers = {"torch": lambda: TorchBackend(model, fuse=True),
                      "torch_plain": lambda: TorchBackend(model, fuse=False, channels_last=False),
                      "onnx": lambda: OnnxBackend(onnx_path, threads=threads)}  # noqa: B023 - used at once
            for s in args.sizes:
                flops = count_flops(model, torch.zeros(1, 3, s, s))
                for batch, threads, backend in itertools.product(args.batch, args.threads, args.backends):
                    rows.append(bench(label, backend, makers[backend], args, threads, batch, (s, s), flops))
        for path in args.compare:
            fixed_batch, height, width = input_dims(path)
            sizes = [(height, width)] if height and width else [(height or s, width or s) for s in args.sizes]
            batches = [fixed_batch] if fixed_batch else args.batch
            for size, batch, threads in itertools.product(sizes, batches, args.threads):
                rows.append(bench(path.name, "onnx_compare", lambda: compare_runner(path, threads), args,  # noqa: B023
                                  threads, batch, size, None))
    print(markdown_table(rows))
    if args.json:
        machine = {**machine_info(), "load_avg_at_start": load_at_start}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "settings": vars(args), "results": rows},
                                        indent=1, default=str))
    return rows


def markdown_table(rows: List[Dict]) -> str:
    cols = ["model", "backend", "threads", "batch", "size", "median_ms", "p90_ms", "images_per_s", "gflops", "peak_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> Dict:
    import onnxruntime

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_at_end": load, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
