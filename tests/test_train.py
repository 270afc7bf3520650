"""train.py end to end on the shipped sample: short runs, resume, bad data, failures."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from tests.conftest import ROOT, shared_path
from utils.checkpoint import atomic_torch_save, load_checkpoint, load_model
from utils.errors import FeatherFaceError, run_cli
from utils.training.trainer import BadDatasetError, NonFiniteLossError, NonFiniteWeightsError, Trainer

SAMPLE = ROOT / "data" / "sample" / "label.txt"


def make_args(tmp_path: Path, *extra: str, model: str = "v1_slim"):
    return train.get_args_parser().parse_args([
        "--model", model, "--training_dataset", str(SAMPLE), "--image_size", "96", "--batch_size", "2",
        "--epochs", "2", "--device", "cpu", "--num_workers", "0", "--save_folder", str(tmp_path / "w"),
        "--log_dir", str(tmp_path / "runs"), "--name", "t", "--pretrained_backbone", "none", "--quiet",
        "--save_interval", "0", *extra,
    ])


def test_help_needs_no_data():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--pretrained_backbone" in out.stdout and "--resume" in out.stdout


def test_two_iteration_run_writes_checkpoint_and_logs(tmp_path):
    state = train.main(make_args(tmp_path, "--max_iters", "2"))
    assert state.iteration == 2 and "max_iters" in state.stop_reason
    model, blob = load_model(tmp_path / "w" / "t" / "last.pth")
    assert model.config.name == "v1_slim" and blob["run_state"]["iteration"] == 2
    assert {"optimizer", "scheduler", "scaler", "args", "rng"} <= set(blob)
    assert (tmp_path / "runs" / "t" / "args.json").is_file()
    assert list((tmp_path / "runs" / "t").glob("events.out.tfevents.*"))


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    # v2 uses DropBlock, so this also checks that the RNG state is restored.
    full = train.main(make_args(tmp_path / "a", model="v2"))  # 2 epochs x 2 iterations
    assert full.iteration == 4
    train.main(make_args(tmp_path / "b", "--max_iters", "3", model="v2"))  # stops inside epoch 2
    resumed = train.main(make_args(tmp_path / "b", "--resume", str(tmp_path / "b" / "w" / "t" / "last.pth"), model="v2"))
    assert resumed.iteration == 4
    a = load_checkpoint(tmp_path / "a" / "w" / "t" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "b" / "w" / "t" / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resume_at_max_iters_takes_no_step(tmp_path):
    train.main(make_args(tmp_path, "--max_iters", "2", "--batch_size", "1"))
    last = tmp_path / "w" / "t" / "last.pth"
    before = last.read_bytes()
    state = train.main(make_args(tmp_path, "--max_iters", "2", "--batch_size", "1", "--resume", str(last)))
    assert state.iteration == 2 and "--max_iters 2 reached" in state.stop_reason
    assert last.read_bytes() == before


def test_overfit_four_images_drives_loss_down(tmp_path):
    images = ROOT / "data" / "sample" / "images"
    text = SAMPLE.read_text()
    group = text[text.index("# group_8.jpg"):]
    group = group[: group.index("#", 2)] if "#" in group[2:] else group
    label = tmp_path / "label.txt"  # 4 entries: the 3 shipped photos + group_8 again
    label.write_text((text + group).replace("# ", f"# {images}/"))
    args = make_args(tmp_path, "--epochs", "20", "--lr", "5e-3", "--batch_size", "4", "--no_augment", model="v2")
    args.training_dataset = str(label)
    state = train.main(args)
    losses = [h["loss"] for h in state.history]
    assert len(state.history) == 20 and state.history[0]["images_per_s"] > 0
    assert losses[-1] < 0.6 * losses[0], losses


def test_bad_data_refuses_to_start_then_skips(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "data" / "sample" / "images" / "group_8.jpg", images / "good.jpg")
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    label = tmp_path / "label.txt"
    label.write_text("# good.jpg\n10 10 40 40\n# corrupt.jpg\n10 10 40 40\n# missing.jpg\n5 5 20 20\n")
    args = make_args(tmp_path, "--max_iters", "1")
    args.training_dataset = str(label)
    with pytest.raises(BadDatasetError, match="--skip_bad_samples"):
        train.main(args)
    args.skip_bad_samples = True
    state = train.main(args)
    assert state.iteration == 1
    out = subprocess.run([sys.executable, "train.py", "--training_dataset", str(label), "--device", "cpu",
                          "--save_folder", str(tmp_path / "x"), "--log_dir", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "error:" in out.stderr and "Traceback" not in out.stderr


def test_label_file_problems_stop_even_with_skip_bad_samples(tmp_path):
    # A problem of the label file itself (here a face line before the first image) is not one
    # image that could be left out: one error, also with --skip_bad_samples.
    label = tmp_path / "label.txt"
    label.write_text("10 10 20 20\n" + SAMPLE.read_text().replace("# ", f"# {SAMPLE.parent / 'images'}/"))
    args = make_args(tmp_path, "--max_iters", "1", "--skip_bad_samples")
    args.training_dataset = str(label)
    with pytest.raises(BadDatasetError, match="1 of them in the label file itself"):
        train.main(args)
    assert not (tmp_path / "w").exists()


def test_a_missing_label_file_is_one_sentence_naming_its_flag(tmp_path, capsys):
    # It used to be reported as "1 of them in the label file itself ...: fix the file".
    missing = tmp_path / "widerface" / "train" / "label.txt"
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, make_args(tmp_path, "--training_dataset", str(missing)))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: label file {missing} not found (--training_dataset)"
    with pytest.raises(BadDatasetError, match=r"label file .+ is a folder, not a label file \(--val_dataset\)$"):
        train.main(make_args(tmp_path, "--val_dataset", str(tmp_path)))
    assert not (tmp_path / "w").exists()


def test_a_new_run_refuses_to_replace_an_earlier_runs_checkpoints(tmp_path, capsys):
    train.main(make_args(tmp_path, "--max_iters", "1"))
    run = tmp_path / "w" / "t"
    last = run / "last.pth"
    before = last.read_bytes()
    # The same command again (here with a label file that is not there: refused before any data check).
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, make_args(tmp_path, "--training_dataset", str(tmp_path / "none.txt")))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run} already holds checkpoints of an earlier run (last.pth): continue it with --resume {last}, "
        f"give this run another --name, or pass --overwrite to replace them")
    assert last.read_bytes() == before
    # --overwrite: the new run's checkpoints only, none of the earlier run's left beside them.
    (run / "epoch_9.pth").write_bytes(before)
    state = train.main(make_args(tmp_path, "--max_iters", "1", "--overwrite", "--seed", "1"))
    assert state.iteration == 1 and [p.name for p in run.glob("*.pth")] == ["last.pth"]
    assert load_checkpoint(last)["args"]["seed"] == 1
    assert "deleted the earlier run's 2 checkpoint(s)" in capsys.readouterr().out


def test_val_images_are_checked_before_training(tmp_path):
    # A missing or cut-short val image used to surface only at the first validation, after a
    # whole epoch, as a traceback; now the run does not start.
    images = tmp_path / "images"
    images.mkdir()
    whole = (ROOT / "data" / "sample" / "images" / "group_8.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(whole[: int(len(whole) * 0.9)])
    val = tmp_path / "val.txt"
    val.write_text("# cut.jpg\n10 10 40 40\n# missing.jpg\n5 5 20 20\n")
    args = make_args(tmp_path, "--max_iters", "1", "--skip_bad_samples", "--val_dataset", str(val))
    with pytest.raises(BadDatasetError, match="--val_dataset: 2 problem"):
        train.main(args)
    assert not (tmp_path / "w").exists()


def test_a_set_without_usable_faces_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "data" / "sample" / "images" / "group_8.jpg", images / "a.jpg")
    label = tmp_path / "label.txt"
    label.write_text("a.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")  # official format, one face-less image
    args = make_args(tmp_path, "--max_iters", "1")
    args.training_dataset = str(label)
    with pytest.raises(BadDatasetError, match="no usable face"):
        train.main(args)


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "a positive integer, got 0"), ("--image_size", "-5", "a positive integer, got -5"),
    ("--epochs", "0", "a positive integer"), ("--num_workers", "-1", "an integer >= 0"),
    ("--lr", "nan", "a finite number >= 0"), ("--warmup_epochs", "x", "a finite number >= 0, got 'x'")])
def test_bad_numeric_flags_are_one_line_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.get_args_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected {message}" in err and "Traceback" not in err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    train.main(make_args(tmp_path, "--epochs", "1"))
    last = tmp_path / "w" / "t" / "last.pth"
    good = load_checkpoint(last)["model"]
    real = Trainer.compute_loss

    def poisoned(self, images, targets):
        parts = real(self, images, targets)
        parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train.main(make_args(tmp_path, "--epochs", "2", "--resume", str(last)))
    after = load_checkpoint(last)["model"]
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_non_finite_bn_statistics_are_never_saved(tmp_path, monkeypatch):
    # The last epoch's checkpoint is written at once (no later step proves it): precise BN over
    # a diverged model could fill running_var with inf and still exit 0. Now nothing is written.
    train.main(make_args(tmp_path, "--epochs", "1"))
    saved = {name: load_checkpoint(tmp_path / "w" / "t" / name)["model"] for name in ("last.pth", "best.pth")}
    real = Trainer.precise_bn

    def diverged(self):
        seconds = real(self)
        next(m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))
        return seconds

    monkeypatch.setattr(Trainer, "precise_bn", diverged)
    with pytest.raises(NonFiniteWeightsError, match=r"non-finite values after epoch 2, .*running_var.*no checkpoint written"):
        train.main(make_args(tmp_path, "--epochs", "2", "--resume", str(tmp_path / "w" / "t" / "last.pth")))
    for name, before in saved.items():
        after = load_checkpoint(tmp_path / "w" / "t" / name)["model"]
        assert all(torch.equal(before[k], after[k]) for k in before), name


def test_ctrl_c_keeps_the_epoch_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    real = Trainer.train_step

    def interrupted(self, images, targets):
        if self.state.iteration == 3:  # inside epoch 2
            raise KeyboardInterrupt
        return real(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, make_args(tmp_path))
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip().endswith("interrupted")
    blob = load_checkpoint(tmp_path / "w" / "t" / "last.pth")  # epoch 1's, staged then flushed
    assert (blob["run_state"]["epoch"], blob["run_state"]["iteration"]) == (1, 2)


def test_killed_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"format": "x", "value": 1}, path)

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"value": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind
    (tmp_path / ".ckpt.pth.abc123.tmp").write_bytes(b"partial")  # what a SIGKILL mid-save leaves
    (tmp_path / ".other.pth.abc123.tmp").write_bytes(b"partial")  # another file's: not ours to remove
    atomic_torch_save({"value": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pth.abc123.tmp", "ckpt.pth"]


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    train.main(make_args(tmp_path, "--max_iters", "1"))
    with pytest.raises(FeatherFaceError, match="trained as 'v1_slim', .*resume it with train.py --model v1_slim"):
        train.main(make_args(tmp_path, "--resume", str(tmp_path / "w" / "t" / "last.pth"), model="v2"))


def test_pretrained_backbone_from_shared_file(tmp_path):
    path = shared_path("weights", "mobilenetV1X0.25_pretrain.tar")
    state = train.main(make_args(tmp_path, "--max_iters", "1", "--pretrained_backbone", str(path)))
    assert state.iteration == 1


def test_val_loss_does_not_depend_on_the_batch_size():
    # The mean of per-batch losses, each normalised by its own batch's matched faces, gave 18.8
    # at batch 1 and 28.5 at batch 2 here; now the whole set's sums over its matched faces.
    from layers.multibox_loss import MultiBoxLoss
    from layers.prior_box import prior_boxes_for
    from models import build_model
    from utils.training.validation import ValidationSet, run_validation

    torch.manual_seed(0)
    net = build_model("v1_slim")
    val_set = ValidationSet(SAMPLE, None, 96)
    priors = prior_boxes_for(net.config, (96, 96))
    criterion = MultiBoxLoss(2, 0.35, 7, net.config.variance, 2.0)
    runs = [run_validation(net, val_set, criterion, priors, torch.device("cpu"), b, 0, False) for b in (1, 2, 4)]
    for key in ("val_loss", "val_loc", "val_conf", "val_landm"):
        assert [r[key] for r in runs] == pytest.approx([runs[0][key]] * 3, rel=1e-5), key
    parts = runs[0]
    assert parts["val_loss"] == pytest.approx(2 * parts["val_loc"] + parts["val_conf"] + parts["val_landm"], rel=1e-6)


def test_last_epoch_checkpoints_are_written_once_with_the_stop_reason(tmp_path, monkeypatch):
    import utils.training.resume as resume

    written = []
    real = resume.atomic_torch_save
    monkeypatch.setattr(resume, "atomic_torch_save", lambda blob, path: (written.append(Path(path).name), real(blob, path)))
    state = train.main(make_args(tmp_path, "--save_interval", "2", "--precise_bn_batches", "0"))
    assert state.stop_reason == "finished 2 epochs"
    assert written.count("last.pth") == 2 and written[-1] == "epoch_2.pth", written  # once per epoch
    for name in ("last.pth", "best.pth", "epoch_2.pth"):
        run_state = load_checkpoint(tmp_path / "w" / "t" / name)["run_state"]
        assert run_state["stop_reason"] == ("finished 2 epochs" if run_state["epoch"] == 2 else ""), name
    last = tmp_path / "w" / "t" / "last.pth"
    before = last.read_bytes()  # resuming a finished run takes no step and writes nothing
    assert train.main(make_args(tmp_path, "--resume", str(last))).stop_reason == "finished 2 epochs"
    assert last.read_bytes() == before


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_backbone_message_is_printed_by_rank_0_only(tmp_path, monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(train, "Trainer", lambda args, model: type("Stub", (), {"fit": lambda self: None})())
    train.main(make_args(tmp_path))
    assert ("training from scratch" in capsys.readouterr().out) == printed


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "train.py", "--model", "v1_slim", "--training_dataset", str(SAMPLE), "--image_size", "96",
           "--batch_size", "1", "--epochs", "1", "--device", "cpu", "--num_workers", "0",
           "--save_folder", str(tmp_path / "w"), "--log_dir", str(tmp_path / "runs"), "--name", "ddp",
           "--pretrained_backbone", "none", "--quiet"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    blob = load_checkpoint(tmp_path / "w" / "ddp" / "last.pth")
    assert blob["run_state"]["iteration"] == 2  # 3 images over 2 ranks, batch 1 -> 2 steps each
    assert out.stdout.count("training from scratch") == 1  # rank 0 only
