"""Training that shows what it learned (issue 13): precise BN, validation AP that picks best.pth,
real WIDER labels, and fine-tuning with --init_weights."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import train
import train_v2
import utils.training.trainer as trainer_module
from data.check import check_dataset
from models import build_model
from tests.conftest import ROOT, shared_path
from tests.test_train import SAMPLE, make_args
from tests.test_train_v2 import teacher, v2_args  # noqa: F401 - fixture
from utils.checkpoint import load_checkpoint, load_model, save_checkpoint
from utils.errors import CheckpointError, FeatherFaceError
from utils.evaluation.widerface_eval import evaluate_predictions, load_ground_truth
from utils.inference.detector import FaceDetector
from utils.training.precise_bn import batchnorm_layers, recompute_bn_stats
from utils.training.trainer import Trainer
from utils.training.validation import ap50_over_labels, selection_metric

pytestmark = pytest.mark.usefixtures("one_thread")

WIDER_SAMPLE = ("data", "widerface_val_sample")


def wider_sample() -> Path:
    return shared_path(*WIDER_SAMPLE, "label_wider_bbx_gt_format.txt")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:4] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


# ----------------------------------------------------------------------------- precise BN
class TwoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4, momentum=0.01)
        self.drop = nn.Dropout(0.5)
        self.bn2 = nn.BatchNorm1d(4 * 6 * 6, momentum=0.3)

    def forward(self, x):
        return self.bn2(self.drop(self.bn1(self.conv(x))).flatten(1))


def test_precise_bn_sets_the_average_batch_statistics():
    torch.manual_seed(0)
    net = TwoBN()
    batches = [torch.randn(5, 3, 8, 8) * (1 + i) + i for i in range(3)]
    with torch.no_grad():  # expected: mean of per-batch means / unbiased variances, dropout off
        h1 = [net.conv(b) for b in batches]
        mean1 = torch.stack([h.mean((0, 2, 3)) for h in h1]).mean(0)
        var1 = torch.stack([h.var((0, 2, 3), unbiased=True) for h in h1]).mean(0)
        h2 = [((h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(h.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                   + 1e-5)).flatten(1) for h in h1]
        mean2 = torch.stack([h.mean(0) for h in h2]).mean(0)
    net.train()
    rng = torch.get_rng_state()
    assert recompute_bn_stats(net, iter(batches)) == 3
    torch.testing.assert_close(net.bn1.running_mean, mean1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.bn1.running_var, var1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.bn2.running_mean, mean2, rtol=1e-4, atol=1e-5)  # Dropout was off
    assert net.training and net.bn1.training and net.drop.training  # modes and momenta restored
    assert (net.bn1.momentum, net.bn2.momentum) == (0.01, 0.3) and int(net.bn1.num_batches_tracked) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # no random draw (exact resume)
    weights = {k: v.clone() for k, v in net.named_parameters()}
    assert all(torch.equal(weights[k], v) for k, v in net.named_parameters())
    assert len(batchnorm_layers(net)) == 2


def test_precise_bn_failure_keeps_the_old_statistics():
    net = TwoBN().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def broken():
        yield torch.randn(2, 3, 8, 8)
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        recompute_bn_stats(net, broken())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net.training and net.bn1.momentum == 0.01


@pytest.mark.slow
def test_precise_bn_makes_a_short_run_usable_in_eval_mode(tmp_path):
    """Eight steps: with the running averages (BiFPN momentum 0.01) the eval-mode val loss is far
    above the training loss; with precise BN (the default) it is close to it."""
    def run(*extra):
        args = make_args(tmp_path / str(len(extra)), "--epochs", "8", "--no_augment", "--batch_size", "3",
                         "--val_dataset", str(SAMPLE), "--val_interval", "8", "--no_val_ap", "--lr", "3e-3",
                         *extra, model="v1")
        return train.main(args).history[-1]

    precise, running = run(), run("--precise_bn_batches", "0")
    assert "precise_bn_s" in precise and "precise_bn_s" not in running
    assert precise["val_loss"] < 0.7 * running["val_loss"], (precise, running)  # measured 13.4 vs 24.6
    assert precise["val_loss"] < 1.5 * precise["loss"], precise


# ------------------------------------------------------------------------- validation AP
def test_ap50_over_labels_uses_the_official_protocol_and_ignores_invalid_faces():
    from data.wider_face import LabelRecord

    def record(boxes, invalid):
        boxes = np.asarray(boxes, np.float32)
        return LabelRecord(0, "x.jpg", 1, boxes, -np.ones((len(boxes), 10), np.float32),
                           np.arange(len(boxes)), np.asarray(invalid, bool))

    records = [record([[10, 10, 50, 50], [100, 100, 140, 140], [200, 10, 240, 50]], [False, False, True]),
               record([], [])]
    perfect = [np.array([[10, 10, 50, 50, 0.9], [100, 100, 140, 140, 0.8]]), np.zeros((0, 15))]
    assert ap50_over_labels(perfect, records) == pytest.approx(1.0)
    on_invalid = [np.vstack([perfect[0], [[200, 10, 240, 50, 0.95]]]), perfect[1]]
    assert ap50_over_labels(on_invalid, records) == pytest.approx(1.0)  # neither hit nor false positive
    half = [perfect[0][:1], np.zeros((0, 15))]
    assert ap50_over_labels(half, records) == pytest.approx(0.5)
    false_first = [np.vstack([[[300, 300, 340, 340, 0.99]], perfect[0]]), perfect[1]]
    assert 0.5 < ap50_over_labels(false_first, records) < 1.0


def test_selection_metric_is_one_declared_metric():
    assert selection_metric(True, True, "loss").key == "val_ap50"
    assert selection_metric(True, False, "loss").key == "val_loss"
    assert selection_metric(False, True, "task").key == "task"
    ap = selection_metric(True, True, "loss")
    assert ap.value({"loss": 1.0}) is None and ap.value({"val_ap50": 0.4}) == 0.4 and ap.as_loss(0.4) == -0.4


def _events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_val_ap_is_computed_and_logged(tmp_path, capsys):
    labels = tmp_path / "wider_face_val_bbx_gt.txt"  # elsewhere than its images: --val_image_root
    labels.write_text(wider_sample().read_text())
    gt_dir = shared_path("data", "widerface_val_gt")
    args = make_args(tmp_path, "--epochs", "3", "--val_interval", "2", "--val_dataset", str(labels),
                     "--val_image_root", str(wider_sample().parent / "images"), "--val_gt_dir", str(gt_dir))
    state = train.main(args)
    out = capsys.readouterr().out
    validated = [h for h in state.history if "val_ap50" in h]
    assert [h["epoch"] for h in validated] == [2, 3]  # every 2nd epoch and after the last
    for h in validated:
        assert {"val_loss", "val_conf", "val_easy", "val_medium", "val_hard"} <= set(h)
        assert all(0.0 <= h[k] <= 1.0 for k in ("val_ap50", "val_easy", "val_medium", "val_hard"))
    assert "val_ap50" in out and "val_easy" in out
    scalars = _events(tmp_path / "runs" / "t")
    assert len(scalars["epoch/val_ap50"]) == 2 and len(scalars["epoch/val_hard"]) == 2
    assert scalars["epoch/val_ap50"] == pytest.approx([h["val_ap50"] for h in validated], abs=1e-6)
    assert state.best_metric_name == "val_ap50"
    assert state.best_metric == pytest.approx(-max(h["val_ap50"] for h in validated))
    with pytest.raises(FeatherFaceError, match="not in the WIDER val ground truth"):
        train.main(make_args(tmp_path / "x", "--val_dataset", str(SAMPLE), "--val_gt_dir", str(gt_dir)))


def _scripted_validation(monkeypatch, aps, losses):
    calls = []

    def fake(net, val_set, criterion, priors, device, batch_size, num_workers, compute_ap, wider):
        i = len(calls)
        calls.append(compute_ap)
        out = {"val_loss": losses[i]}
        if compute_ap:
            out["val_ap50"] = aps[i]
        return out

    monkeypatch.setattr(trainer_module, "run_validation", fake)
    return calls


def _best_epoch(tmp_path) -> int:
    return load_checkpoint(tmp_path / "w" / "t" / "best.pth")["run_state"]["epoch"]


def test_best_checkpoint_follows_val_ap_only(tmp_path, monkeypatch):
    # The val loss improves every epoch; the AP peaks at epoch 2. best.pth must be epoch 2's.
    _scripted_validation(monkeypatch, aps=[0.2, 0.5, 0.4, 0.45], losses=[5.0, 4.0, 3.0, 2.0])
    state = train.main(make_args(tmp_path, "--epochs", "4", "--val_dataset", str(SAMPLE), "--precise_bn_batches", "0"))
    assert _best_epoch(tmp_path) == 2 and state.best_metric == pytest.approx(-0.5)
    # Without the AP, the val loss is the one metric: best is the last epoch.
    _scripted_validation(monkeypatch, aps=[0] * 4, losses=[5.0, 4.0, 3.0, 2.0])
    state = train.main(make_args(tmp_path / "b", "--epochs", "4", "--val_dataset", str(SAMPLE), "--no_val_ap",
                                 "--precise_bn_batches", "0"))
    assert _best_epoch(tmp_path / "b") == 4 and state.best_metric_name == "val_loss"


def test_epochs_between_validations_never_compete_with_val_numbers(tmp_path, monkeypatch):
    # Training losses (~30) are never compared with val losses: best.pth only at validated epochs.
    calls = _scripted_validation(monkeypatch, aps=[0.3, 0.2], losses=[1.0, 2.0])
    state = train.main(make_args(tmp_path, "--epochs", "4", "--val_interval", "3", "--val_dataset", str(SAMPLE),
                                 "--precise_bn_batches", "0"))
    assert len(calls) == 2 and [("val_ap50" in h) for h in state.history] == [False, False, True, True]
    assert _best_epoch(tmp_path) == 3


def test_v2_best_follows_the_task_loss_not_the_alpha_weighted_total(tmp_path, teacher):  # noqa: F811
    state = train_v2.main(v2_args(tmp_path, teacher, "--epochs", "3", "--mixup_prob", "0", "--cutmix_prob", "0"))
    assert state.best_metric_name == "task"
    tasks = [h["task"] for h in state.history]
    assert state.best_metric == pytest.approx(min(tasks))
    best = load_checkpoint(tmp_path / "w" / "kd" / "best.pth")["run_state"]
    assert best["epoch"] == 1 + int(np.argmin(tasks))


# ----------------------------------------------------------------------- real WIDER labels
def test_official_file_with_degenerate_invalid_and_empty_entries_trains(tmp_path, capsys):
    images = tmp_path / "images"
    for name in ("group_8.jpg", "crowd_27.jpg"):
        (images / "ev").mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "data" / "sample" / "images" / name, images / "ev" / name)
    text = "\n".join([
        "ev/group_8.jpg", "4",
        "100 100 40 50 0 0 0 0 0 0",
        "300 120 0 40 0 0 0 0 0 0",      # zero width: dropped with a warning, image kept
        "500 100 40 50 0 0 0 1 0 0",     # invalid flag: left out of training by default
        "700 100 40 -5 0 0 0 0 0 0",     # negative height: dropped
        "ev/crowd_27.jpg", "0", "0 0 0 0 0 0 0 0 0 0",  # a zero-face entry, as the official files write it
        "ev/group_8.jpg", "1", "50 60 30 30 2 0 0 0 1 0",
    ]) + "\n"
    label = tmp_path / "wider_face_train_bbx_gt.txt"
    label.write_text(text)
    report = check_dataset(label)
    assert report.ok and report.num_images == 3 and report.num_empty == 1
    assert (report.num_faces, report.num_invalid, len(report.dropped_boxes)) == (3, 1, 2)
    assert [w.line for w in report.dropped_boxes] == [4, 6]
    args = make_args(tmp_path, "--max_iters", "2")
    args.training_dataset = str(label)
    state = train.main(args)
    out = capsys.readouterr().out
    assert state.iteration == 2
    assert "training v1_slim on 3 images (2 faces)" in out
    assert "2 degenerate box(es) dropped, 1 face(s) flagged invalid left out" in out
    args = make_args(tmp_path / "k", "--max_iters", "1", "--keep_invalid_faces")
    args.training_dataset = str(label)
    train.main(args)
    assert "training v1_slim on 3 images (3 faces)" in capsys.readouterr().out


def test_skip_bad_samples_drops_a_malformed_face_line_not_its_image(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "data" / "sample" / "images" / "group_8.jpg", images / "a.jpg")
    label = tmp_path / "label.txt"
    label.write_text("# a.jpg\n10 10 40 40\n10 10 40\n20 20 abc 10\n")
    args = make_args(tmp_path, "--max_iters", "1", "--skip_bad_samples")
    args.training_dataset = str(label)
    state = train.main(args)
    out = capsys.readouterr().out
    assert state.iteration == 1 and "training v1_slim on 1 images (1 faces)" in out
    assert "leaving out 0 image(s) with problems and 2 unusable face line(s)" in out


# ----------------------------------------------------------------------------- --init_weights
def test_init_weights_loads_weights_only_with_a_fresh_optimizer(tmp_path):
    train.main(make_args(tmp_path / "a", "--max_iters", "2"))
    source = tmp_path / "a" / "w" / "t" / "last.pth"
    blob = load_checkpoint(source)
    args = make_args(tmp_path / "b", "--max_iters", "1", "--init_weights", str(source))
    trainer = Trainer(args, build_model("v1_slim"))
    assert trainer.state.iteration == 0 and not trainer.optimizer.state  # fresh optimizer and schedule
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, blob["model"][k]), k
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    state = trainer.fit()
    assert state.iteration == 1

    wrong = tmp_path / "v2.pth"
    save_checkpoint(wrong, build_model("v2"))
    with pytest.raises(CheckpointError, match="holds a 'v2' model, this run trains 'v1_slim'"):
        train.main(make_args(tmp_path / "c", "--max_iters", "1", "--init_weights", str(wrong)))
    blob["model"].pop("bbox_head.convs.2.bias")
    broken = tmp_path / "broken.pth"
    torch.save(blob, broken)
    with pytest.raises(CheckpointError, match=r"missing keys: bbox_head\.convs\.2\.bias"):
        train.main(make_args(tmp_path / "d", "--max_iters", "1", "--init_weights", str(broken)))
    with pytest.raises(FeatherFaceError, match="exclude each other"):
        train.main(make_args(tmp_path / "e", "--init_weights", str(source), "--resume", str(source)))


def test_init_weights_for_the_v2_student(tmp_path, teacher):  # noqa: F811
    student = tmp_path / "student.pth"
    save_checkpoint(student, build_model("v2"))
    state = train_v2.main(v2_args(tmp_path, teacher, "--max_iters", "1", "--init_weights", str(student)))
    assert state.iteration == 1
    with pytest.raises(CheckpointError, match="holds a 'v1_slim' model, this run trains 'v2'"):
        train_v2.main(v2_args(tmp_path / "x", teacher, "--max_iters", "1", "--init_weights", str(teacher)))


def test_init_weights_hint_names_the_script_running(tmp_path, teacher):  # noqa: F811
    # train.py trains any model: it once answered with train_v2.py's hint.
    with pytest.raises(CheckpointError) as error:
        train.main(make_args(tmp_path / "a", "--max_iters", "1", "--init_weights", str(teacher), model="v2"))
    assert "leave --model out to train the model it holds" in str(error.value)
    assert "train_v2.py" not in str(error.value)
    args = make_args(tmp_path / "b", "--max_iters", "1", "--init_weights", str(teacher))
    args.model = None  # as the hint says: the checkpoint's own model
    assert train.main(args).iteration == 1
    with pytest.raises(CheckpointError, match=r"train_v2\.py trains V2 only: give a V2 checkpoint \(a V1-family"):
        train_v2.main(v2_args(tmp_path / "c", teacher, "--max_iters", "1", "--init_weights", str(teacher)))


def _matched(faces: np.ndarray, reference: np.ndarray, iou: float = 0.5) -> int:
    if len(faces) == 0 or len(reference) == 0:
        return 0
    return int((box_iou(reference[:, :4], faces[:, :4]).max(axis=1) >= iou).sum())


@pytest.mark.slow
def test_init_weights_from_the_published_model_keeps_its_detections(tmp_path, real_checkpoint):
    group_8 = cv2.imread(str(ROOT / "data" / "sample" / "images" / "group_8.jpg"))
    reference = FaceDetector(real_checkpoint, conf=0.5).detect_array(group_8)
    assert len(reference) == 8
    sample = shared_path("data", "sample", "label.txt")
    common = ["--training_dataset", str(sample), "--image_size", "640", "--batch_size", "5", "--device", "cpu",
              "--num_workers", "0", "--save_folder", str(tmp_path / "w"), "--log_dir", str(tmp_path / "runs"),
              "--name", "ft", "--quiet", "--save_interval", "0", "--init_weights", str(real_checkpoint)]
    args = train.get_args_parser().parse_args(common + ["--epochs", "3", "--lr", "1e-5"])
    trainer = Trainer(args, build_model("v1_original"))
    before = FaceDetector(trainer.model, conf=0.5).detect_array(group_8)  # before the first step
    np.testing.assert_allclose(before, reference, atol=1e-4)
    # No --model: the model comes from the checkpoint; three small-lr steps on the five photos.
    state = train.main(train.get_args_parser().parse_args(common + ["--epochs", "3", "--lr", "1e-5"]))
    assert state.iteration == 3
    model, _ = load_model(tmp_path / "w" / "ft" / "last.pth")
    assert model.config.name == "v1_original"
    after = FaceDetector(model, conf=0.5).detect_array(group_8)
    assert _matched(after, reference) >= 7, (len(after), after[:, 4])


# ----------------------------------------------------------------------------- overfit sanity
@pytest.mark.slow
def test_overfit_four_wider_images_then_last_pth_finds_them(tmp_path):
    """V1 from the ImageNet backbone, --no_augment, the 4 shared WIDER val images, 100 iterations,
    default flags (precise BN on): last.pth scores easy AP >= 0.6 on those images at the training
    scale (640 / long side), by the official protocol."""
    labels = wider_sample()
    backbone = shared_path("weights", "mobilenetV1X0.25_pretrain.tar")
    gt_dir = shared_path("data", "widerface_val_gt")
    args = train.get_args_parser().parse_args([
        "--training_dataset", str(labels), "--pretrained_backbone", str(backbone), "--no_augment",
        "--batch_size", "4", "--epochs", "100", "--device", "cpu", "--num_workers", "0",
        "--save_folder", str(tmp_path / "w"), "--log_dir", str(tmp_path / "runs"), "--name", "of", "--quiet",
        "--save_interval", "0"])
    state = train.main(args)
    assert state.iteration == 100 and state.history[-1]["loss"] < 0.5 * state.history[0]["loss"]
    detector = FaceDetector(tmp_path / "w" / "of" / "last.pth", conf=0.02)
    by_key = {(g.event, g.name): g for g in load_ground_truth(gt_dir)}
    preds, gt = {}, []
    for relative in (labels.parent / "wider_subset.txt").read_text().split():
        image = cv2.imread(str(labels.parent / "images" / relative))
        found = detector.detect_array(image, scale=640 / max(image.shape[:2]))
        event, name = relative.split("/")[0], Path(relative).stem
        xywh = np.asarray(found[:, :5], np.float64)
        xywh[:, 2:4] -= xywh[:, :2]
        preds.setdefault(event, {})[name] = xywh
        gt.append(by_key[(event, name)])
    ap = evaluate_predictions(preds, gt).to_dict()
    print("overfit AP", ap, "final loss", state.history[-1]["loss"])
    assert ap["easy"] >= 0.6, ap
    assert not math.isnan(ap["hard"])


def test_bad_val_labels_are_a_clear_error(tmp_path):
    label = tmp_path / "val.txt"
    label.write_text("# a.jpg\n10 10 20\n")
    # Checked like the training data, before the first epoch: the missing image and the bad line.
    with pytest.raises(FeatherFaceError, match=r"--val_dataset: 2 problem\(s\) in .*val.txt \(first: .*val.txt:1: "
                                               r"image not found"):
        train.main(make_args(tmp_path, "--val_dataset", str(label)))
