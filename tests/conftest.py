"""Shared test fixtures. Real data lives in ../shared (override with FEATHERFACE_SHARED)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("FEATHERFACE_SHARED", ROOT.parent / "shared"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_path(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} (set FEATHERFACE_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """data.check's decode cache in a temporary folder, not the user's ~/.cache (scripts run
    by the tests inherit it through the environment)."""
    previous = os.environ.get("FEATHERFACE_CACHE")
    os.environ["FEATHERFACE_CACHE"] = str(tmp_path_factory.mktemp("featherface_cache"))
    yield Path(os.environ["FEATHERFACE_CACHE"])
    if previous is None:
        os.environ.pop("FEATHERFACE_CACHE", None)
    else:
        os.environ["FEATHERFACE_CACHE"] = previous


@pytest.fixture
def shared() -> Path:
    return shared_path()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a 2-core machine shared with other jobs, OpenMP spinning
    makes two threads many times slower than one on small inputs. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """Our checkpoint of the published trained v1_original, shipped in weights/ (test_convert_official
    checks that converting the published file reproduces it)."""
    from utils.inference.detector import PUBLISHED_WEIGHTS

    return PUBLISHED_WEIGHTS


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics/affines and deformable offsets, so folding has work to do."""
    from models.deform_conv import DeformableConv2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
            if isinstance(m, DeformableConv2d):
                m.offset_conv.weight.normal_(0, 0.02, generator=g)
                m.modulator_conv.weight.normal_(0, 0.02, generator=g)
    return model.eval()
