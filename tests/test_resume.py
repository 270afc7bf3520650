"""Resume that refuses what would move the saved position, applies optimizer options, and
non-finite losses that never leave a bad checkpoint behind (utils/training/resume.py)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import train
from tests.test_train import make_args
from utils.checkpoint import atomic_torch_save, load_checkpoint
from utils.errors import CheckpointError
from utils.training.resume import (CheckpointKeeper, apply_optimizer_options, capture_rng, check_resume,
                                   restore_rng, rng_of_rank)
from utils.training.trainer import NonFiniteLossError, Trainer

RUN = {"world_size": 1, "dataset": "abc", "num_images": 3, "label_file": "a/label.txt"}
ARGS = {"batch_size": 2, "image_size": 96, "seed": 0, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 5e-4,
        "epochs": 2, "num_workers": 0, "resume": None}


# ---------------------------------------------------------------- units


def test_check_resume_refuses_position_options_in_one_sentence():
    args = dict(ARGS, batch_size=4, image_size=128, resume="x.pth")
    run = dict(RUN, world_size=2, dataset="def", label_file="b/label.txt", num_images=5)
    with pytest.raises(CheckpointError) as err:
        check_resume("x.pth", ARGS, RUN, args, run, "epoch 2, batch 1 of 2")
    text = str(err.value)
    for part in ("--batch_size 2 -> 4", "--image_size 96 -> 128", "world size 1 -> 2",
                 "dataset a/label.txt (3 images) -> b/label.txt (5 images", "epoch 2, batch 1 of 2"):
        assert part in text, text
    assert text.count(". ") == 0 and "\n" not in text  # one sentence
    with pytest.raises(CheckpointError, match=r"--optimizer adamw -> sgd"):
        check_resume("x.pth", ARGS, RUN, dict(ARGS, optimizer="sgd"), RUN, "after epoch 1")
    with pytest.raises(CheckpointError, match=r"--seed 0 -> 1"):
        check_resume("x.pth", ARGS, RUN, dict(ARGS, seed=1), RUN, "after epoch 1")


def test_check_resume_lists_safe_and_applied_changes():
    args = dict(ARGS, lr=1e-4, epochs=5, num_workers=4, resume="x.pth", training_dataset="moved/label.txt")
    # a moved dataset (same image list, other path) is fine
    changes = check_resume("x.pth", dict(ARGS, training_dataset="a/label.txt"), RUN, args,
                           dict(RUN, label_file="moved/label.txt"), "after epoch 1")
    assert "--lr 0.001 -> 0.0001 (applied to the optimizer)" in changes
    assert "--epochs 2 -> 5 (the LR schedule follows it)" in changes
    assert "--num_workers 0 -> 4" in changes
    assert not any("resume" in c for c in changes)
    assert check_resume("x.pth", ARGS, RUN, ARGS, RUN, "after epoch 1") == []


def test_apply_optimizer_options():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.0)
    apply_optimizer_options(opt, {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.5})
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"], group["momentum"]) == (0.01, 1e-4, 0.5)


def test_rng_round_trip_and_per_rank_selection():
    saved = capture_rng(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.rand(5), np.random.rand(4), random.random()
    assert restore_rng(saved, torch.device("cpu")) is None
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    assert rng_of_rank({"torch": 1}, 3) == {"torch": 1}  # one dict: a checkpoint from before per-rank states
    assert rng_of_rank([{"r": 0}, {"r": 1}], 1) == {"r": 1}


def test_keeper_writes_only_after_a_finite_step(tmp_path):
    keeper = CheckpointKeeper(tmp_path, write=True)
    assert "no checkpoint of this run" in keeper.describe_good()
    keeper.stage({"w": 1}, ["last.pth", "best.pth"], "after epoch 1, iteration 2")
    assert not list(tmp_path.iterdir())  # nothing before a step has used these weights
    keeper.step_was_finite()
    assert torch.load(tmp_path / "last.pth")["w"] == 1 and (tmp_path / "best.pth").is_file()
    assert str((tmp_path / "last.pth").resolve()) in keeper.describe_good() and "after epoch 1" in keeper.describe_good()
    keeper.stage({"w": 2}, ["last.pth"], "after epoch 2, iteration 4")
    keeper.discard()  # the next loss was not finite
    keeper.flush()
    assert torch.load(tmp_path / "last.pth")["w"] == 1 and "after epoch 1" in keeper.describe_good()
    keeper.stage({"w": 3}, ["last.pth"], "after epoch 3, iteration 6")
    keeper.flush()  # interrupted for another reason: the staged state is written
    assert torch.load(tmp_path / "last.pth")["w"] == 3
    other = CheckpointKeeper(tmp_path / "elsewhere", write=True)
    other.resumed_from(str(tmp_path / "last.pth"), "after epoch 3")
    assert "gives this non-finite loss at its first step" in other.describe_good()
    other.step_was_finite()
    assert str((tmp_path / "last.pth").resolve()) in other.describe_good()
    silent = CheckpointKeeper(tmp_path / "rank1", write=False)
    silent.stage({"w": 4}, ["last.pth"], "x")
    silent.step_was_finite()
    assert not (tmp_path / "rank1").exists()


# ---------------------------------------------------------------- runs


def test_resume_with_another_batch_size_or_world_size_is_refused(tmp_path):
    train.main(make_args(tmp_path, "--max_iters", "1", "--precise_bn_batches", "0"))
    last = tmp_path / "w" / "t" / "last.pth"
    with pytest.raises(CheckpointError, match=r"cannot resume .*--batch_size 2 -> 1.*saved position"):
        train.main(make_args(tmp_path, "--resume", str(last), "--batch_size", "1"))
    blob = load_checkpoint(last)
    assert blob["run"]["world_size"] == 1 and len(blob["rng"]) == 1  # per-rank RNG states
    blob["run"]["world_size"] = 2
    fake = tmp_path / "two_ranks.pth"
    atomic_torch_save(blob, fake)
    with pytest.raises(CheckpointError, match=r"world size 2 -> 1"):
        train.main(make_args(tmp_path, "--resume", str(fake)))


def test_non_finite_loss_names_a_good_checkpoint_that_resumes_finite(tmp_path, monkeypatch, capsys):
    real = Trainer.compute_loss

    def poisoned(self, images, targets):
        parts = real(self, images, targets)
        if self.state.iteration == 4:  # first step of epoch 3, right after epoch 2's checkpoint
            parts = dict(parts, loss=parts["loss"] * float("nan"))
        return parts

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    folder = tmp_path / "w" / "t"
    with pytest.raises(NonFiniteLossError) as err:
        train.main(make_args(tmp_path, "--epochs", "4", "--precise_bn_batches", "0"))
    message = str(err.value)
    good = folder / "last.pth"
    # epoch 2's weights gave the NaN: its checkpoint was never written; epoch 1's is named
    assert f"{good.resolve()} (after epoch 1, iteration 2)" in message, message
    assert "iteration 5" in message and load_checkpoint(good)["run_state"]["iteration"] == 2

    monkeypatch.setattr(Trainer, "compute_loss", real)
    capsys.readouterr()
    state = train.main(make_args(tmp_path, "--epochs", "3", "--resume", str(good), "--lr", "5e-4",
                                 "--precise_bn_batches", "0"))
    out = capsys.readouterr().out
    assert "--lr 0.001 -> 0.0005 (applied to the optimizer)" in out
    assert [h["epoch"] for h in state.history] == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in state.history)
    blob = load_checkpoint(good)
    assert blob["optimizer"]["param_groups"][0]["initial_lr"] == 5e-4
    assert blob["args"]["lr"] == 5e-4


def test_non_finite_gradients_skip_the_step_and_are_counted(tmp_path, monkeypatch):
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.inf

    real = Trainer.compute_loss

    def spoiled(self, images, targets):
        parts = real(self, images, targets)
        return dict(parts, loss=InfGrad.apply(parts["loss"])) if self.state.iteration == 1 else parts

    monkeypatch.setattr(Trainer, "compute_loss", spoiled)
    state = train.main(make_args(tmp_path, "--epochs", "2", "--precise_bn_batches", "0"))
    assert state.skipped_steps == 1 and state.iteration == 4
    assert state.history[0]["skipped_steps"] == 1 and math.isfinite(state.history[0]["grad_norm"])
    weights = load_checkpoint(tmp_path / "w" / "t" / "last.pth")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    # the monitor's epoch time, ETA and memory reach TensorBoard (README: "to the log and TensorBoard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "t"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"epoch/time_s", "epoch/eta_s", "epoch/memory_mb", "epoch/loss", "epoch/epoch_time_s",
            "train/loss", "train/grad_norm"} <= tags, tags
    assert [e.step for e in acc.Scalars("epoch/time_s")] == [1, 2]
    assert len(acc.Scalars("train/grad_norm")) == 4  # once per step: the monitor does not write it again
    times = [e.value for e in acc.Scalars("epoch/time_s")]
    train_only = [e.value for e in acc.Scalars("epoch/epoch_time_s")]
    assert all(t >= s > 0 for t, s in zip(times, train_only))
