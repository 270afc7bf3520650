"""tools/gpu_check.py: skips cleanly without CUDA; its checks run (on the CPU) as written."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_check(*args: str, timeout: int = 600, **env: str):
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **env))


def test_skips_with_a_clear_message_without_cuda():
    out = run_check(timeout=120, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert "GPU readiness check skipped: CUDA is not available" in out.stdout and "[PASS]" not in out.stdout


@pytest.mark.slow
def test_checks_run_on_the_cpu():
    out = run_check("--device", "cpu", "--image_size", "96", "--batch_size", "2", "--steps", "1",
                    "--checks", "v2", "deform", OMP_NUM_THREADS="1")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("[PASS] V2 AMP training step") and "images/s" in line for line in lines), out.stdout
    assert any(line.startswith("[PASS] deformable conv") for line in lines) and "ready (2 of 2" in out.stdout
