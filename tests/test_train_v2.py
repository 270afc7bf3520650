"""train_v2.py: distillation runs from a teacher written by train.py, and teacher errors."""
from __future__ import annotations

import shutil
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
from utils.errors import CheckpointError, FeatherFaceError, run_cli
from utils.training.distillation import DistillationTrainer, build_student
from utils.training.trainer import NonFiniteLossError, stability_advice


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
    monitors = [load_checkpoint(tmp_path / r / "w" / "kd" / "last.pth")["monitor"] for r in "ab"]
    assert monitors[0] == monitors[1]  # the grad-warning count goes on over the resume


def test_resume_keeps_its_teacher(tmp_path, teacher):
    own = tmp_path / "teacher.pth"
    shutil.copy(teacher, own)
    train_v2.main(v2_args(tmp_path, own, "--max_iters", "1"))
    last = tmp_path / "w" / "kd" / "last.pth"
    saved = load_checkpoint(last)
    assert saved["teacher"] == str(own) and len(saved["teacher_sha256"]) == 64
    args = v2_args(tmp_path, own, "--max_iters", "2", "--resume", str(last))
    args.teacher_model = None  # left out: the recorded teacher, not the flag's default path
    assert train_v2.main(args).iteration == 2 and args.teacher_model == str(own)
    blob = torch.load(own, weights_only=False)  # the same file, now with other weights
    blob["model"]["bbox_head.convs.0.bias"] += 0.01
    torch.save(blob, own)
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=r"is not the one the resumed run was distilled from .*--new_teacher"):
        train_v2.main(v2_args(tmp_path, own, "--max_iters", "3", "--resume", str(last)))
    assert last.read_bytes() == before
    state = train_v2.main(v2_args(tmp_path, own, "--max_iters", "3", "--resume", str(last), "--new_teacher"))
    assert state.iteration == 3 and load_checkpoint(last)["teacher_sha256"] != saved["teacher_sha256"]
    own.rename(tmp_path / "moved.pth")
    args = v2_args(tmp_path, own, "--max_iters", "4", "--resume", str(last))
    args.teacher_model = None
    with pytest.raises(CheckpointError, match=r"which is not there any more: give the teacher's new place"):
        train_v2.main(args)


def test_no_augment_also_turns_off_batch_mixing(tmp_path, teacher, monkeypatch):
    import utils.training.distillation as distillation

    def refuse(*args, **kwargs):
        raise AssertionError("a batch was mixed under --no_augment")

    monkeypatch.setattr(distillation, "mixup", refuse)
    monkeypatch.setattr(distillation, "cutmix", refuse)
    assert train_v2.main(v2_args(tmp_path, teacher, "--no_augment", "--mixup_prob", "1", "--max_iters", "2")).iteration == 2


def test_dropblock_prob_is_a_flag_recorded_in_the_model_config(tmp_path, teacher):
    def drops(args) -> bool:  # two training-mode passes over the same input differ only by DropBlock
        student = build_student(args).train()
        x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
        return not torch.equal(student.features(x)[0], student.features(x)[0])

    default = v2_args(tmp_path, teacher)
    assert drops(default) and default.dropblock_prob == pytest.approx(0.1)
    off = v2_args(tmp_path, teacher, "--dropblock_prob", "0", "--max_iters", "1")
    assert not drops(off)
    assert sum(p.numel() for p in build_student(off).parameters()) == 256_156
    train_v2.main(off)
    last = tmp_path / "w" / "kd" / "last.pth"
    assert load_checkpoint(last)["model_config"]["dropblock_prob"] == 0
    resumed = v2_args(tmp_path, teacher, "--max_iters", "2", "--resume", str(last))
    assert train_v2.main(resumed).iteration == 2 and resumed.dropblock_prob == 0  # the run's own
    tuned = train_v2.main(v2_args(tmp_path / "ft", teacher, "--max_iters", "1", "--init_weights", str(last)))
    assert tuned.iteration == 1  # the weights fit a run with DropBlock on
    assert load_checkpoint(tmp_path / "ft" / "w" / "kd" / "last.pth")["model_config"]["dropblock_prob"] == 0.1


