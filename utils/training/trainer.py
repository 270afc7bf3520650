"""The training loop shared by train.py (V1) and train_v2.py (V2 distillation).

`Trainer` owns everything about a run that is not the loss: devices and DDP, data loading
(deterministic per (seed, epoch, index), so a resumed run sees exactly the batches an
uninterrupted one would), optimizer and per-iteration LR schedule, AMP, gradient clipping,
TensorBoard, atomic full-state checkpoints and resume. Subclasses change `compute_loss` and
the epoch-end hooks (see utils.training.distillation.DistillationTrainer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from data.augment import TrainTransform, ValTransform
from data.check import check_dataset
from data.config import weight_fields
from data.wider_face import WiderFaceDataset, detection_collate
from layers.gradient_clipper import GradientClipper
from layers.multibox_loss import MultiBoxLoss
from layers.prior_box import prior_boxes_for
from layers.training_monitor import TrainingMonitor
from utils.checkpoint import (checkpoint_blob, load_checkpoint, load_pretrained_backbone, load_state_strict, show_keys,
                              unwrap)
from utils.errors import (CheckpointError, FeatherFaceError, non_negative_float, non_negative_int,
                          positive_int)
from utils.training import distributed as ddp
from utils.training.precise_bn import recompute_bn_stats
from utils.training.validation import ValidationSet, WiderSubset, run_validation, selection_metric
from utils.training.resume import (CheckpointKeeper, apply_optimizer_options, capture_rng, check_resume,
                                   cpu_copy, dataset_fingerprint, restore_rng, rng_of_rank)

DEFAULT_BACKBONE = "weights/mobilenetV1X0.25_pretrain.tar"


class NonFiniteLossError(FeatherFaceError):
    """The loss became NaN/inf on some rank; every rank stops, and no checkpoint holding weights
    updated after the last finite loss is written (utils.training.resume.CheckpointKeeper)."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights or BN statistics to be saved hold NaN/inf (e.g. precise BN over a diverged
    model at the end of a run): nothing is written, and the run stops like a non-finite loss."""


class BadDatasetError(FeatherFaceError):
    """The training data failed the pre-flight check."""


def add_training_args(parser: argparse.ArgumentParser, epochs: int, name: str) -> argparse.ArgumentParser:
    """Flags common to train.py and train_v2.py (run machinery, data, optimisation)."""
    g = parser.add_argument_group("data")
    g.add_argument("--training_dataset", default="data/sample/label.txt",
                   help="label file (RetinaFace label.txt or official wider_face_train_bbx_gt.txt); "
                        "images are read from images/ beside it unless --image_root is given")
    g.add_argument("--image_root", default=None, help="folder the label file's image paths are relative to")
    g.add_argument("--val_dataset", default=None,
                   help="label file of a validation set: val loss and AP@0.5 every --val_interval epochs")
    g.add_argument("--val_image_root", default=None,
                   help="folder the --val_dataset image paths are relative to (default: images/ beside it)")
    g.add_argument("--val_interval", type=positive_int, default=1, help="validate every N epochs (and after the last one)")
    g.add_argument("--val_gt_dir", default=None,
                   help="WIDER val ground truth folder (wider_face_val.mat, wider_{easy,medium,hard}_val.mat): "
                        "also the official easy/medium/hard AP of the --val_dataset images")
    g.add_argument("--no_val_ap", action="store_true",
                   help="validate by loss only (no detection pass); best.pth then follows the val loss")
    g.add_argument("--keep_invalid_faces", action="store_true",
                   help="train on faces the official labels flag invalid (left out by default)")
    g.add_argument("--image_size", type=positive_int, default=640, help="square training input size")
    g.add_argument("--num_workers", type=non_negative_int, default=4, help="data-loading worker processes")
    g.add_argument("--no_augment", action="store_true",
                   help="only pad and resize training images, and no MixUp/CutMix in train_v2.py (sanity checks "
                        "such as overfitting a few images)")
    g.add_argument("--skip_bad_samples", action="store_true",
                   help="leave out images that fail the data check, and unusable face lines, instead of "
                        "refusing to start")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help=f"training epochs (default {epochs})")
    g.add_argument("--batch_size", type=positive_int, default=32, help="images per batch per process")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer")
    g.add_argument("--lr", type=non_negative_float, default=1e-3, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=non_negative_float, default=5e-4, help="weight decay")
    g.add_argument("--scheduler", choices=["step", "cosine"], default="step",
                   help="step: x0.1 at --decay1 and --decay2; cosine: to 0 at the last epoch")
    g.add_argument("--decay1", type=int, default=190, help="first step-decay epoch")
    g.add_argument("--decay2", type=int, default=220, help="second step-decay epoch")
    g.add_argument("--warmup_epochs", type=non_negative_float, default=0.0, help="linear LR warm-up length in epochs")
    g.add_argument("--gradient_clip", type=non_negative_float, default=0.0, help="max gradient norm (0 = no clipping)")
    g.add_argument("--neg_pos_ratio", type=positive_int, default=7, help="hard-negative mining ratio (3 or 7)")
    g.add_argument("--loc_weight", type=float, default=2.0, help="weight of the box regression loss")
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init)")
    g.add_argument("--save_folder", default="weights/", help="where checkpoints are written")
    g.add_argument("--name", default=name, help=f"run name: checkpoints in SAVE_FOLDER/NAME, logs in runs/NAME (default {name})")
    g.add_argument("--save_interval", type=non_negative_int, default=10, help="also keep epoch_N.pth every N epochs (0 = never)")
    g.add_argument("--resume", default=None, help="checkpoint to continue from (its full state is restored)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a SAVE_FOLDER/NAME that holds checkpoints of an earlier run: they "
                        "(*.pth) are deleted once this run's checks have passed (refused without this flag)")
    g.add_argument("--init_weights", default=None,
                   help="start from the model weights of this checkpoint (ours, or a converted published one) "
                        "with a fresh optimizer and schedule: fine-tuning")
    g.add_argument("--precise_bn_batches", type=non_negative_int, default=20,
                   help="recompute BN statistics over this many training batches before each validation and "
                        "checkpoint, so checkpoints work in eval mode (0 = off, keep the running averages)")
    g.add_argument("--max_iters", type=non_negative_int, default=0,
                   help="stop after this many iterations in total and save (0 = run all epochs)")
    g.add_argument("--log_dir", default="runs", help="TensorBoard root folder")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


# ----------------------------------------------------------------------------- data
class SeededTrainSet(Dataset):
    """Training items whose augmentation is seeded by (seed, epoch, index): reproducible
    across resumes, worker counts and DDP ranks."""

    def __init__(self, dataset: WiderFaceDataset, image_size: int, seed: int, augment: bool = True) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.transform = TrainTransform(image_size) if augment else None
        self.plain = ValTransform(image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, boxes, landmarks, labels = self.dataset.load(index)
        if self.transform is None:
            return self.plain(image, boxes, landmarks, labels)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.transform.apply(image, boxes, landmarks, labels, rng)


class EpochSampler(Sampler[int]):
    """Shuffled indices from a generator seeded by (seed, epoch), sharded over DDP ranks,
    optionally skipping the first `skip_batches` batches (mid-epoch resume)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    def indices(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        per_rank = math.ceil(self.size / self.world)
        order += order[: per_rank * self.world - self.size]  # pad so every rank gets the same count
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        return len(self.indices()) - self.skip


def preflight(label_file, image_root, args: argparse.Namespace, log, role: str, flag: str):
    """Rank 0 checks a label file and its images (decoding in --num_workers processes, cached per
    image) and tells the other ranks; problems are listed, and those of the label file itself
    (not of one image) stop the run even with --skip_bad_samples. A label file that is not there
    is a path typo, not a problem in the file: every rank says so before any collective."""
    if not Path(label_file).is_file():
        what = "is a folder, not a label file" if Path(label_file).is_dir() else "not found"
        raise BadDatasetError(f"label file {label_file} {what} ({flag})")
    report = ddp.broadcast_object(
        check_dataset(label_file, image_root, num_workers=max(args.num_workers, 1))
        if ddp.get_rank() == 0 else None)
    log(f"{role}: {report.timing()}")
    if not report.problems:
        return report
    for problem in report.problems[:20]:
        log(f"  {problem}")
    if len(report.problems) > 20:
        log(f"  ... {len(report.problems) - 20} more")
    listed = f"first: {report.problems[0]}; all listed by `python -m data.check {label_file}`"
    if report.file_problems:
        raise BadDatasetError(f"{len(report.problems)} problem(s) in {label_file} ({listed}), "
                              f"{report.file_problems} of them in the label file itself rather than one image: "
                              f"fix the file")
    if role == "--val_dataset":  # a val set with images left out would score another set
        raise BadDatasetError(f"--val_dataset: {len(report.problems)} problem(s) in {label_file} ({listed}); "
                              f"fix them or leave those images out of the val label file")
    if not args.skip_bad_samples:
        raise BadDatasetError(f"{len(report.problems)} problem(s) in {label_file} ({listed}). Fix them or pass "
                              f"--skip_bad_samples to drop the {len(report.bad_samples)} affected image(s).")
    log(f"--skip_bad_samples: leaving out {len(report.bad_samples)} image(s) with problems and "
        f"{report.bad_faces} unusable face line(s)")
    return report


def refuse_to_overwrite(args: argparse.Namespace) -> None:
    """A new run (no --resume) does not replace an earlier run's checkpoints in SAVE_FOLDER/NAME
    unless --overwrite says so. Called before any data check or model build; every rank looks at
    the folder itself (no collective), so all of them stop together."""
    save_dir = Path(args.save_folder) / args.name
    found = sorted(p.name for p in save_dir.glob("*.pth"))
    if args.resume or args.overwrite or not found:
        return
    last = save_dir / ("last.pth" if "last.pth" in found else found[-1])
    raise FeatherFaceError(f"{save_dir} already holds checkpoints of an earlier run ({show_keys(found, 3)}): "
                           f"continue it with --resume {last}, give this run another --name, or pass "
                           f"--overwrite to replace them")


def build_train_set(args: argparse.Namespace, log) -> WiderFaceDataset:
    """Pre-flight check of the training labels and images, then the dataset."""
    report = preflight(args.training_dataset, args.image_root, args, log, "training data", "--training_dataset")
    dataset = WiderFaceDataset(args.training_dataset, args.image_root, skip=report.bad_samples,
                               keep_invalid=args.keep_invalid_faces, skip_bad_faces=args.skip_bad_samples)
    for warning in dataset.dropped_boxes[:3]:
        log(f"  warning: {warning}")
    if dataset.dropped_boxes or (dataset.num_invalid and not args.keep_invalid_faces):
        log(f"labels: {len(dataset.dropped_boxes)} degenerate box(es) dropped, "
            f"{0 if args.keep_invalid_faces else dataset.num_invalid} face(s) flagged invalid left out "
            f"(--keep_invalid_faces keeps them)")
    if len(dataset) == 0:
        raise BadDatasetError(f"no usable images in {args.training_dataset}")
    faces = [len(r.boxes) - (0 if args.keep_invalid_faces else int(r.invalid.sum())) for r in dataset.records]
    if not any(faces):
        raise BadDatasetError(f"no usable face in {args.training_dataset}: nothing to learn from")
    if not all(faces):  # hard negatives are mined per image, in proportion to its matched faces
        log(f"note: {faces.count(0)} image(s) without a usable face add nothing to the loss (as in RetinaFace, "
            f"hard negatives are mined per image, --neg_pos_ratio per matched anchor)")
    return dataset


# ----------------------------------------------------------------------------- schedule
def lr_factor(args: argparse.Namespace, iteration: int, iters_per_epoch: int) -> float:
    """LR multiplier at a global iteration: linear warm-up, then step or cosine decay."""
    epoch = iteration / iters_per_epoch
    if args.warmup_epochs > 0 and epoch < args.warmup_epochs:
        return max(epoch / args.warmup_epochs, 1e-3)
    if args.scheduler == "cosine":
        span = max(args.epochs - args.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min((epoch - args.warmup_epochs) / span, 1.0)))
    return 0.1 ** ((epoch >= args.decay1) + (epoch >= args.decay2))


