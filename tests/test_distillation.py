"""DistillationLoss, combine and the DynamicAlpha schedule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.alpha_schedule import DynamicAlpha
from layers.distillation import DistillationLoss, combine

B, N = 2, 50


def _outputs(seed: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    outs = tuple(torch.randn(B, N, k, generator=g) * 2 for k in (4, 2, 10))
    return tuple(o.requires_grad_(requires_grad) for o in outs)


def _manual_kl(s_conf, t_conf, T):
    p_t = F.softmax(t_conf.double() / T, -1)
    p_s = F.softmax(s_conf.double() / T, -1)
    return (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * T * T


def test_zero_when_student_equals_teacher():
    teacher = _outputs(0)
    student = tuple(t.clone().requires_grad_(True) for t in teacher)
    # make sure some anchors are confident so the regression parts are really evaluated
    teacher[1][:, :10] = torch.tensor([-3.0, 3.0])
    student[1].data[:, :10] = torch.tensor([-3.0, 3.0])
    out = DistillationLoss()(student, teacher)
    for key in ("distill", "kd_cls", "kd_box", "kd_landm"):
        assert abs(out[key].item()) < 1e-6, key


def test_class_part_matches_manual_kl_and_scales_with_t_squared():
    student, teacher = _outputs(1), _outputs(2)
    for T in (1.0, 4.0):
        got = DistillationLoss(temperature=T)(student, teacher)["kd_cls"]
        assert got.item() == pytest.approx(_manual_kl(student[1], teacher[1], T).item(), rel=1e-5)
    # T^2 factor: the same KL at T=4 without the factor is 16x smaller
    kl4 = _manual_kl(student[1], teacher[1], 4.0).item() / 16.0
    got4 = DistillationLoss(temperature=4.0)(student, teacher)["kd_cls"].item()
    assert got4 == pytest.approx(16.0 * kl4, rel=1e-5)
    assert got4 != pytest.approx(kl4, rel=1e-2)


def test_no_gradient_reaches_teacher_and_student_gets_one():
    student, teacher = _outputs(3, requires_grad=True), _outputs(4, requires_grad=True)
    with torch.no_grad():
        teacher[1][:, :20] = torch.tensor([-2.0, 2.0])  # confident anchors -> box/landm terms active
    out = DistillationLoss()(student, teacher)
    assert out["distill"].requires_grad
    for key in ("kd_cls", "kd_box", "kd_landm"):
        assert not out[key].requires_grad
    assert out["kd_box"] > 0 and out["kd_landm"] > 0
    out["distill"].backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_box_and_landmark_distilled_only_on_confident_anchors():
    teacher = _outputs(5)
    teacher[1][:] = torch.tensor([2.0, -2.0])  # background everywhere ...
    confident = torch.zeros(B, N, dtype=torch.bool)
    confident[0, 3] = confident[1, 7] = confident[1, 8] = True
    teacher[1][confident] = torch.tensor([-2.0, 2.0])  # ... except 3 anchors
    student = [t.clone() for t in teacher]

    # differences on non-confident anchors do not count
    student[0][~confident] += 5.0
    student[2][~confident] -= 5.0
    out = DistillationLoss(conf_threshold=0.5)(student, teacher)
    assert out["kd_box"].item() == 0.0 and out["kd_landm"].item() == 0.0

    # differences on confident anchors do: smooth-L1 summed over coords / number of confident anchors
    student[0][confident] += 0.5  # |d| < 1: 0.5 * d^2 = 0.125 per coordinate
    student[2][confident] += 2.0  # |d| >= 1: |d| - 0.5 = 1.5 per coordinate
    out = DistillationLoss(conf_threshold=0.5)(student, teacher)
    assert out["kd_box"].item() == pytest.approx(4 * 0.125, rel=1e-5)
    assert out["kd_landm"].item() == pytest.approx(10 * 1.5, rel=1e-5)


def test_no_confident_anchor_gives_zero_regression_terms_without_nan():
    student, teacher = _outputs(6, requires_grad=True), _outputs(7)
    teacher[1][:] = torch.tensor([5.0, -5.0])
    loss = DistillationLoss(box_weight=2.0, landm_weight=3.0)
    out = loss(student, teacher)
    assert out["kd_box"].item() == 0.0 and out["kd_landm"].item() == 0.0
    assert out["distill"].item() == pytest.approx(out["kd_cls"].item())
    out["distill"].backward()
    assert torch.isfinite(student[0].grad).all()


def test_weights_combine_parts():
    student, teacher = _outputs(8), _outputs(9)
    teacher[1][:, ::3] = torch.tensor([-3.0, 3.0])
    out = DistillationLoss(cls_weight=0.5, box_weight=2.0, landm_weight=0.1)(student, teacher)
    expected = 0.5 * out["kd_cls"] + 2.0 * out["kd_box"] + 0.1 * out["kd_landm"]
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_probabilities_give_the_same_loss_as_logits():
    student, teacher = _outputs(10), _outputs(11)
    teacher_prob = (teacher[0], F.softmax(teacher[1], -1), teacher[2])
    a = DistillationLoss()(student, teacher)
    b = DistillationLoss(teacher_is_prob=True)(student, teacher_prob)
    for key in a:
        assert b[key].item() == pytest.approx(a[key].item(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="softmax"):
        DistillationLoss(teacher_is_prob=True)(student, teacher)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_teacher_probabilities_in_half_precision_are_accepted(dtype):
    """An eval-mode teacher run in half precision (a bf16 model, or CPU autocast, where softmax
    stays bf16) returns rows that sum to 1 only within the dtype's rounding: bf16 was refused
    as "not a softmax"."""
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(B, 4000, 2, generator=g) * 3
    teacher = (torch.zeros(B, 4000, 4), F.softmax(logits.to(dtype), -1), torch.zeros(B, 4000, 10))
    student = (torch.zeros(B, 4000, 4), torch.zeros(B, 4000, 2), torch.zeros(B, 4000, 10))
    got = DistillationLoss(teacher_is_prob=True)(student, teacher)["kd_cls"].item()
    want = DistillationLoss()(student, (teacher[0], logits, teacher[2]))["kd_cls"].item()
    assert got == pytest.approx(want, rel=2e-2)
    # rows that are clearly not probabilities are still refused
    with pytest.raises(ValueError, match="softmax"):
        DistillationLoss(teacher_is_prob=True)(student, (teacher[0], teacher[1] * 0.9, teacher[2]))


def test_bad_shapes_are_rejected():
    student, teacher = _outputs(12), _outputs(13)
    with pytest.raises(ValueError, match="same anchors"):
        DistillationLoss()(student, tuple(t[:, :10] for t in teacher))
    with pytest.raises(ValueError, match=r"conf must have shape \(B, N, 2\)"):
        DistillationLoss()(student, (teacher[0], teacher[1][..., :1], teacher[2]))
    with pytest.raises(ValueError):
        DistillationLoss(temperature=0)


def test_combine():
    task, distill = torch.tensor(2.0), torch.tensor(10.0)
    assert combine(task, distill, 0.8).item() == pytest.approx(0.8 * 10 + 0.2 * 2)
    assert DistillationLoss.combine(task, distill, 0.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        combine(task, distill, 1.5)


# ---------------------------------------------------------------- DynamicAlpha


def test_alpha_values_at_key_epochs():
    a = DynamicAlpha()  # 0.8 -> 0.5 over 400 epochs, cap 0.4 from epoch 320
    assert a.value(0) == pytest.approx(0.8)
    assert a.value(100) == pytest.approx(0.725)
    assert a.value(200) == pytest.approx(0.65)
    assert a.value(319) == pytest.approx(0.8 - 0.3 * 319 / 400)  # last uncapped epoch
    assert a.value(320) == pytest.approx(0.4)
    assert a.linear(330) == pytest.approx(0.5525)
    assert a.value(330) == pytest.approx(0.4)
    assert a.linear(399) == pytest.approx(0.50075)
    assert a.value(399) == pytest.approx(0.4)
    assert a.value(1000) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        a.value(-1)


def test_alpha_after_plateau_and_resume():
    a = DynamicAlpha()
    assert a.step_validation(1.0) is False  # first check sets the best
    for _ in range(10):  # 10 checks without improvement: not yet "more than 10"
        assert a.step_validation(1.0) is False
    assert a.value(100) == pytest.approx(0.725)
    assert a.step_validation(1.5) is True  # 11th: plateau
    assert a.value(100) == pytest.approx(0.725 * 0.9)
    assert a.value(200) == pytest.approx(0.65 * 0.9)
    assert a.value(330) == pytest.approx(0.4)  # 0.5525 * 0.9 = 0.497 still above the cap

    state = a.state_dict()
    b = DynamicAlpha()
    b.load_state_dict(state)
    assert b.value(100) == pytest.approx(a.value(100))

    # the counter restarted: an improvement resets it, 11 more bad checks -> second plateau
    a.step_validation(0.5)
    for _ in range(11):
        a.step_validation(0.6)
    assert a.num_plateaus == 2
    assert a.value(0) == pytest.approx(0.8 * 0.81)
    assert a.value(300) == pytest.approx((0.8 - 0.3 * 0.75) * 0.81)
    # late cap still applies below the shrunk value
    for _ in range(5 * 11):
        a.step_validation(1.0)
    assert a.value(399) == pytest.approx(0.50075 * 0.9**7)
    assert math.isclose(b.value(100), 0.725 * 0.9)


@pytest.mark.parametrize("fraction,total", [(0.55, 100), (0.56, 25), (0.8, 400), (0.5, 7)])
def test_late_cap_starts_exactly_at_the_fraction(fraction, total):
    """The cap starts at the first epoch e with e >= fraction * total in exact arithmetic;
    0.55 * 100 is 55.000000000000007 in floats, which left epoch 55 uncapped."""
    a = DynamicAlpha(total_epochs=total, late_fraction=fraction, late_cap=0.1)
    first = -(-round(fraction * 100) * total // 100)  # ceil(fraction * total), in integers
    assert a.value(first - 1) > 0.1
    assert a.value(first) == pytest.approx(0.1)
