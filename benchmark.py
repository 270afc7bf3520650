"""Inference speed of FeatherFace models: PyTorch eager vs ONNX Runtime, on the CPU.

    python benchmark.py --compare ../shared/weights/retinaface_mnet025.onnx
    python benchmark.py --models v1 --weights weights/featherface_v1_original.pth --sizes 320 640 --threads 1 2

For every model x input size (square) x batch x thread count x backend: median and p90 latency of the network call
(the exact call FaceDetector makes; preprocessing, decode and NMS excluded) over --runs timed calls after --warmup
untimed ones, throughput (images / total timed time), FLOPs and the peak resident-memory rise (see utils/timing.py for
what each one counts). Backends: torch (FaceDetector's PyTorch path: the deployment form of utils/deploy/rewrites.py,
channels-last on CPU), compiled (that path through torch.compile, as FaceDetector(compile=True) and detect.py
--compile run it; it compiles in an untimed set-up call), eager (the model as built, `build_model(name).eval()` under
inference_mode), onnx (the exported graph in ONNX Runtime's CPU provider), onnx_plain (the graph traced from the model
as built). Random-init models unless --weights; ONNX files are exported to a temporary folder. The PyTorch backends
keep freed memory in the process, as FaceDetector does (utils/inference/memory.py); --system_malloc leaves glibc's
defaults.

--compare BASELINE.onnx (e.g. RetinaFace-mnet0.25) times the baseline in the same run and adds each configuration's
ratio to the baseline at the same size, batch and threads. In each of --rounds interleaved rounds every
configuration's block of calls runs right after a block of the baseline's (each block starting with an untimed call);
the ratio is the median over rounds of the model's block median / the paired baseline block's median, with the range
over rounds, so a machine whose speed drifts (a shared host) still gives comparable figures. The run warns when other
work held the CPUs just before it, or the hypervisor took a share of their time during it (--json stores both).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from data.config import CONFIGS
from models import build_model
from utils.checkpoint import load_model
from utils.inference.detector import OnnxBackend, TorchBackend, ort_session_options
from utils.inference.memory import freed_memory_kept
from utils.errors import FeatherFaceError, check_output_path, non_negative_int, positive_int, run_cli
from utils.timing import (BenchConfig, count_flops, cpu_busy_before_run, cpu_steal_during, machine_info, markdown_table,
                          measure_configs, ratio_summary)

BACKENDS = ("torch", "compiled", "eager", "onnx", "onnx_plain")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark FeatherFace inference (PyTorch eager vs ONNX Runtime).")
    p.add_argument("--models", nargs="*", default=["v2", "v1", "v1_original", "v1_slim"], choices=sorted(CONFIGS),
                   help="random-init models")
    p.add_argument("--weights", nargs="*", type=Path, default=[], help="checkpoints to benchmark as well")
    p.add_argument("--sizes", nargs="+", type=int, default=[640], help="square input sizes (pixels)")
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1], help="batch sizes")
    p.add_argument("--threads", nargs="+", type=positive_int, default=[2], help="intra-op thread counts")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["onnx", "torch", "eager"], help="what to time")
    p.add_argument("--runs", type=positive_int, default=30, help="timed calls per configuration")
    p.add_argument("--warmup", type=non_negative_int, default=5, help="untimed calls before timing")
    p.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds when --compare is given")
    p.add_argument("--compare", nargs="*", type=Path, default=[],
                   help="other ONNX models (one NCHW float input) to time; the first is the ratio baseline")
    p.add_argument("--system_malloc", action="store_true",
                   help="leave glibc's malloc settings as they are (PyTorch backends then page-fault on every call; "
                        "see utils/inference/memory.py)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no per-configuration lines on stderr")
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests: size 64, 1 thread, 3 runs")
    return p


def export_onnx(model: torch.nn.Module, path: Path, rewrite: bool = True) -> Path:
    """Raw-output ONNX with dynamic batch/height/width, through the one exporter (the example size only
    seeds tracing)."""
    from utils.deploy.export import export_onnx as export  # the project's single export path
    return export(model, path, image_size=320, rewrite=rewrite)


def compare_runner(path: Path, threads: int) -> Callable[[torch.Tensor], object]:
    """Run any single-input ONNX model (all outputs fetched)."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def input_dims(path: Path) -> List[Optional[int]]:
    """[batch, H, W] of an ONNX model's first input; None where the dim is dynamic."""
    import onnxruntime as ort
    try:
        shape = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    except Exception as exc:  # noqa: BLE001 - missing, not ONNX, unsupported ops: the same user error
        raise FeatherFaceError(f"--compare {path}: ONNX Runtime cannot load it as a model ({exc})") from None
    if len(shape) != 4:
        raise FeatherFaceError(f"{path}: expected one NCHW input, got shape {shape}")
    return [d if isinstance(d, int) else None for d in (shape[0], shape[2], shape[3])]


