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
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

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


def interleaved_latencies(fns: Sequence[Callable[[], object]], runs: int, warmup: int, rounds: int,
                          partners: Optional[Sequence[Optional[int]]] = None
                          ) -> Tuple[List[List[Latency]], List[List[Optional[Latency]]]]:
    """Time several callables in `rounds` interleaved rounds (each round: every fn `runs` times,
    one after the other), so that all of them see the same machine load.

    `partners[i]` (an index, or None): in every round fn i's block of calls directly follows a
    block of its partner's, timed for the pair alone, so that a ratio of the two compares calls
    made well under a second apart (a shared host's speed drifts over seconds). Each block
    starts with one untimed call: right after another runtime (ONNX Runtime's spinning thread
    pool, OpenMP's) the first call can take twice as long.

    Returns (per fn its Latency of each round, per fn its partner's paired Latency of each round
    or None)."""
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    partners = list(partners) if partners is not None else [None] * len(fns)
    for fn in fns:
        for _ in range(warmup):
            fn()
    own: List[List[Latency]] = [[] for _ in fns]
    paired: List[List[Optional[Latency]]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            partner = partners[i]
            if partner is None or partner == i:
                paired[i].append(None)
            else:
                paired[i].append(measure_latency(fns[partner], runs, 1))
            own[i].append(measure_latency(fn, runs, 1))
    return own, paired


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


@dataclass
class BenchConfig:
    """One timed configuration; `make` builds its runner (a callable taking the input batch)."""

    label: str
    backend: str
    threads: int
    batch: int
    size: Tuple[int, int]
    flops: Optional[int]
    make: Callable[[], Callable]
    baseline: bool = False


def prepare_config(config: BenchConfig) -> Tuple[Callable[[], object], Optional[float]]:
    """(timed call, peak memory rise in MiB); the runner is built inside the memory measurement."""
    torch.set_num_threads(config.threads)
    x = torch.randn(config.batch, 3, *config.size, generator=torch.Generator().manual_seed(0)) * 50
    config.make()(x)  # one-time library set-up (ORT, oneDNN) must not count as this configuration's memory
    with track_peak_memory() as peak:
        run = config.make()
        run(x)

    def call() -> object:
        torch.set_num_threads(config.threads)
        return run(x)

    return call, peak.mb


def measure_configs(configs: List[BenchConfig], runs: int, warmup: int, rounds: int,
                    log: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
    """Time every configuration: one table row each (median/p90 ms, images/s, GFLOPs, peak MiB).
    When one is a baseline, all are timed in `rounds` interleaved rounds, each configuration's
    block of calls right after a block of the baseline's at the same threads, batch and size,
    and each row gets `ratio` (median over rounds of its round median / the paired baseline
    block's median) and `ratio_range` (min, max over rounds)."""
    prepared = [prepare_config(c) for c in configs]
    rounds = rounds if any(c.baseline for c in configs) else 1
    key = lambda c: (c.threads, c.batch, c.size)  # noqa: E731
    baselines = {key(c): i for i, c in enumerate(configs) if c.baseline and key(c) not in
                 {key(b) for b in configs[:i] if b.baseline}}
    partners = [baselines.get(key(c)) for c in configs]
    per_round, paired = interleaved_latencies([call for call, _ in prepared], max(1, -(-runs // rounds)), warmup,
                                              rounds, partners)
    rows = []
    for i, (config, (_, peak_mb)) in enumerate(zip(configs, prepared)):
        latency = Latency([t for lat in per_round[i] for t in lat.times])
        row = {"model": config.label, "backend": config.backend, "threads": config.threads, "batch": config.batch,
               "size": f"{config.size[0]}x{config.size[1]}", "median_ms": round(latency.median_ms, 2),
               "p90_ms": round(latency.p90_ms, 2), "images_per_s": round(latency.images_per_s(config.batch), 2),
               "gflops": None if config.flops is None else round(config.flops * config.batch / 1e9, 3),
               "peak_mb": None if peak_mb is None else round(peak_mb, 1), "ratio": None, "ratio_range": None}
        base = partners[i]
        if base is not None:
            partner_rounds = per_round[i] if base == i else paired[i]
            ratios = [a.median_ms / b.median_ms for a, b in zip(per_round[i], partner_rounds)]
            row["ratio"] = round(statistics.median(ratios), 3)
            row["ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        if log is not None:
            log(row)
        rows.append(row)
    return rows


def ratio_summary(rows: List[Dict], baseline: str, rounds: int) -> str:
    """The rows' same-run ratios to `baseline`, one line each."""
    lines = [f"\nSame-run ratios to {baseline} (median of {rounds} interleaved rounds [min-max]):"]
    for r in rows:
        if r["ratio"] is not None and r["model"] != baseline:
            lines.append(f"  {r['model']:<32} {r['backend']:<12} {r['size']} {r['threads']} thread(s), batch "
                         f"{r['batch']}: {r['ratio']:.2f} [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}]")
    return "\n".join(lines)


def markdown_table(rows: List[Dict]) -> str:
    """Benchmark rows as a Markdown table."""
    cols = ["model", "backend", "threads", "batch", "size", "median_ms", "p90_ms", "images_per_s", "gflops", "peak_mb",
            "ratio"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class CpuTicks(NamedTuple):
    """Clock ticks of all CPUs since boot (Linux /proc/stat)."""

    busy: int  # not idle: user, nice, system, irq, softirq and steal
    total: int
    steal: int  # taken by the hypervisor for other virtual machines while this one wanted to run


def _cpu_times(stat_path: str = "/proc/stat") -> Optional[CpuTicks]:
    """All CPUs' ticks since boot (Linux /proc/stat), None elsewhere."""
    try:
        with open(stat_path) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return CpuTicks(total - idle, total, fields[7] if len(fields) > 7 else 0)


def _tick_share(before: CpuTicks, after: CpuTicks, part: str) -> float:
    """Share (0..1) of all CPUs' ticks between two `_cpu_times` readings counted in field `part`."""
    total = after.total - before.total
    return min(max((getattr(after, part) - getattr(before, part)) / total, 0.0), 1.0) if total > 0 else 0.0


def busy_fraction(before: CpuTicks, after: CpuTicks) -> float:
    """Share of CPU time spent busy between two `_cpu_times` readings (0..1)."""
    return _tick_share(before, after, "busy")


BUSY_WARNING = 0.3  # busy share of all CPUs, with this process idle, above which timings are suspect


def cpu_busy_before_run(interval: float = 0.5, warn: bool = False) -> Optional[float]:
    """Share of all CPUs busy with other work over `interval` seconds while this process sleeps
    (None where /proc/stat is missing); `warn`: say so on stderr above BUSY_WARNING. Other work
    on the cores makes timings, and with several threads the ratios of a same-run comparison
    too, unreliable: OpenMP and ONNX Runtime threads that wait for a descheduled partner slow
    down many times (one FeatherFace SSH call took 330-490 ms beside a test run on this 2-core
    CPU, 9.4 ms alone)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(interval)
    after = _cpu_times()
    busy = None if after is None else busy_fraction(before, after)
    if warn and busy is not None and busy > BUSY_WARNING:
        print(f"warning: {busy:.0%} of the CPUs' time went to other work just before this run; timings, and "
              f"with several threads the ratios too, can be many times off (run on an idle machine, or use "
              f"--threads 1)", file=sys.stderr, flush=True)
    return busy


STEAL_WARNING = 0.05  # share of all CPUs' time taken by the hypervisor during a run, above which we say so


def steal_fraction(before: CpuTicks, after: CpuTicks) -> float:
    """Share of all CPUs' time between two `_cpu_times` readings that the hypervisor took (0..1)."""
    return _tick_share(before, after, "steal")


@contextmanager
def cpu_steal_during(warn: bool = False) -> Iterator[Dict[str, Optional[float]]]:
    """Yields a dict that holds, once the block has run, "cpu_steal_during_run": the share of all
    CPUs' time the hypervisor took for other virtual machines while the block ran (None where
    /proc/stat is missing). `warn`: say so on stderr above STEAL_WARNING. On the 2-core virtual
    machines here it was 13 % during one 8-second ONNX Runtime comparison: stolen time lands on
    some calls and not on others, so latencies and the rounds' ratios spread (see their ranges),
    whatever the machine's own load."""
    result: Dict[str, Optional[float]] = {"cpu_steal_during_run": None}
    before = _cpu_times()
    yield result
    after = _cpu_times()
    if before is None or after is None:
        return
    steal = result["cpu_steal_during_run"] = round(steal_fraction(before, after), 4)
    if warn and steal > STEAL_WARNING:
        print(f"warning: the hypervisor took {steal:.0%} of the CPUs' time during the timed run (steal): calls "
              f"slowed unevenly, so latencies and ratios vary more than on a dedicated machine (see the ratio "
              f"ranges; rerun, or use more --rounds)", file=sys.stderr, flush=True)


def machine_info() -> Dict:
    """Platform, CPU count, load and library versions, stored beside benchmark results."""
    import onnxruntime

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_at_end": load, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}
