"""Exact resume and checkpoints that are known to be good.

* RNG: every rank's CPU, CUDA, NumPy and Python generator states are saved (a list indexed by
  rank) and each rank restores its own, so DropBlock's draws on the GPU continue as if the run
  had never stopped.
* Options on resume (`check_resume`): the saved position (epoch, batch within it) only means
  the same images under the same batch size, image size, seed, world size and dataset, so a
  change of any of these is refused in one sentence naming them; so is another optimizer type.
  Every other change is accepted and listed: optimizer options (`--lr`, `--weight_decay`,
  `--momentum`) are applied to the restored optimizer, schedule options (`--epochs`,
  `--scheduler`, ...) are followed by the schedule, the rest (logging, workers, ...) only
  affect how the run goes on.
* Non-finite losses (`CheckpointKeeper`): an epoch's checkpoints are written only after the next
  training step has used their weights and given a finite loss on every rank. Weights updated
  after the last finite loss are therefore never written, and the checkpoint a non-finite-loss
  message calls good has been shown to give a finite loss.
"""
from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from utils.checkpoint import atomic_torch_save
from utils.errors import CheckpointError

# A change of these would make the saved data position point at other images.
POSITION_OPTIONS = ("batch_size", "image_size", "seed")
# Applied to the restored optimizer's parameter groups.
OPTIMIZER_OPTIONS = ("lr", "weight_decay", "momentum")
# Read live by the LR schedule (utils.training.trainer.lr_factor).
SCHEDULE_OPTIONS = ("epochs", "scheduler", "decay1", "decay2", "warmup_epochs")
NOT_COMPARED = ("resume",)


# ----------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device) -> Dict[str, Any]:
    """This process' generator states (CUDA only when training on CUDA)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> Optional[str]:
    """Restore what `capture_rng` saved; returns a note when the CUDA state cannot be restored."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda":
        if "cuda" not in state:
            return "the checkpoint has no CUDA RNG state (saved on CPU): GPU random draws start afresh"
        torch.cuda.set_rng_state(state["cuda"], device)
    return None


def rng_of_rank(blob_rng: Any, rank: int) -> Mapping[str, Any]:
    """The saved RNG state of `rank` (checkpoints before per-rank states hold one dict)."""
    return blob_rng if isinstance(blob_rng, Mapping) else blob_rng[rank]


# ----------------------------------------------------------------------------- options
def dataset_fingerprint(image_names: Sequence[str]) -> str:
    """Identifies the training list (image names in label-file order, bad samples left out);
    it does not change when the dataset folder moves."""
    return hashlib.sha1("\n".join(image_names).encode()).hexdigest()[:16]


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_resume(path: str, saved_args: Mapping[str, Any], saved_run: Mapping[str, Any],
                 args: Mapping[str, Any], run: Mapping[str, Any], position: str) -> List[str]:
    """Refuse (CheckpointError, one sentence) a resume whose options change the meaning of the
    saved position or the optimizer type; otherwise return the accepted changes, described.

    `saved_run` / `run` hold "world_size", "dataset" (fingerprint), "num_images" and
    "label_file"; `position` says where the checkpoint stands (for the message)."""
    refused = [f"--{k} {_show(saved_args[k])} -> {_show(args[k])}"
               for k in POSITION_OPTIONS if k in saved_args and saved_args[k] != args.get(k)]
    if saved_run.get("world_size", 1) != run["world_size"]:
        refused.append(f"world size {saved_run.get('world_size', 1)} -> {run['world_size']}")
    if "dataset" in saved_run and saved_run["dataset"] != run["dataset"]:
        refused.append(f"dataset {saved_run['label_file']} ({saved_run['num_images']} images) -> "
                       f"{run['label_file']} ({run['num_images']} images, another image list)")
    if saved_args.get("optimizer", args.get("optimizer")) != args.get("optimizer"):
        refused.append(f"--optimizer {saved_args['optimizer']} -> {args['optimizer']} (the saved optimizer "
                       f"state is {saved_args['optimizer']}'s)")
    if refused:
        raise CheckpointError(
            f"cannot resume {path} ({position}): {'; '.join(refused)} -- the saved position assumes "
            f"the saved values; resume with them, or start a new run")
    accepted = []
    for key in sorted(set(saved_args) & set(args)):
        old, new = saved_args[key], args[key]
        if key in NOT_COMPARED or key in POSITION_OPTIONS or key == "optimizer" or old == new:
            continue
        if key in OPTIMIZER_OPTIONS:
            how = " (applied to the optimizer)"
        elif key in SCHEDULE_OPTIONS:
            how = " (the LR schedule follows it)"
        else:
            how = ""
        accepted.append(f"--{key} {_show(old)} -> {_show(new)}{how}")
    return accepted


