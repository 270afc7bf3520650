"""utils/inference/memory.py: the PyTorch backend keeps freed memory instead of page-faulting.

Each check runs in a fresh interpreter: the malloc settings are per process and permanent.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc settings apply to glibc on Linux only")

FAULTS_PER_CALL = """
import json, resource, sys
import torch
from models import build_model
from utils.inference.detector import TorchBackend
from utils.inference.memory import freed_memory_kept
torch.set_num_threads(2)
run = TorchBackend(build_model("v2"), fuse=False, channels_last=False, keep_memory=sys.argv[1] == "keep")
x = torch.randn(1, 3, 640, 640)
for _ in range(3):
    run(x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    run(x)
print(json.dumps({"faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4,
                  "kept": freed_memory_kept()}))
"""


def _run(code: str, *args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_torch_backend_calls_do_not_page_fault():
    """v2 at 640x640 as built: with glibc's defaults about 3,500-4,400 minor faults per call here
    (fresh zero-filled pages for the activations of every call); kept, none or a few hundred."""
    kept = _run(FAULTS_PER_CALL, "keep")
    assert kept["kept"] is True
    assert kept["faults"] < 500, kept
    system = _run(FAULTS_PER_CALL, "system")
    assert system["kept"] is False
    if system["faults"] < 1000:  # another allocator (LD_PRELOAD) or glibc version: nothing to compare
        pytest.skip(f"this process's malloc does not page-fault per call by default ({system['faults']:.0f})")
    assert kept["faults"] < system["faults"] / 5, (kept, system)


def test_user_malloc_settings_win():
    code = "import json; from utils.inference.memory import keep_freed_memory; print(json.dumps({'kept': keep_freed_memory()}))"
    assert _run(code)["kept"] is True
    assert _run(code, env={"MALLOC_TRIM_THRESHOLD_": "1000000"})["kept"] is False
