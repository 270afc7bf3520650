"""Time torchvision's CPU deform_conv2d against deform_conv2d_fast on FeatherFace V1 SSH shapes.

Every V1 SSH has five deformable 3x3 convs (C->C/2, C->C/4, then three C/4->C/4), one SSH per
pyramid level (strides 8/16/32), so a model has 15. Prints the median time per call for each
shape and the sum over the 15, forward-only (inference_mode) and forward+backward.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torchvision.ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.deform_conv import deform_conv2d_fast  # noqa: E402

Shape = Tuple[int, int, int]  # (in_channels, out_channels, map size)


def ssh_shapes(
    channels: int, image_size: int, strides: Tuple[int, ...] = (8, 16, 32)
) -> List[Shape]:
    """The 15 (Cin, Cout, HxW) deformable convs of one V1 model at a square input."""
    quarter = channels // 4
    shapes = []
    for stride in strides:
        size = -(-image_size // stride)
        shapes += [(channels, channels // 2, size), (channels, quarter, size)]
        shapes += [(quarter, quarter, size)] * 3
    return shapes


def make_inputs(shape: Shape, batch: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random activations, offsets within +-2 px and masks in (0, 2) like 2*sigmoid()."""
    cin, cout, size = shape
    gen = torch.Generator().manual_seed(seed)
    return {
        "input": torch.randn(batch, cin, size, size, generator=gen),
        "offset": torch.rand(batch, 18, size, size, generator=gen) * 4 - 2,
        "mask": 2 * torch.sigmoid(torch.randn(batch, 9, size, size, generator=gen)),
        "weight": torch.randn(cout, cin, 3, 3, generator=gen) / (9 * cin) ** 0.5,
    }


def call(fn: Callable, t: Dict[str, torch.Tensor]) -> torch.Tensor:
    return fn(t["input"], t["offset"], t["weight"], None, (1, 1), (1, 1), (1, 1), t["mask"])


def time_call(fn: Callable, t: Dict[str, torch.Tensor], backward: bool, repeats: int,
              warmup: int) -> float:
    """Median seconds per call (forward in inference_mode, or forward + backward of all inputs)."""
    if backward:
        t = {k: v.clone().requires_grad_() for k, v in t.items()}
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        if backward:
            out = call(fn, t)
            out.backward(torch.ones_like(out))
        else:
            with torch.inference_mode():
                call(fn, t)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[52, 64],
                        help="SSH widths C (divisible by 4)")
    parser.add_argument("--image-size", type=int, default=640, help="square input size in pixels")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch.set_num_threads values")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--forward-only", action="store_true",
                        help="skip the forward+backward timings")
    return parser


def main(args: argparse.Namespace) -> None:
    backends = {"torchvision": torchvision.ops.deform_conv2d, "fast": deform_conv2d_fast}
    modes = [False] if args.forward_only else [False, True]
    summary = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for channels in args.channels:
            shapes = ssh_shapes(channels, args.image_size)
            for backward in modes:
                mode = "fwd+bwd" if backward else "fwd (inference)"
                totals = dict.fromkeys(backends, 0.0)
                for shape in dict.fromkeys(shapes):  # unique shapes, weighted by their count
                    count = shapes.count(shape)
                    tensors = make_inputs(shape, args.batch)
                    ms = {
                        name: 1e3 * time_call(fn, tensors, backward, args.repeats, args.warmup)
                        for name, fn in backends.items()
                    }
                    for name in backends:
                        totals[name] += count * ms[name]
                    cin, cout, size = shape
                    print(f"threads={threads} C={channels} {mode:15s} {cin:>3}->{cout:<3} "
                          f"{size:>3}x{size:<3} x{count}: "
                          f"torchvision {ms['torchvision']:8.2f} ms  fast {ms['fast']:7.2f} ms  "
                          f"({ms['torchvision'] / ms['fast']:.1f}x)", flush=True)
                summary.append((threads, channels, mode, totals))
    size = f"{args.image_size}x{args.image_size}"
    print(f"\nSum over the model's 15 DCNs (batch {args.batch}, {size} input, "
          f"median of {args.repeats}):")
    for threads, channels, mode, totals in summary:
        tv, fast = totals["torchvision"], totals["fast"]
        print(f"  threads={threads} C={channels} {mode:15s} torchvision {tv:8.1f} ms  "
              f"fast {fast:7.1f} ms  ({tv / fast:.1f}x)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