def apply_optimizer_options(optimizer: torch.optim.Optimizer, args: Mapping[str, Any]) -> None:
    """Put the command line's lr / weight decay / momentum into restored parameter groups
    (`initial_lr` is the base the LambdaLR schedule multiplies)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = float(args["lr"])
        group["weight_decay"] = float(args["weight_decay"])
        if "momentum" in group and "momentum" in args:
            group["momentum"] = float(args["momentum"])


# ----------------------------------------------------------------------------- checkpoints
def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU: a snapshot training cannot change."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class SavedState:
    path: Path
    where: str  # e.g. "epoch 3 done, iteration 120"


class CheckpointKeeper:
    """Writes checkpoints once their weights have given a finite loss (see module docstring).

    `stage` keeps an epoch's snapshot in memory; `step_was_finite`, called after a training step
    whose loss was finite on every rank, writes it (that step used exactly these weights).
    `write_now` writes at once (end of the run, --max_iters); such a file, or the one a run
    resumed from, counts as good after the first finite step that used its weights. Only the
    process with `write=True` (rank 0) writes; the others keep the same bookkeeping."""

    def __init__(self, save_dir: Path, write: bool) -> None:
        self.save_dir, self.write = Path(save_dir), write
        self.pending: Optional[tuple] = None  # (blob, names, where)
        self.unproven: Optional[SavedState] = None
        self.good: Optional[SavedState] = None

    def _write(self, blob: Optional[Dict[str, Any]], names: Sequence[str]) -> None:
        if self.write:
            for name in names:
                atomic_torch_save(blob, self.save_dir / name)

    def resumed_from(self, path: str, where: str) -> None:
        self.unproven = SavedState(Path(path), where)

    def stage(self, blob: Optional[Dict[str, Any]], names: Sequence[str], where: str) -> None:
        self.pending = (blob, list(names), where)

    def write_now(self, blob: Optional[Dict[str, Any]], names: Sequence[str], where: str) -> Path:
        self.pending = None
        self._write(blob, names)
        self.unproven = SavedState(self.save_dir / names[0], where)
        return self.unproven.path

    def step_was_finite(self) -> None:
        if self.pending is not None:
            blob, names, where = self.pending
            self.pending = None
            self._write(blob, names)
            self.good, self.unproven = SavedState(self.save_dir / names[0], where), None
        elif self.unproven is not None:
            self.good, self.unproven = self.unproven, None

    def discard(self) -> None:
        """A non-finite loss: the staged weights gave it; they are never written."""
        self.pending = None

    def flush(self) -> None:
        """Interrupted for another reason: the staged snapshot is still the best we have."""
        if self.pending is not None:
            blob, names, where = self.pending
            self.write_now(blob, names, where)

    def describe_good(self, advice: str = "a lower --lr or --gradient_clip 1") -> str:
        """For the non-finite-loss message: which file is known good (or why none is), and `advice`."""
        if self.good is not None:
            return (f"the last checkpoint shown to give a finite loss is {self.good.path.resolve()} "
                    f"({self.good.where}): resume from it with {advice} (a new --lr is applied on resume)")
        if self.unproven is not None:
            return (f"{self.unproven.path.resolve()} ({self.unproven.where}) gives this non-finite loss at its "
                    f"first step and no earlier checkpoint of this run was shown to give a finite one: "
                    f"start again with {advice}")
        return (f"no checkpoint of this run was shown to give a finite loss (none was written): "
                f"start again with {advice}")
