"""Keep freed heap memory in the process for the next inference call (glibc malloc).

PyTorch's CPU tensors are plain malloc/free. With glibc's default settings, memory freed at the
end of a forward pass is partly handed back to the kernel (heap trimming, and mmap for large
blocks), so the next pass touches fresh pages and the kernel zero-fills each one on its first
write. Measured on the 2-core CPU (2 threads): `build_model("v1").eval()` took about 3,500-7,000
page faults per 640x640 call (15-23 ms of kernel time per call) and 24,000 at 1280x1280; with
the settings below, 0-320 (either size). ONNX Runtime allocates from its own arena and takes none.

`keep_freed_memory()` raises glibc's trim threshold (freed memory at the top of the heap is
kept up to `trim_threshold_mb`) and fixes the mmap threshold (blocks up to `mmap_threshold_mb`
come from the heap, where freed memory is reused; glibc's own adaptive threshold stops at the
same 32 MiB). It changes the whole process, once; FaceDetector's PyTorch backend calls it on
the CPU (and so detect.py, test_widerface.py and benchmark.py). Elsewhere (macOS, Windows,
musl, or a process whose MALLOC_* environment variables already chose these settings) it does
nothing and returns False.
"""
from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_state: Optional[bool] = None  # the first call's result; later calls return it


def keep_freed_memory(mmap_threshold_mb: int = 32, trim_threshold_mb: int = 64) -> bool:
    """Set glibc's malloc to keep freed memory for reuse; True when the settings are in place."""
    global _state
    if _state is None:
        _state = _apply(mmap_threshold_mb << 20, trim_threshold_mb << 20)
    return _state


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory()` has put its settings in place in this process."""
    return bool(_state)


def _apply(mmap_threshold: int, trim_threshold: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False  # the user's own malloc settings win
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):
        return False
