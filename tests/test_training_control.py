"""GradientClipper, SmartEarlyStopping and TrainingMonitor."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layers.early_stopping import SmartEarlyStopping
from layers.gradient_clipper import GradientClipper
from layers.training_monitor import TrainingMonitor


def _grad_norm(params) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()


# ---------------------------------------------------------------- GradientClipper


def test_clipper_caps_the_norm_and_returns_the_pre_clip_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    (model(torch.randn(4, 8)) * 100).sum().backward()
    params = list(model.parameters())
    before = _grad_norm(params)
    assert before > 1.0
    clipper = GradientClipper(max_norm=1.0)
    returned = clipper(params)
    assert returned == pytest.approx(before, rel=1e-5)
    assert _grad_norm(params) <= 1.0 + 1e-6
    assert clipper.stats()["clipped_steps"] == 1


def test_clipper_leaves_small_gradients_and_tracks_history():
    p = nn.Parameter(torch.zeros(3))
    clipper = GradientClipper(max_norm=1.0, history=3)
    for norm in (0.5, 2.0, 0.25, 4.0):
        p.grad = torch.tensor([norm, 0.0, 0.0])
        assert clipper([p]) == pytest.approx(norm)
        if norm <= 1.0:
            assert p.grad[0].item() == pytest.approx(norm)  # untouched
        else:
            assert p.grad.norm().item() <= 1.0 + 1e-6
    stats = clipper.stats()
    assert stats["count"] == 3  # history is a bounded deque
    assert stats["mean"] == pytest.approx((2.0 + 0.25 + 4.0) / 3)
    assert stats["max"] == pytest.approx(4.0)
    assert stats["last"] == pytest.approx(4.0)
    assert stats["clipped_steps"] == 2 and stats["clipped_fraction"] == pytest.approx(0.5)

    p.grad = torch.tensor([math.inf, 0.0, 0.0])
    assert math.isinf(clipper([p]))
    assert clipper.stats()["nonfinite_steps"] == 1 and clipper.stats()["count"] == 3

    restored = GradientClipper(max_norm=1.0, history=3)
    restored.load_state_dict(clipper.state_dict())
    assert restored.stats() == clipper.stats()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clipper_leaves_gradients_alone_when_the_norm_is_not_finite(bad):
    """clip_grad_norm_ scales by max_norm / norm: with an overflowed norm it turned every
    finite gradient of the model into 0 (inf) or NaN (nan). The gradients must stay as they
    are (the caller skips the step) and the norm is reported, uncounted in the history."""
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([bad, 1.0, 2.0])
    b.grad = torch.tensor([0.5, -0.5])
    clipper = GradientClipper(max_norm=1.0)
    norm = clipper([a, b])
    assert not math.isfinite(norm) and (math.isnan(norm) if math.isnan(bad) else math.isinf(norm))
    assert torch.equal(b.grad, torch.tensor([0.5, -0.5]))
    assert a.grad[1:].tolist() == [1.0, 2.0]
    assert clipper.stats()["nonfinite_steps"] == 1 and clipper.stats()["count"] == 0
    # the next, finite step is clipped as usual
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), None
    assert clipper([a, b]) == pytest.approx(5.0)
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert clipper.stats()["clipped_steps"] == 1


# ---------------------------------------------------------------- SmartEarlyStopping


def _run(stopper, epochs, losses=None, maps=None):
    """Feed epochs; returns the first epoch at which step() said stop, or None."""
    for e in epochs:
        loss = losses(e) if losses else 1.0
        m = maps(e) if maps else None
        if stopper.step(e, loss, m):
            return e
    return None


def test_never_stops_before_min_epoch():
    s = SmartEarlyStopping(patience=20, min_epoch=100)
    assert _run(s, range(100)) is None  # constant loss for 100 epochs
    assert s.num_bad_epochs == 99 and not s.should_stop
    # at min_epoch the strict limit (10) is long exceeded: stop at once
    assert s.step(100, 1.0) is True
    assert "strict window [100, 120)" in s.reason


def test_strict_window_stops_after_half_patience():
    s = SmartEarlyStopping(patience=20, min_epoch=100, strict_window=(100, 120))
    # improving until epoch 102, then flat
    stop = _run(s, range(130), losses=lambda e: 1.0 / (e + 1) if e <= 102 else 1.0)
    assert stop == 112  # bad epochs 103..112 = 10 = patience // 2
    assert s.num_bad_epochs == 10 and s.best_epoch == 102
    assert s.reason == ("no val-loss/mAP improvement in 10 validated epochs in the strict window [100, 120) "
                        "(epoch 113; best at epoch 103)")  # 1-based, as the training log counts


def test_after_window_stops_after_full_patience():
    s = SmartEarlyStopping(patience=20, min_epoch=100, strict_window=(100, 120))
    # improvement at 115 carries it out of the window with 4 bad epochs (116..119)
    stop = _run(s, range(200), losses=lambda e: 1.0 / (e + 1) if e <= 115 else 1.0)
    assert stop == 135  # bad epochs 116..135 = 20
    assert s.num_bad_epochs == 20
    assert "after the strict window" in s.reason


def test_resumed_stopper_decides_afresh():
    # A run that stopped early, resumed with more patience, goes on until its own limit.
    s = SmartEarlyStopping(patience=2, min_epoch=0, strict_window=(50, 60), metric="task")
    assert _run(s, range(10)) == 2 and s.reason.startswith("no task improvement in 2 validated epochs before")
    resumed = SmartEarlyStopping(patience=5, min_epoch=0, strict_window=(50, 60))
    resumed.load_state_dict(s.state_dict())
    assert resumed.should_stop and resumed.step(3, 1.0) is False and not resumed.reason
    assert resumed.step(4, 1.0) is False and resumed.step(5, 1.0) is True  # epochs 1..5 bad, over both runs
    assert resumed.step(6, 0.5) is False and resumed.best_epoch == 6  # an improvement clears it


def test_map_improvement_resets_the_counter():
    s = SmartEarlyStopping(patience=20, min_epoch=100)
    # loss flat from epoch 0 (best at 0), mAP improves every 5th epoch until 150
    def maps(e):
        return None if e % 5 else min(e, 150) / 1000.0

    stop = _run(s, range(300), maps=maps)
    assert stop == 170  # last improvement at 150, then 20 bad epochs
    assert s.best_epoch == 150


def test_min_delta_and_state_round_trip():
    s = SmartEarlyStopping(patience=4, min_epoch=0, strict_window=(0, 0), min_delta=0.1)
    s.step(0, 1.0)
    assert s.step(1, 0.95) is False and s.num_bad_epochs == 1  # not better by > 0.1
    t = SmartEarlyStopping(patience=4, min_epoch=0, strict_window=(0, 0), min_delta=0.1)
    t.load_state_dict(s.state_dict())
    assert [t.step(e, 0.95) for e in (2, 3, 4)] == [False, False, True]
    with pytest.raises(ValueError, match="NaN"):
        t.step(5, float("nan"))


# ---------------------------------------------------------------- TrainingMonitor


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))


def test_grad_norm_warnings():
    messages = []
    mon = TrainingMonitor(total_epochs=10, logger=messages.append)
    assert mon.log_step(0, 1.0, {"loss": 1.0}, 1e-3) is None
    assert mon.warnings == 0 and messages == []
    high = mon.log_step(1, 11.0, {"loss": 1.0}, 1e-3)
    low = mon.log_step(2, 1e-7, {"loss": 1.0}, 1e-3)
    assert "exploding" in high and "vanishing" in low
    assert mon.log_step(3, float("nan"), {}, 1e-3) is not None
    assert mon.warnings == 3 and len(messages) == 3


def test_end_epoch_summary_eta_and_scalars():
    writer, messages = FakeWriter(), []
    mon = TrainingMonitor(total_epochs=10, writer=writer, logger=messages.append)
    mon.log_step(5, torch.tensor(2.0), {"loss_l": torch.tensor(0.5), "loss_c": 1.5}, 0.01)
    assert ("train/grad_norm", 2.0, 5) in writer.scalars
    assert ("train/loss_l", 0.5, 5) in writer.scalars and ("train/lr", 0.01, 5) in writer.scalars

    mon.epoch_times = [60.0]  # pretend a previous epoch took one minute
    mon.start_epoch()
    line = mon.end_epoch(1, {"train_loss": 1.25, "val_loss": torch.tensor(2.5)})
    assert line == messages[-1]
    assert line.startswith("epoch 2/10 | time ")
    # mean epoch time ~30 s, 8 epochs left -> about 4 minutes
    assert "eta 4m0" in line or "eta 3m5" in line
    assert "mem " in line and "train_loss 1.25" in line and "val_loss 2.5" in line
    tags = {tag: (value, step) for tag, value, step in writer.scalars}
    assert tags["epoch/train_loss"] == (1.25, 1) and tags["epoch/val_loss"] == (2.5, 1)
    assert "epoch/time_s" in tags and "epoch/memory_mb" in tags
    assert tags["epoch/memory_mb"][0] > 1.0  # this process uses more than a MiB
    assert tags["epoch/grad_warnings"] == (0, 1) and "grad warnings" not in line

    mon.log_step(6, float("inf"), {}, 0.01)
    line = mon.end_epoch(2, {"train_loss": 1.0})
    assert line.count("warnings") == 1 and line.endswith("grad warnings 1")
    assert ("epoch/grad_warnings", 1.0, 2) in writer.scalars


def test_monitor_warning_count_survives_a_resume():
    mon = TrainingMonitor(total_epochs=4, logger=lambda _: None)
    mon.log_step(1, 50.0, {}, 0.1)
    mon.log_step(2, 60.0, {}, 0.1)
    resumed = TrainingMonitor(total_epochs=4, logger=lambda _: None)
    resumed.load_state_dict(mon.state_dict())
    resumed.log_step(3, 70.0, {}, 0.1)
    assert resumed.warnings == 3 and resumed.end_epoch(2, {}).endswith("grad warnings 3")


def test_resumed_stopper_answers_under_its_own_patience():
    s = SmartEarlyStopping(patience=2, min_epoch=0, strict_window=(50, 60))
    assert _run(s, range(10)) == 2 and s.stops_at(2)
    longer = SmartEarlyStopping(patience=5, min_epoch=0, strict_window=(50, 60))
    longer.load_state_dict(s.state_dict())
    late = SmartEarlyStopping(patience=2, min_epoch=5, strict_window=(50, 60))
    late.load_state_dict(s.state_dict())
    assert not longer.stops_at(2) and not late.stops_at(2) and late.stops_at(5)


def test_real_summary_writer(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = SummaryWriter(log_dir=str(tmp_path))
    mon = TrainingMonitor(total_epochs=3, writer=writer, logger=lambda _: None)
    mon.log_step(0, 0.5, {"loss": 3.0}, 0.1)
    mon.end_epoch(0, {"val_loss": 0.75})
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "epoch/val_loss", "epoch/time_s"} <= set(scalars)
    assert acc.Scalars("epoch/val_loss")[0].value == pytest.approx(0.75)
