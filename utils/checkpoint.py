"""Checkpoint I/O: the only code that writes or reads FeatherFace checkpoints.

A checkpoint is a dict:
    {"format": "featherface", "version": 1, "model_config": ModelConfig.to_dict(),
     "model": state_dict, ...run state (optimizer, scheduler, scaler, epoch, best, args)...}
so `load_model(path)` rebuilds the network without flags. Writes are atomic (temp file in the
same folder + os.replace): a run killed while saving leaves the previous file intact.
"""
from __future__ import annotations

import glob
import os
import secrets
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from data.config import CONFIGS, ModelConfig
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
    """torch.save to a temp file beside `path`, fsync, then os.replace (atomic on POSIX). Temp files
    of earlier saves to `path` that a killed process left behind are removed after a successful save.

    The temp file is created with mode 0o666 less the umask, as open() in a plain torch.save creates its
    file (mkstemp's 0o600 would survive the replace and hide the weights from other users); the kernel
    applies the umask, so it is never read or changed here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: never another file
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
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # one writer per checkpoint file
        stale.unlink(missing_ok=True)


def checkpoint_blob(model: nn.Module, **state: Any) -> Dict[str, Any]:
    """The checkpoint dict of a model (its weights and config) plus any run state."""
    net = unwrap(model)
    config = getattr(net, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError("save_checkpoint expects a FeatherFace model (with a ModelConfig)")
    blob = {"format": FORMAT, "version": VERSION, "model_config": config.to_dict(), "model": net.state_dict()}
    blob.update(state)
    return blob


def save_checkpoint(path: PathLike, model: nn.Module, **state: Any) -> None:
    """Save model weights, its config and any run state (optimizer=..., epoch=..., ...)."""
    atomic_torch_save(checkpoint_blob(model, **state), path)


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
        hint = state_dict_hint(blob)
        raise CheckpointError(f"{path} is not a FeatherFace checkpoint (no model config inside).{hint}")
    if isinstance(blob.get("model"), dict):
        blob["model"] = strip_wrapper_prefix(blob["model"])
    return blob


WRAPPER_PREFIX = "module."  # DataParallel / DistributedDataParallel put it before every key of the wrapped model
# Top-level module names only one of the two state-dict formats has (`body.`, the backbone, is in both):
# the published code's (utils/convert_official.py; `bacbkbone_` [sic]) and this repository's models.
PUBLISHED_ONLY = ("bacbkbone_", "bif_cbam_", "ssh1.", "ClassHead.", "BboxHead.", "LandmarkHead.")
OURS_ONLY = ("backbone_cbam.", "bifpn_cbam.", "class_head.", "bbox_head.", "landmark_head.")


def strip_wrapper_prefix(state: Dict[str, Any]) -> Dict[str, Any]:
    """A state dict saved from a DataParallel / DDP-wrapped model has `module.` on every key: drop it
    (only when every key has it, so a model with a submodule really named `module` keeps its names)."""
    if state and all(str(k).startswith(WRAPPER_PREFIX) for k in state):
        return {k[len(WRAPPER_PREFIX):]: v for k, v in state.items()}
    return state


def state_dict_hint(blob: Any) -> str:
    """What a file without our checkpoint format holds and how to use it ('' when unrecognised)."""
    from models import build_model  # local import: models imports nothing from utils

    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        return ""
    state = strip_wrapper_prefix(state)
    if any(str(k).startswith(PUBLISHED_ONLY) for k in state):
        return (" It looks like a published FeatherFace state dict: convert it with "
                "`python -m utils.convert_official SRC DST`.")
    if not any(str(k).startswith(OURS_ONLY) for k in state):
        return ""
    tensors = all(isinstance(v, torch.Tensor) for v in state.values())
    fits = [name for name in CONFIGS if tensors and not state_mismatch(build_model(name).state_dict(), state)]
    model = f"'{fits[0]}'" if len(fits) == 1 else "<name>"
    what = f"of this repository's {model} model" if fits else "named like this repository's models (none fits exactly)"
    return (f" It is a bare state dict {what} (weights only, no model config): rebuild the model with "
            f"models.build_model({model}), load it with utils.checkpoint.load_state_strict(model, state, name) and "
            f"save it with utils.checkpoint.save_checkpoint(path, model), which stores the config load_model needs.")


def config_of(blob: Dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_dict(blob["model_config"])


def show_keys(keys: Sequence[str], limit: int = 6) -> str:
    """'a, b, c (+N more)' for error messages; 'none' for no keys."""
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


class StateMismatch(NamedTuple):
    """How a state dict fails to fit a model's, each list in the model's key order."""

    missing: List[str]  # model keys the state does not have
    unexpected: List[str]  # state keys the model does not have
    wrong_shape: List[str]  # keys in both with different shapes

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)


def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> StateMismatch:
    """Compare a state dict with the model's own `state_dict()` by key and shape."""
    return StateMismatch([k for k in own if k not in state], [k for k in state if k not in own],
                         [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)])


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      what: str = "this model") -> None:
    """The one strict load_state_dict: reports missing / unexpected / mis-shaped keys by name."""
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(
            f"{source} does not fit {what}: missing keys: {show_keys(mismatch.missing)}; "
            f"unexpected keys: {show_keys(mismatch.unexpected)}; wrong shapes: {show_keys(mismatch.wrong_shape)}"
        )
    model.load_state_dict(state)


def load_pretrained_backbone(backbone: nn.Module, path: PathLike) -> None:
    """Load ImageNet weights from the commonly distributed `mobilenetV1X0.25_pretrain.tar`.

    Accepts a dict with `state_dict` (keys prefixed `module.`) or a plain state dict. The
    classifier (`fc.*`) is dropped; anything else that does not fit raises CheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained backbone not found: {path}")
    try:
        # The file is a legacy pickle that also stores the optimizer; tensors only otherwise.
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise CheckpointError(f"cannot read pretrained backbone {path}: {exc}") from exc
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_state_strict(backbone, state, str(path), "a MobileNetV1-0.25 backbone")


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