def as_floats(parts: Dict[str, Any]) -> Dict[str, float]:
    """Loss parts (tensors or numbers) as plain floats for logging."""
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in parts.items()}


def log_main(message: str) -> None:
    """Print on rank 0 only (every process of a torchrun run would print it otherwise)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def stability_advice(args: argparse.Namespace) -> str:
    """What to try after a non-finite loss, given the run's own --gradient_clip."""
    if 0 < args.gradient_clip <= 1:
        return f"a lower --lr or a --gradient_clip below {args.gradient_clip:g}"
    return "a lower --lr or --gradient_clip 1"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunState:
    """What a checkpoint must hold beyond the module states to continue exactly."""

    epoch: int = 0  # current epoch (0-based)
    epoch_iter: int = 0  # batches of `epoch` already done
    iteration: int = 0  # global optimizer steps
    best_metric: float = math.inf  # best value of `best_metric_name`, lower-is-better form (AP negated)
    best_metric_name: str = ""  # the one metric picking best.pth (utils.training.validation.SelectionMetric)
    history: List[Dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""
    skipped_steps: int = 0  # optimizer steps skipped because the gradients were not finite
    # Loss sums and counts (over all ranks) of the batches of `epoch` already done, so that a
    # mid-epoch resume averages the whole epoch, as the uninterrupted run does.
    epoch_partial: Dict[str, Dict[str, float]] = field(default_factory=dict)


class Trainer:
    """Runs training for a FeatherFace model; see module docstring."""

    task_loss_key = "loss"  # the training task loss in the step metrics (V2: "task", not the KD mix)
    script = "train.py"  # the script running this trainer, for hints in messages

    def __init__(self, args: argparse.Namespace, model: nn.Module) -> None:
        refuse_to_overwrite(args)  # the scripts call it first too, before their models are built
        self.args = args
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = self._setup_device(args.device)
        self.rank, self.world = ddp.get_rank(), ddp.get_world_size()
        self.is_main = self.rank == 0
        set_seed(args.seed + self.rank)
        self.amp = bool(args.amp and self.device.type == "cuda")
        if args.amp and not self.amp:
            self.log("--amp needs CUDA; training in float32")

        self.dataset = build_train_set(args, self.log)
        # What the saved data position depends on besides the flags (utils.training.resume).
        self.run_identity = {"world_size": self.world, "label_file": str(args.training_dataset),
                             "num_images": len(self.dataset),
                             "dataset": dataset_fingerprint([r.image for r in self.dataset.records])}
        self.train_set = SeededTrainSet(self.dataset, args.image_size, args.seed, not args.no_augment)
        self.sampler = EpochSampler(len(self.dataset), args.seed, self.rank, self.world)
        self.iters_per_epoch = math.ceil(len(self.sampler.indices()) / args.batch_size)
        if args.val_dataset:  # its images are checked now, not when the first epoch has run
            preflight(args.val_dataset, args.val_image_root, args, self.log, "--val_dataset", "--val_dataset")
        self.val_set = (ValidationSet(args.val_dataset, args.val_image_root, args.image_size)
                        if args.val_dataset else None)
        self.val_wider = WiderSubset(args.val_gt_dir, self.val_set.records) if args.val_gt_dir and self.val_set else None
        if args.val_gt_dir and not self.val_set:
            raise FeatherFaceError("--val_gt_dir needs --val_dataset (the label file of those val images)")
        self.selection = selection_metric(self.val_set is not None, not args.no_val_ap, self.task_loss_key)
        if args.init_weights:
            if args.resume:
                raise FeatherFaceError("--init_weights and --resume exclude each other: --resume continues a run "
                                       "(weights, optimizer, schedule), --init_weights starts a new one from weights")
            init_from_checkpoint(model, args.init_weights, self.log, self.script)

        self.model = model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(args, it, self.iters_per_epoch)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.clipper = GradientClipper(args.gradient_clip) if args.gradient_clip > 0 else None
        config = unwrap(self.model).config
        self.priors = prior_boxes_for(config, (args.image_size, args.image_size), device=self.device)
        self.criterion = MultiBoxLoss(2, 0.35, args.neg_pos_ratio, config.variance, args.loc_weight)
        self.state = RunState()
        self.save_dir = Path(args.save_folder) / args.name
        self.keeper = CheckpointKeeper(self.save_dir, write=self.is_main)
        self.writer = None
        # Epoch time (training + validation), ETA and peak memory to the log and TensorBoard (the
        # writer is attached below); per-step scalars are written by train_one_epoch.
        self.monitor = TrainingMonitor(args.epochs, None, self.log, step_scalars=False)
        self.saved_stop_reason = ""  # why the resumed run had stopped
        if args.resume:
            self._resume(args.resume)
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir = Path(args.log_dir) / args.name
            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.state.iteration or None)
            self.save_dir.mkdir(parents=True, exist_ok=True)
            earlier = [] if args.resume else sorted(self.save_dir.glob("*.pth"))  # only with --overwrite
            for path in earlier:
                path.unlink()
            if earlier:
                self.log(f"--overwrite: deleted the earlier run's {len(earlier)} checkpoint(s) in {self.save_dir}")
            args_json = json.dumps(vars(args), indent=2, default=str)
            (self.log_dir / "args.json").write_text(args_json)
        self.monitor.writer = self.writer

    # ------------------------------------------------------------------ setup
    def _setup_device(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FeatherFaceError(f"--device {name} asked for, but CUDA is not available")
        if self.distributed:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if device.type == "cuda":
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.args.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.args.lr, momentum=self.args.momentum,
                                   weight_decay=self.args.weight_decay)
        return torch.optim.AdamW(params, lr=self.args.lr, weight_decay=self.args.weight_decay)

    def log(self, message: str) -> None:
        log_main(message)

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> Dict[str, Any]:
        """Subclasses add their own resumable state (teacher path, alpha, early stopping)."""
        return {}

    def load_extra_state(self, blob: Dict[str, Any]) -> None:
        pass

    def snapshot(self) -> Optional[Dict[str, Any]]:
        """The full training state as a checkpoint dict copied to the CPU, on rank 0 (None on the
        others). Collective: every rank contributes its RNG states."""
        state = unwrap(self.model).state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if ddp.any_rank(bool(bad)):  # a checkpoint is only ever written with finite values
            self.keeper.discard()
            raise NonFiniteWeightsError(
                f"the model holds non-finite values {self.position()} ({len(bad)} tensor(s) on rank {self.rank}"
                + (f", e.g. {', '.join(bad[:3])}" if bad else "") + "); no checkpoint written; "
                + self.keeper.describe_good(stability_advice(self.args)))
        rng = ddp.all_gather_object(capture_rng(self.device))
        if not self.is_main:
            return None
        return cpu_copy(checkpoint_blob(
            self.model, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), run_state=vars(self.state), args=vars(self.args), rng=rng,
            run=self.run_identity, monitor=self.monitor.state_dict(), **self.extra_state()))

    def position(self) -> str:
        state = self.state
        if state.epoch_iter:
            return f"epoch {state.epoch + 1}, batch {state.epoch_iter} of {self.iters_per_epoch}, iteration {state.iteration}"
        return f"after epoch {state.epoch}, iteration {state.iteration}"

    def save(self, name: str) -> Path:
        """Write the current state now (collective; rank 0 writes)."""
        return self.keeper.write_now(self.snapshot(), [name], self.position())

    def checkpoint(self, names: List[str], final: bool) -> None:
        """Epoch-end checkpoints: written once the next step has given a finite loss with these
        weights, or at once when no step follows (collective)."""
        blob = self.snapshot()
        (self.keeper.write_now if final else self.keeper.stage)(blob, names, self.position())

    def _resume(self, path: str) -> None:
        blob = load_checkpoint(path)
        if "optimizer" not in blob or "run_state" not in blob:
            raise CheckpointError(f"{path} holds weights only, not a training state; it cannot be resumed")
        net = unwrap(self.model)
        if weight_fields(blob["model_config"]) != weight_fields(net.config.to_dict()):
            raise CheckpointError(
                f"{path} was trained as '{blob['model_config'].get('name')}', this run builds '{net.config.name}'"
                + ("; it is a distillation run: resume it with train_v2.py" if "teacher" in blob else
                   f"; resume it with train.py --model {blob['model_config'].get('name')}"))
        load_state_strict(net, blob["model"], path)
        self.state = RunState(**{**blob["run_state"], "stop_reason": ""})  # decided afresh (nothing_to_train)
        self.saved_stop_reason = blob["run_state"].get("stop_reason", "")
        position = self.position()
        changes = check_resume(path, blob.get("args", {}), blob.get("run", {}), vars(self.args),
                               self.run_identity, position)  # refuses what would move the position
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        if blob["scaler"] or not self.amp:
            self.scaler.load_state_dict(blob["scaler"])
        else:
            changes.append("the AMP loss scale starts afresh (the checkpoint was trained without --amp)")
        # The command line's optimizer options, and the LR its schedule gives at this iteration.
        apply_optimizer_options(self.optimizer, vars(self.args))
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        factor = lr_factor(self.args, self.state.iteration, self.iters_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        note = restore_rng(rng_of_rank(blob["rng"], self.rank), self.device)
        if note:
            changes.append(note)
        self.monitor.load_state_dict(blob.get("monitor", {}))
        self.load_extra_state(blob)
        self.keeper.resumed_from(path, position)
        self.log(f"resumed from {path}: {position}")
        if changes:
            self.log("changed since the checkpoint: " + "; ".join(changes))

    # ------------------------------------------------------------------ steps
    def compute_loss(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Loss parts for one batch; "loss" is the total that is back-propagated."""
        return self.criterion(self.model(images), self.priors, targets)

    def train_step(self, images: torch.Tensor, targets: Sequence[torch.Tensor]) -> Dict[str, float]:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [t.to(self.device) for t in targets]
        with torch.autocast(self.device.type, enabled=self.amp):
            parts = self.compute_loss(images, targets)
        loss = parts["loss"]
        if ddp.any_rank(not bool(torch.isfinite(loss.detach()))):  # every rank stops together
            self.keeper.discard()
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.state.epoch + 1}, iteration {self.state.iteration + 1} "
                f"(rank {self.rank}: loss {float(loss.detach())}, parts {as_floats(parts)}); "
                f"{self.keeper.describe_good(stability_advice(self.args))}"
            )
        self.keeper.step_was_finite()  # these weights gave a finite loss: their checkpoint may be written
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.clipper is not None:
            grad_norm = self.clipper(self.model.parameters())
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
        if math.isfinite(grad_norm):  # DDP averaged the gradients: every rank takes the same branch
            self.scaler.step(self.optimizer)
        else:
            self.state.skipped_steps += 1
            scale = f"; AMP loss scale now {self.scaler.get_scale() / 2:g}" if self.amp else ""
            self.log(f"warning: iteration {self.state.iteration + 1}: gradient norm {grad_norm}, optimizer step "
                     f"skipped ({self.state.skipped_steps} so far{scale})")
        self.scaler.update()
        self.scheduler.step()
        out = as_floats(parts)
        out["grad_norm"] = grad_norm
        return out

    def validate(self) -> Dict[str, float]:
        """Val loss parts, AP@0.5 and (with --val_gt_dir) easy/medium/hard AP (utils.training.validation)."""
        if self.val_set is None:
            return {}
        return run_validation(unwrap(self.model), self.val_set, self.criterion, self.priors, self.device,
                              self.args.batch_size, min(self.args.num_workers, 2), not self.args.no_val_ap,
                              self.val_wider)

    def precise_bn(self) -> Optional[float]:
        """Recompute BN statistics over --precise_bn_batches training batches (utils.training.precise_bn),
        so the weights about to be validated or saved work in eval mode. Returns the seconds it
        took (None when off). Collective under DDP."""
        args = self.args
        count = min(args.precise_bn_batches, self.iters_per_epoch)
        if count <= 0:
            return None
        start = time.perf_counter()
        # Own generators: which images are used must not draw from the global RNG (exact resume).
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + self.state.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        per_rank = order[: count * args.batch_size * self.world][self.rank::self.world]
        loader = DataLoader(Subset(self.train_set, per_rank), batch_size=args.batch_size,
                            collate_fn=detection_collate, num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(args.seed + self.state.epoch))
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

        def batches():
            for images, _ in loader:
                yield images.to(self.device, memory_format=memory_format, non_blocking=True)

        with torch.autocast(self.device.type, enabled=self.amp):
            recompute_bn_stats(unwrap(self.model), batches())
        return time.perf_counter() - start

    def validate_once(self) -> Dict[str, float]:
        """`validate` on rank 0 only; the other ranks wait and receive its numbers."""
        start = time.perf_counter()
        metrics = self.validate() if self.is_main else None
        if metrics is not None:
            metrics["val_time_s"] = time.perf_counter() - start
        return ddp.broadcast_object(metrics)

    # ------------------------------------------------------------------ loop
    def train_one_epoch(self) -> Dict[str, float]:
        args, state = self.args, self.state
        self.train_set.epoch = self.sampler.epoch = state.epoch
        self.sampler.skip = state.epoch_iter * args.batch_size
        loader = DataLoader(self.train_set, batch_size=args.batch_size, sampler=self.sampler,
                            collate_fn=detection_collate, num_workers=args.num_workers,
                            pin_memory=self.device.type == "cuda", drop_last=False,
                            persistent_workers=False,
                            # Own generator: creating the loader must not draw from the global
                            # RNG (DropBlock uses it), or a resumed run would diverge.
                            generator=torch.Generator().manual_seed(args.seed + state.epoch))
        self.model.train()
        # Resumed mid-epoch: rank 0 carries the saved sums, the others the same names at zero.
        partial, state.epoch_partial = state.epoch_partial, {}
        sums = {k: v if self.is_main else 0.0 for k, v in partial.get("sums", {}).items()}
        counts = {k: n if self.is_main else 0 for k, n in partial.get("counts", {}).items()}
        steps, images_seen, start = 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{args.epochs}", initial=state.epoch_iter,
                   total=self.iters_per_epoch, dynamic_ncols=True,
                   disable=True if args.quiet or not self.is_main else None)  # None: off when not a TTY
        for images, targets in bar:
            parts = self.train_step(images, targets)
            state.iteration += 1
            state.epoch_iter += 1
            steps += 1
            images_seen += len(targets)
            for k, v in parts.items():
                finite = math.isfinite(v)  # a skipped step's gradient norm is not averaged in
                sums[k] = sums.get(k, 0.0) + (v if finite else 0.0)
                counts[k] = counts.get(k, 0) + finite
            if self.writer is not None:
                for k, v in parts.items():
                    self.writer.add_scalar(f"train/{k}", v, state.iteration)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], state.iteration)
            self.on_step(parts)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.1e}")
            if args.max_iters and state.iteration >= args.max_iters:
                break
        elapsed = ddp.reduce_sums({"s": time.perf_counter() - start}, op="max")["s"]
        # Means over every rank's steps, identical on all ranks, so that decisions agree.
        totals = ddp.reduce_sums({**sums, **{f"{k}/count": n for k, n in counts.items()}, "/images": images_seen})
        metrics = {k: totals[k] / totals[f"{k}/count"] if totals[f"{k}/count"] else math.nan for k in sums}
        metrics["images_per_s"] = totals["/images"] / max(elapsed, 1e-9)
        metrics["epoch_time_s"] = elapsed  # the training loop only (validation: val_time_s)
        if state.epoch_iter < self.iters_per_epoch:  # stopped inside the epoch (--max_iters)
            state.epoch_partial = {"sums": {k: totals[k] for k in sums},
                                   "counts": {k: totals[f"{k}/count"] for k in sums}}
        if self.state.skipped_steps:
            metrics["skipped_steps"] = float(self.state.skipped_steps)
        return metrics

    def on_step(self, parts: Dict[str, float]) -> None:
        """Per-iteration hook (V2 feeds its training monitor)."""

    def on_epoch_end(self, metrics: Dict[str, float]) -> Optional[str]:
        """Epoch-end hook; return a reason string to stop training early."""
        return None

    def nothing_to_train(self) -> Optional[str]:
        """Why a resumed run takes no step, with what would let it go on (None: it trains).
        Sets the stop reason; subclasses add their own stops (V2: early stopping)."""
        reason, flag = self.limit_reached()
        if reason is None:
            return None
        self.state.stop_reason = reason
        return f"{reason} ({self.position()}); a larger {flag} goes on"

    def limit_reached(self) -> Tuple[Optional[str], str]:
        """(stop reason, the flag that set the limit) once --epochs or --max_iters is reached, else (None, "")."""
        args, state = self.args, self.state
        if state.epoch >= args.epochs:
            return f"finished {args.epochs} epochs", "--epochs"
        if args.max_iters and state.iteration >= args.max_iters:
            return f"--max_iters {args.max_iters} reached", "--max_iters"
        return None, ""

    def fit(self) -> RunState:
        args, state = self.args, self.state
        self.log(f"training {unwrap(self.model).config.name} on {len(self.dataset)} images "
                 f"({self.dataset.num_faces} faces), {self.iters_per_epoch} iterations/epoch, "
                 f"device {self.device}{' x' + str(self.world) if self.distributed else ''}, "
                 f"checkpoints in {self.save_dir}" + (f", TensorBoard in {self.log_dir}" if self.is_main else ""))
        nothing = self.nothing_to_train()
        if nothing:  # resumed where the run had stopped: not one step more, nothing written
            self.log(f"nothing to train: {nothing}")
            if self.writer is not None:
                self.writer.close()
            return state
        try:
            while state.epoch < args.epochs:
                self.monitor.start_epoch()
                metrics = self.train_one_epoch()
                bn_seconds = self.precise_bn()  # checkpoints and validation below get eval-ready BN statistics
                if bn_seconds is not None:
                    metrics["precise_bn_s"] = bn_seconds
                if args.max_iters and state.iteration >= args.max_iters and state.epoch_iter < self.iters_per_epoch:
                    state.stop_reason = self.limit_reached()[0]  # mid-epoch: the --max_iters limit
                    self.save("last.pth")  # inside the epoch: no validation, no epoch line
                    break
                if self.val_set is not None and ((state.epoch + 1) % args.val_interval == 0
                                                 or state.epoch + 1 == args.epochs):
                    metrics.update(self.validate_once())
                reason = self.on_epoch_end(metrics)
                improved = self.update_best(metrics)
                reason, improved = self.share_decisions(metrics, reason, improved)
                state.history.append({"epoch": state.epoch + 1, **metrics})
                if self.is_main:  # one line and TensorBoard: metrics, epoch time, ETA, peak memory
                    self.monitor.end_epoch(state.epoch, metrics, step=state.epoch + 1)
                state.epoch += 1
                state.epoch_iter = 0
                state.stop_reason = reason or self.limit_reached()[0] or ""
                names = ["last.pth"] + (["best.pth"] if improved else [])
                if args.save_interval and state.epoch % args.save_interval == 0:
                    names.append(f"epoch_{state.epoch}.pth")
                # The run's last checkpoints are written once, at once, with the stop reason.
                self.checkpoint(names, final=bool(state.stop_reason))
                if reason:
                    self.log(f"stopping early: {reason}")
                if state.stop_reason:
                    break
        except NonFiniteLossError:
            raise  # the staged checkpoint holds the weights that gave it: not written
        except BaseException:
            self.keeper.flush()  # interrupted otherwise: keep the staged epoch
            raise
        finally:
            if self.writer is not None:
                self.writer.close()
        skipped = f"; {state.skipped_steps} step(s) skipped for non-finite gradients" if state.skipped_steps else ""
        self.log(f"done: {state.stop_reason}{skipped}; last checkpoint {self.save_dir / 'last.pth'}")
        return state

    def update_best(self, metrics: Dict[str, float]) -> bool:
        """Compare this epoch's selection metric with the best so far; epochs that did not
        compute it (between validations) change nothing."""
        state, selection = self.state, self.selection
        if state.best_metric_name != selection.key:
            if state.best_metric_name:
                self.log(f"best.pth now follows {selection.key}, not {state.best_metric_name}: the best starts afresh")
            state.best_metric_name, state.best_metric = selection.key, math.inf
        value = selection.value(metrics)
        if value is None or not selection.as_loss(value) < state.best_metric:
            return False
        state.best_metric = selection.as_loss(value)
        return True

    def share_decisions(self, metrics: Dict[str, float], reason: Optional[str], improved: bool):
        """Rank 0's epoch-end decisions on every rank: its metrics, stop reason, best metric and
        subclass state (alpha schedule, early stopping). Taken once, so ranks cannot disagree."""
        if not self.distributed:
            return reason, improved
        shared = ddp.broadcast_object(
            (metrics, reason, improved, self.state.best_metric, self.extra_state()) if self.is_main else None)
        if not self.is_main:
            metrics.clear()
            metrics.update(shared[0])
            self.state.best_metric = shared[3]
            self.load_extra_state(shared[4])
        return shared[1], shared[2]


INIT_WEIGHTS_HINTS = {
    "train.py": "leave --model out to train the model it holds, or give a checkpoint of the --model asked for",
    "train_v2.py": "train_v2.py trains V2 only: give a V2 checkpoint (a V1-family one is a --teacher_model)",
}


def init_from_checkpoint(model: nn.Module, path: str, log, script: str = "train.py") -> None:
    """--init_weights: the model weights of a checkpoint of the same model, nothing else (the
    optimizer and the schedule start afresh). Another model, or keys that do not fit, stop with
    a message naming them."""
    blob = load_checkpoint(path)
    net = unwrap(model)
    saved, own = blob["model_config"], net.config.to_dict()
    if weight_fields(saved) != weight_fields(own):  # DropBlock's setting is the run's own
        changed = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
        raise CheckpointError(f"--init_weights {path} holds a '{saved.get('name')}' model, this run trains "
                              f"'{net.config.name}' (differing config fields: {', '.join(changed)}); "
                              f"{INIT_WEIGHTS_HINTS[script]}")
    load_state_strict(net, blob["model"], f"--init_weights {path}")
    log(f"model weights initialised from {path} (optimizer and schedule start afresh)")


def load_backbone_if_any(model: nn.Module, path: Optional[str], log) -> None:
    """Initialise the backbone from ImageNet weights; the default path may be absent."""
    if not path or path.lower() == "none":
        log("training from scratch (no --pretrained_backbone)")
        return
    if not Path(path).is_file():
        if path == DEFAULT_BACKBONE:
            log(f"note: {DEFAULT_BACKBONE} not found, training the backbone from scratch "
                f"(see weights/README.md for the ImageNet file)")
            return
        raise FileNotFoundError(f"--pretrained_backbone {path} does not exist")
    load_pretrained_backbone(unwrap(model).body, path)
    log(f"backbone initialised from {path}")
