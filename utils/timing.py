"""Measuring inference: latency statistics, FLOPs and peak resident memory (benchmark.py).

- Latency: wall-clock (time.perf_counter) of each call after warm-up; median and p90.
- FLOPs: torch.utils.flop_counter (2 x multiply-adds of convs, linears and matmuls;
  element-wise ops, pooling and softmax are not counted). A deformable conv counts as the
  dense conv it generalises (2 * B * Cout * Ho * Wo * Cin/g * kh * kw) plus its offset and
  mask convs (ordinary convs); its bilinear sampling is not counted.
- Peak memory: the rise of the process's peak resident set size (Linux VmHWM, reset through
  /proc/self/clear_refs) over its resident size just before the measured block, after
  returning freed heap memory to the OS (malloc_trim). It covers activations, workspaces
  and anything the block allocates (an ONNX Runtime session's weights and arena included).
  None where the kernel interface is missing.
"""
from __future__ import annotations

import ctypes
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.deform_conv import deform_backend


@dataclass(frozen=True)
class Latency:
    """Per-call wall-clock times (seconds) of one configuration."""

    times: List[float]

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times)

    @property
    def p90_ms(self) -> float:
        ordered = sorted(self.times)
        return 1000 * ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]

    def images_per_s(self, batch: int) -> float:
        """Throughput over all timed calls: images processed / total time."""
        return batch * len(self.times) / sum(self.times)


def measure_latency(fn: Callable[[], object], runs: int, warmup: int) -> Latency:
    """Call `fn` `warmup` times untimed, then `runs` times timed."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Latency(times)


def _deform_conv_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    cout, cin_per_group, kh, kw = weight_shape
    batch, _, ho, wo = out_shape
    return 2 * batch * cout * ho * wo * cin_per_group * kh * kw


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of `model` on `x` (see the module docstring for what counts)."""
    mapping = {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}
    # torchvision's op is what the counter can see; the fast CPU path is a chain of mm/gathers
    # whose FLOPs depend on the implementation, not on the model.
    with deform_backend("torchvision"), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.eval()(x)
    return counter.get_total_flops()


def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> Optional[int]:
    """Trim the heap, reset VmHWM to the current RSS; returns that RSS in kB (None if unsupported)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (Linux >= 4.0)
    except OSError:
        return None
    return _read_status_kb("VmRSS")


class PeakMemory:
    """Set by `track_peak_memory`: `mb` is the peak RSS rise in MiB, or None."""

    mb: Optional[float] = None


@contextmanager
def track_peak_memory() -> Iterator[PeakMemory]:
    """Measure the peak resident-memory rise of the enclosed block (Linux only)."""
    result = PeakMemory()
    base = _reset_peak_rss()
    yield result
    peak = _read_status_kb("VmHWM")
    if base is not None and peak is not None:
        result.mb = max(peak - base, 0) / 1024
