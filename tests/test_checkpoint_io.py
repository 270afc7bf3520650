"""utils/checkpoint.py reading files it did not write: checkpoints saved from DataParallel / DDP-wrapped
models, and bare state dicts in the published or in this repository's naming; and the file mode of the
checkpoints it writes."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from models import build_model
from utils.checkpoint import atomic_torch_save, load_checkpoint, load_model
from utils.errors import CheckpointError


def test_checkpoint_of_a_wrapped_model_loads(real_checkpoint, tmp_path):
    blob = torch.load(real_checkpoint, weights_only=False)
    blob["model"] = {f"module.{k}": v for k, v in blob["model"].items()}  # as saved from DataParallel / DDP
    path = tmp_path / "ddp.pth"
    torch.save(blob, path)
    model, loaded = load_model(path)
    reference, _ = load_model(real_checkpoint)
    assert list(loaded["model"]) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_module_prefix_on_only_some_keys_is_not_stripped(tmp_path):
    state = build_model("v2").state_dict()
    first = next(iter(state))
    path = tmp_path / "mixed.pth"
    blob = {"format": "featherface", "version": 1, "model_config": build_model("v2").config.to_dict(),
            "model": {("module." + k if k == first else k): v for k, v in state.items()}}
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=rf"unexpected keys: module\.{first}"):
        load_model(path)


def test_bare_state_dict_of_this_repository_gets_its_own_hint(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in build_model("v1_slim").state_dict().items()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "convert_official" not in message  # the converter refuses this naming
    assert "bare state dict of this repository's 'v1_slim' model" in message
    assert "build_model('v1_slim')" in message and "save_checkpoint" in message


def test_published_state_dict_gets_the_convert_hint(tmp_path):
    path = tmp_path / "published.pth"
    torch.save({"body.stage1.0.0.weight": torch.zeros(1),
                "bacbkbone_0_cbam.ChannelGate.mlp.1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="published FeatherFace state dict: convert it with"):
        load_checkpoint(path)
    torch.save({"body.stage1.0.0.weight": torch.zeros(1)}, path)  # the backbone alone: either naming
    with pytest.raises(CheckpointError, match=r"no model config inside\)\.$"):
        load_checkpoint(path)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_checkpoints_get_the_mode_of_a_plain_torch_save(tmp_path, umask, mode):
    # The temp file used to keep mkstemp's 0600 through the rename: other users could not read the weights.
    previous = os.umask(umask)
    try:
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "atomic.pth")
        torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pth")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "atomic.pth").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.pth").stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.pth", "plain.pth"]  # no temp file left
