"""train_v2.py: distillation runs from a teacher written by train.py, and teacher errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import train
import train_v2
from models import build_model
from tests.conftest import ROOT
from tests.test_train import SAMPLE, make_args
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError
from utils.training.distillation import DistillationTrainer


def v2_args(tmp_path, teacher, *extra):
    return train_v2.get_args_parser().parse_args([
        "--teacher_model", str(teacher), "--training_dataset", str(SAMPLE), "--image_size", "96",
        "--batch_size", "2", "--epochs", "3", "--device", "cpu", "--num_workers", "0",
        "--save_folder", str(tmp_path / "w"), "--log_dir", str(tmp_path / "runs"), "--name", "kd",
        "--pretrained_backbone", "none", "--quiet", "--save_interval", "0", *extra,
    ])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A V1-family teacher written by train.py (two iterations)."""
    tmp = tmp_path_factory.mktemp("teacher")
    train.main(make_args(tmp, "--max_iters", "2", model="v1_slim"))
    return tmp / "w" / "t" / "last.pth"


def test_help_needs_no_data():
    out = subprocess.run([sys.executable, "train_v2.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--teacher_model", "--temperature", "--alpha_initial", "--alpha_final", "--gradient_clip",
                 "--early_stopping_patience"):
        assert flag in out.stdout


@pytest.mark.parametrize("flag, value", [("--temperature", "0"), ("--alpha_initial", "1.5"), ("--alpha_final", "-0.1"),
                                         ("--mixup_prob", "2"), ("--cutmix_prob", "nan"), ("--min_epoch", "-1")])
def test_out_of_range_distillation_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_v2.get_args_parser().parse_args([flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err


def test_seed_command_flags_parse():
    args = train_v2.get_args_parser().parse_args(
        "--teacher_model weights/v1.pth --epochs 400 --batch_size 32 --temperature 4.0 --alpha_initial 0.8 "
        "--alpha_final 0.5 --gradient_clip 1.0 --early_stopping_patience 20".split())
    assert (args.epochs, args.temperature, args.alpha_initial, args.alpha_final, args.gradient_clip,
            args.early_stopping_patience, args.min_epoch) == (400, 4.0, 0.8, 0.5, 1.0, 20, 100)


def test_two_iteration_distillation_run(tmp_path, teacher):
    state = train_v2.main(v2_args(tmp_path, teacher, "--max_iters", "2", "--epochs", "1"))
    assert state.iteration == 2
    blob = load_checkpoint(tmp_path / "w" / "kd" / "last.pth")
    assert blob["model_config"]["name"] == "v2" and blob["teacher"] == str(teacher)
    assert {"alpha_schedule", "early_stopping", "stop_reason"} <= set(blob)
    assert blob["run_state"]["stop_reason"]


def test_resumed_distillation_equals_uninterrupted_run(tmp_path, teacher):
    # The student's DropBlock draws from the CPU RNG, which the resumed run restores; loading
    # the teacher (random init, then its weights) must not draw from it afterwards.
    train_v2.main(v2_args(tmp_path / "a", teacher, "--epochs", "2"))  # 2 epochs x 2 iterations
    train_v2.main(v2_args(tmp_path / "b", teacher, "--epochs", "2", "--max_iters", "3"))
    resumed = train_v2.main(v2_args(tmp_path / "b", teacher, "--epochs", "2",
                                    "--resume", str(tmp_path / "b" / "w" / "kd" / "last.pth")))
    assert resumed.iteration == 4
    a = load_checkpoint(tmp_path / "a" / "w" / "kd" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "b" / "w" / "kd" / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_early_stopping_reason_saved_and_alpha_logged(tmp_path, teacher):
    # A frozen student (lr 0) cannot learn (its task loss only moves with the DropBlock and
    # augmentation draws), so early stopping fires well before the last epoch.
    state = train_v2.main(v2_args(tmp_path, teacher, "--epochs", "8", "--lr", "0", "--min_epoch", "1",
                                  "--early_stopping_patience", "2", "--mixup_prob", "0", "--cutmix_prob", "0"))
    # Without a val set the task loss is watched; epochs are counted as the log counts them.
    assert state.stop_reason.startswith("no task improvement in 2 validated epochs before the strict window "
                                        f"(epoch {len(state.history)}; best at epoch "), state.stop_reason
    assert len(state.history) < 8
    assert all(0.4 <= h["alpha"] <= 0.8 for h in state.history)
    assert state.history[0]["alpha"] == pytest.approx(0.8)
    assert {"task", "distill", "kd_cls", "kd_box", "kd_landm", "loss"} <= set(state.history[0])
    blob = load_checkpoint(tmp_path / "w" / "kd" / "last.pth")
    assert blob["run_state"]["stop_reason"] == state.stop_reason


def test_alpha_flags_shape_the_schedule(tmp_path, teacher):
    args = v2_args(tmp_path, teacher, "--epochs", "10", "--alpha_final", "0.8")
    assert DistillationTrainer(args, build_model("v2")).alpha.value(9) == pytest.approx(0.4)  # the late cap
    args = v2_args(tmp_path, teacher, "--epochs", "10", "--alpha_final", "0.8", "--alpha_late_cap", "1")
    alpha = DistillationTrainer(args, build_model("v2")).alpha
    assert [alpha.value(e) for e in range(10)] == pytest.approx([0.8] * 10)


def test_teacher_of_wrong_model_is_a_clear_error(tmp_path):
    wrong = tmp_path / "v2_teacher.pth"
    save_checkpoint(wrong, build_model("v2"))
    with pytest.raises(CheckpointError, match="holds a 'v2' model"):
        train_v2.main(v2_args(tmp_path, wrong, "--max_iters", "1"))


def test_teacher_with_missing_keys_names_them(tmp_path, teacher):
    blob = torch.load(teacher, weights_only=False)
    del blob["model"]["bbox_head.convs.2.bias"]
    broken = tmp_path / "broken.pth"
    torch.save(blob, broken)
    with pytest.raises(CheckpointError, match=r"missing keys: bbox_head\.convs\.2\.bias"):
        train_v2.main(v2_args(tmp_path, broken, "--max_iters", "1"))
    out = subprocess.run([sys.executable, "train_v2.py", "--teacher_model", str(broken), "--training_dataset",
                          str(SAMPLE), "--device", "cpu", "--save_folder", str(tmp_path / "x"),
                          "--log_dir", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "bbox_head.convs.2.bias" in out.stderr and "Traceback" not in out.stderr
