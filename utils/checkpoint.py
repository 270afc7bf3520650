"""Checkpoint I/O: the only code that writes or reads FeatherFace checkpoints.

A checkpoint is a dict:
    {"format": "featherface", "version": 1, "model_config": ModelConfig.to_dict(),
     "model": state_dict, ...run state (optimizer, scheduler, scaler, epoch, best, args)...}
so `load_model(path)` rebuilds the network without flags. Writes are atomic (temp file in the
same folder + os.replace): a run killed while saving leaves the previous file intact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from data.config import ModelConfig
from utils.errors import CheckpointError

FORMAT = "featherface"
VERSION = 1
PathLike = Union[str, Path]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save to a temp file beside `path`, fsync, then os.replace (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: PathLike, model: nn.Module, **state: Any) -> None:
    """Save model weights, its config and any run state (optimizer=..., epoch=..., ...)."""
    net = unwrap(model)
    config = getattr(net, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("save_checkpoint expects a FeatherFace model (with a ModelConfig)")
    blob = {"format": FORMAT, "version": VERSION, "model_config": config.to_dict(), "model": net.state_dict()}
    blob.update(state)
    atomic_torch_save(blob, path)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a FeatherFace checkpoint; anything else is a CheckpointError saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a torch file): {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        hint = ""
        if isinstance(blob, dict) and any(str(k).startswith(("bacbkbone_", "body.", "module.body.")) for k in blob):
            hint = " It looks like a published FeatherFace state dict: convert it with `python -m utils.convert_official`."
        raise CheckpointError(f"{path} is not a FeatherFace checkpoint (no model config inside).{hint}")
    return blob


def config_of(blob: Dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(blob["model_config"])


def load_state_strict(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that reports missing / unexpected / mis-shaped keys by name."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "") if keys else "none"
        raise CheckpointError(
            f"{source} does not fit this model: missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; wrong shapes: {show(wrong)}"
        )
    model.load_state_dict(state)


def load_model(
    path: PathLike,
    expected: Optional[str] = None,
    map_location: Union[str, torch.device] = "cpu",
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model stored in a checkpoint and load its weights. Returns (model in eval
    mode, checkpoint dict). `expected` is a model name ("v1", "v2", ...) or an arch ("v1"
    family / "v2"); a checkpoint of another model raises CheckpointError."""
    from models import build_model  # local import: models imports nothing from utils

    blob = load_checkpoint(path, map_location)
    config = config_of(blob)
    if expected is not None and expected not in (config.name, config.arch):
        raise CheckpointError(
            f"{path} holds a '{config.name}' model (arch {config.arch}), but '{expected}' was asked for"
        )
    model = build_model(config)
    load_state_strict(model, blob["model"], str(path))
    model.eval()
    return model, blob