def test_teacher_with_non_finite_values_is_one_error_line(tmp_path, teacher, capsys):
    blob = torch.load(teacher, weights_only=False)
    key = next(k for k in blob["model"] if k.endswith("running_var"))
    blob["model"][key][0] = float("nan")
    bad = tmp_path / "nan_teacher.pth"
    torch.save(blob, bad)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_v2.main, v2_args(tmp_path, bad, "--max_iters", "1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and str(bad) in err and key in err, err
    assert not (tmp_path / "w").exists()


def test_non_finite_loss_advice_follows_the_gradient_clip(tmp_path, teacher, monkeypatch):
    real = DistillationTrainer.compute_loss
    monkeypatch.setattr(DistillationTrainer, "compute_loss",
                        lambda self, images, targets: dict(real(self, images, targets), loss=torch.tensor(float("nan"))))
    with pytest.raises(NonFiniteLossError) as err:
        train_v2.main(v2_args(tmp_path, teacher, "--max_iters", "1"))  # V2 clips at 1 by default
    assert "a --gradient_clip below 1" in str(err.value) and "or --gradient_clip 1" not in str(err.value)
    for clip, advice in ((0.0, "or --gradient_clip 1"), (5.0, "or --gradient_clip 1"), (0.5, "a --gradient_clip below 0.5")):
        assert advice in stability_advice(v2_args(tmp_path, teacher, "--gradient_clip", str(clip)))


def test_watched_val_ap_is_logged_by_its_name(tmp_path, teacher, capsys):
    state = train_v2.main(v2_args(tmp_path, teacher, "--epochs", "1", "--val_dataset", str(SAMPLE),
                                  "--precise_bn_batches", "0"))
    out = capsys.readouterr().out
    assert "follow val_ap50 (higher is better)" in out and "val_ap50" in state.history[0]
    assert "watched_loss" not in out and "watched_loss" not in state.history[0]  # was the negated AP


def test_early_stopping_reason_saved_and_alpha_logged(tmp_path, teacher, capsys):
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
    last = tmp_path / "w" / "kd" / "last.pth"
    blob = load_checkpoint(last)
    assert blob["run_state"]["stop_reason"] == state.stop_reason

    # Resumed with the same flags: no step, nothing written; more patience goes on.
    flags = ["--epochs", "8", "--lr", "0", "--min_epoch", "1", "--mixup_prob", "0", "--cutmix_prob", "0"]
    before, epochs = last.read_bytes(), len(state.history)
    capsys.readouterr()
    again = train_v2.main(v2_args(tmp_path, teacher, *flags, "--early_stopping_patience", "2", "--resume", str(last)))
    assert f"nothing to train: the run stopped early at epoch {epochs} (" in capsys.readouterr().out
    assert (again.iteration, len(again.history), again.stop_reason) == (state.iteration, epochs, state.stop_reason)
    assert last.read_bytes() == before
    more = train_v2.main(v2_args(tmp_path, teacher, *flags, "--early_stopping_patience", "9",
                                 "--max_iters", str(state.iteration + 1), "--resume", str(last)))
    assert more.iteration == state.iteration + 1


def test_alpha_flags_shape_the_schedule(tmp_path, teacher):
    args = v2_args(tmp_path, teacher, "--epochs", "10", "--alpha_final", "0.8")
    assert DistillationTrainer(args, build_model("v2")).alpha.value(9) == pytest.approx(0.4)  # the late cap
    args = v2_args(tmp_path, teacher, "--epochs", "10", "--alpha_final", "0.8", "--alpha_late_cap", "1")
    alpha = DistillationTrainer(args, build_model("v2")).alpha
    assert [alpha.value(e) for e in range(10)] == pytest.approx([0.8] * 10)


def test_fine_tuning_needs_its_own_name_not_to_replace_its_start(tmp_path, teacher):
    train_v2.main(v2_args(tmp_path, teacher, "--max_iters", "1"))
    last = tmp_path / "w" / "kd" / "last.pth"
    before = last.read_bytes()
    # The README's fine-tune command once wrote over the very file it started from. Refused
    # before the teacher is loaded (here there is none) or the student built:
    with pytest.raises(FeatherFaceError, match=rf"holds checkpoints .*--resume {last}, .*--name, .*--overwrite"):
        train_v2.main(v2_args(tmp_path, tmp_path / "no_teacher.pth", "--max_iters", "1", "--init_weights", str(last)))
    state = train_v2.main(v2_args(tmp_path, teacher, "--max_iters", "1", "--init_weights", str(last), "--name", "ft"))
    assert state.iteration == 1 and last.read_bytes() == before and (tmp_path / "w" / "ft" / "last.pth").is_file()


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