def main(args: argparse.Namespace) -> List[Dict]:
    at_start = {"load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
                "cpu_busy_at_start": cpu_busy_before_run(warn=True)}  # warns when other work holds the CPUs
    if args.quick:
        args.sizes, args.threads, args.batch, args.runs, args.warmup, args.rounds = [64], [1], [1], 3, 1, 2
    if min(args.sizes) < 32:
        raise FeatherFaceError(f"--sizes must be at least 32 pixels, got {min(args.sizes)}")
    check_output_path(args.json, "--json")  # before anything is timed
    compare_dims = {path: input_dims(path) for path in args.compare}  # a bad --compare file fails now
    models = [(name, build_model(name)) for name in args.models]
    for path in args.weights:
        model, _ = load_model(path)
        models.append((f"{model.config.name} ({path.name})", model))
    if not models and not args.compare:
        raise FeatherFaceError("nothing to benchmark: give --models, --weights or --compare")
    combos = list(itertools.product(args.sizes, args.batch, args.threads))
    configs: List[BenchConfig] = []
    with tempfile.TemporaryDirectory(prefix="featherface-bench-") as tmp:
        for path, (fixed_batch, height, width) in compare_dims.items():
            # A fixed-shape model gives the same configuration for several combos: time it once.
            for size, batch, threads in dict.fromkeys(((height or s, width or s), fixed_batch or b, t)
                                                      for s, b, t in combos):
                configs.append(BenchConfig(path.name, "onnx_compare", threads, batch, size, None,
                                           lambda p=path, t=threads: compare_runner(p, t), baseline=path == args.compare[0]))
        for index, (label, model) in enumerate(models):
            model.eval()
            onnx_paths = {b: export_onnx(model, Path(tmp) / f"model{index}_{b}.onnx", rewrite=b == "onnx")
                          for b in ("onnx", "onnx_plain") if b in args.backends}
            flops = {s: count_flops(model, torch.zeros(1, 3, s, s)) for s in args.sizes}
            keep = not args.system_malloc
            for (s, batch, threads), backend in itertools.product(combos, args.backends):
                # One compiled backend per configuration, built on first use: the set-up call compiles
                # (at this configuration's thread count) and the memory and timed calls reuse it.
                compiled = functools.lru_cache(maxsize=None)(
                    lambda m=model: TorchBackend(m, fuse=True, keep_memory=keep, compile=True))
                makers = {"torch": lambda m=model: TorchBackend(m, fuse=True, keep_memory=keep),
                          "compiled": compiled,
                          "eager": lambda m=model: TorchBackend(m, fuse=False, channels_last=False, keep_memory=keep),
                          "onnx": lambda p=onnx_paths.get("onnx"), t=threads: OnnxBackend(p, threads=t),
                          "onnx_plain": lambda p=onnx_paths.get("onnx_plain"), t=threads: OnnxBackend(p, threads=t)}
                configs.append(BenchConfig(label, backend, threads, batch, (s, s), flops[s], makers[backend]))
        with cpu_steal_during(warn=True) as during:  # warns when the hypervisor took much of the CPUs' time
            rows = measure_configs(configs, args.runs, args.warmup, args.rounds, log=None if args.quiet else log)
    print(markdown_table(rows))
    if args.compare:
        print(ratio_summary(rows, args.compare[0].name, args.rounds))
    if args.json:
        machine = {**machine_info(), **at_start, **during, "freed_memory_kept": freed_memory_kept()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "settings": vars(args), "results": rows},
                                        indent=1, default=str))
    return rows


def log(row: Dict) -> None:
    print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
