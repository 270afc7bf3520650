"""MultiBox loss: normalisation, hard negatives, landmark masking, per-box weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.multibox_loss import MultiBoxLoss
from layers.prior_box import prior_boxes

VAR = (0.1, 0.2)
N = 10
# Ten disjoint priors along a row: prior i covers x in [i/10, (i+1)/10], y in [0.45, 0.55].
ROW_PRIORS = torch.tensor([[(i + 0.5) / N, 0.5, 0.1, 0.1] for i in range(N)])


def face_on_prior(i: int, label: float = 1.0, weight: float | None = None) -> torch.Tensor:
    """A (1, 15|16) target exactly covering ROW_PRIORS[i]: only that prior matches it."""
    x1, x2 = i / N, (i + 1) / N
    ldm = [x1 + 0.02, 0.47, x2 - 0.02, 0.47, (x1 + x2) / 2, 0.5, x1 + 0.03, 0.53, x2 - 0.03, 0.53]
    if label < 0:
        ldm = [-1.0] * 10
    row = [x1, 0.45, x2, 0.55, *ldm, label] + ([] if weight is None else [weight])
    return torch.tensor([row])


def zeros_preds(batch: int, n: int = N, requires_grad: bool = False):
    preds = (torch.zeros(batch, n, 4), torch.zeros(batch, n, 2), torch.zeros(batch, n, 10))
    return tuple(p.requires_grad_(requires_grad) for p in preds)


def test_all_background_batch_is_finite():
    loss_fn = MultiBoxLoss()
    priors = prior_boxes((64, 64))
    preds = tuple(torch.randn(2, priors.shape[0], k, requires_grad=True) for k in (4, 2, 10))
    out = loss_fn(preds, priors, [torch.zeros(0, 15), torch.zeros(0, 15)])
    assert out["num_pos"] == 0
    assert torch.isfinite(out["loss"]) and out["loss"].item() == 0.0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in preds)
    # a face too small for any prior is ignored -> also all background
    tiny = torch.tensor([[0.5, 0.5, 0.501, 0.501] + [0.5] * 10 + [1.0]])
    out = loss_fn(preds, priors, [tiny, torch.zeros(0, 15)])
    assert out["num_pos"] == 0 and torch.isfinite(out["loss"])


def test_hard_negative_count_and_value():
    z = torch.tensor([0.0, -3.0, 4.0, -1.0, 2.5, 0.5, 3.0, -2.0, 1.0, 1.5])  # face logit per prior
    conf = torch.stack([torch.zeros(N), z], dim=1)[None].requires_grad_(True)
    loc, _, landm = zeros_preds(1)
    out = MultiBoxLoss(neg_pos_ratio=3)((loc, conf, landm), ROW_PRIORS, [face_on_prior(0)])
    assert out["num_pos"] == 1
    # positive prior 0: CE = log 2; negatives: CE = softplus(z); the 3 hardest are z = 4, 3, 2.5
    expected = math.log(2) + sum(F.softplus(torch.tensor(v)).item() for v in (4.0, 3.0, 2.5))
    assert out["conf"].item() == pytest.approx(expected, rel=1e-6)
    out["loss"].backward()
    contributing = (conf.grad[0].abs().sum(1) > 0).nonzero().flatten().tolist()
    assert contributing == [0, 2, 4, 6]


def test_hard_negatives_per_image_and_capped():
    z = torch.arange(N, dtype=torch.float32)  # prior 9 hardest
    conf = torch.stack([torch.zeros(N), z], dim=1)[None].repeat(2, 1, 1).requires_grad_(True)
    loc, _, landm = zeros_preds(2)
    targets = [face_on_prior(9), torch.cat([face_on_prior(0), face_on_prior(1)])]
    out = MultiBoxLoss(neg_pos_ratio=2)((loc, conf, landm), ROW_PRIORS, targets)
    assert out["num_pos"] == 3
    out["loss"].backward()
    used = (conf.grad.abs().sum(2) > 0)
    # image 0: 1 face -> 2 negatives (8, 7); image 1: 2 faces -> 4 negatives (9, 8, 7, 6)
    assert used[0].nonzero().flatten().tolist() == [7, 8, 9]
    assert used[1].nonzero().flatten().tolist() == [0, 1, 6, 7, 8, 9]
    # ratio 100 with one face: min(100, N - 1) = every negative
    conf.grad = None
    out = MultiBoxLoss(neg_pos_ratio=100)((loc, conf, landm), ROW_PRIORS, [face_on_prior(3), torch.zeros(0, 15)])
    out["loss"].backward()
    assert int((conf.grad[0].abs().sum(1) > 0).sum()) == N
    assert not conf.grad[1].any()  # an image without faces mines no negatives


def test_zero_loc_and_landm_for_perfect_predictions():
    loss_fn = MultiBoxLoss()
    priors = prior_boxes((96, 128))
    targets = [
        torch.tensor([[0.1, 0.2, 0.3, 0.5, 0.15, 0.3, 0.25, 0.3, 0.2, 0.35, 0.15, 0.4, 0.25, 0.4, 1.0],
                      [0.6, 0.1, 0.9, 0.6] + [-1.0] * 10 + [-1.0]]),
        torch.tensor([[0.4, 0.4, 0.5, 0.55, 0.42, 0.45, 0.48, 0.45, 0.45, 0.5, 0.43, 0.52, 0.47, 0.52, 1.0]]),
    ]
    loc_t, conf_t, landm_t, weight_t = loss_fn.build_targets(targets, priors)
    assert (conf_t == 1).any() and (conf_t == -1).any() and (weight_t == 1).all()
    conf = torch.randn(2, priors.shape[0], 2)
    out = loss_fn((loc_t, conf, landm_t), priors, targets)
    assert out["loc"].item() == 0.0 and out["landm"].item() == 0.0
    assert out["conf"].item() > 0
    assert out["num_pos"] == int((conf_t != 0).sum())
    shifted = loss_fn((loc_t + 0.5, conf, landm_t + 0.5), priors, targets)
    # smooth-L1 of 0.5 is 0.125 per coordinate, summed per prior, averaged over positives
    assert shifted["loc"].item() == pytest.approx(4 * 0.125, rel=1e-5)
    assert shifted["landm"].item() == pytest.approx(10 * 0.125, rel=1e-5)
    assert shifted["loss"].item() == pytest.approx(2.0 * 0.5 + shifted["conf"].item() + 1.25, rel=1e-5)


def test_landmark_loss_excludes_faces_without_landmarks():
    loss_fn = MultiBoxLoss()
    targets = [torch.cat([face_on_prior(0, label=1.0), face_on_prior(3, label=-1.0)])]
    loc_t, conf_t, landm_t, _ = loss_fn.build_targets(targets, ROW_PRIORS)
    assert conf_t[0].tolist() == [1, 0, 0, -1, 0, 0, 0, 0, 0, 0]
    landm = landm_t.clone()
    landm[0, 0] += 0.5  # the face with landmarks: 10 * 0.125
    landm[0, 3] = 1e3  # garbage on the face without landmarks must not count
    loc = loc_t + 0.5  # both faces are boxes: 4 * 0.125 each
    out = loss_fn((loc, torch.zeros(1, N, 2), landm), ROW_PRIORS, targets)
    assert out["num_pos"] == 2
    assert out["loc"].item() == pytest.approx(0.5, rel=1e-6)  # (0.5 + 0.5) / 2 positives
    assert out["landm"].item() == pytest.approx(1.25, rel=1e-6)  # 1.25 / 1 face with landmarks
    # only faces without landmarks -> landmark loss 0, box loss still counted
    only_missing = [face_on_prior(3, label=-1.0)]
    out = loss_fn((loc, torch.zeros(1, N, 2), landm), ROW_PRIORS, only_missing)
    assert out["landm"].item() == 0.0 and out["loc"].item() > 0


def test_gradient_flows_to_every_output():
    priors = prior_boxes((64, 64))
    preds = tuple(torch.randn(2, priors.shape[0], k, requires_grad=True) for k in (4, 2, 10))
    targets = [torch.tensor([[0.2, 0.2, 0.6, 0.7] + [0.4] * 10 + [1.0]]), torch.zeros(0, 15)]
    out = MultiBoxLoss()(preds, priors, targets)
    assert out["loss"].requires_grad
    assert not any(out[k].requires_grad for k in ("loc", "conf", "landm"))
    assert isinstance(out["num_pos"], int) and out["num_pos"] > 0
    out["loss"].backward()
    for p in preds:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_per_box_weight_scales_the_loss():
    loss_fn = MultiBoxLoss(neg_pos_ratio=3)
    loc, conf, landm = (torch.full((1, N, 4), 0.5), torch.randn(1, N, 2), torch.full((1, N, 10), 0.5))
    faces = [(0, 1.0), (5, 1.0)]
    base = loss_fn((loc, conf, landm), ROW_PRIORS, [torch.cat([face_on_prior(i, lab) for i, lab in faces])])
    explicit = loss_fn((loc, conf, landm), ROW_PRIORS,
                       [torch.cat([face_on_prior(i, lab, 1.0) for i, lab in faces])])
    for key in ("loss", "loc", "conf", "landm"):
        assert explicit[key].item() == pytest.approx(base[key].item(), rel=1e-6)
    half = loss_fn((loc, conf, landm), ROW_PRIORS, [torch.cat([face_on_prior(i, lab, 0.5) for i, lab in faces])])
    assert half["loc"].item() == pytest.approx(0.5 * base["loc"].item(), rel=1e-6)
    assert half["landm"].item() == pytest.approx(0.5 * base["landm"].item(), rel=1e-6)
    # classification: positives weighted, mined negatives not
    ce = F.cross_entropy(conf[0], torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0]), reduction="none")
    neg_ce = ce.clone()
    neg_ce[[0, 5]] = -1
    hardest = neg_ce.topk(6).values.sum()
    assert half["conf"].item() == pytest.approx(((0.5 * (ce[0] + ce[5]) + hardest) / 2).item(), rel=1e-5)
    # mixed weights act per box
    mixed = loss_fn((loc, conf, landm), ROW_PRIORS, [torch.cat([face_on_prior(0, 1.0, 0.0), face_on_prior(5, 1.0, 1.0)])])
    assert mixed["loc"].item() == pytest.approx(0.5 * base["loc"].item(), rel=1e-6)


def test_bad_inputs_raise():
    loss_fn = MultiBoxLoss()
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        loss_fn(zeros_preds(1), ROW_PRIORS, [torch.zeros(2, 14)])
    with pytest.raises(ValueError, match="batch"):
        loss_fn(zeros_preds(2), ROW_PRIORS, [torch.zeros(0, 15)])
    with pytest.raises(ValueError, match="shape mismatch"):
        loss_fn(zeros_preds(1), ROW_PRIORS[:5], [torch.zeros(0, 15)])
    with pytest.raises(ValueError, match="num_classes"):
        MultiBoxLoss(num_classes=3)


# ------------------------------------------------------------ malformed targets
NAN, INF = float("nan"), float("inf")


def _with(row: torch.Tensor, col: int, value: float) -> torch.Tensor:
    row = row.clone()
    row[0, col] = value
    return row


@pytest.mark.parametrize("bad,what", [
    (_with(face_on_prior(5), 0, NAN), "non-finite box"),
    (_with(face_on_prior(5), 2, INF), "non-finite box"),
    (_with(face_on_prior(5), 7, NAN), "non-finite landmarks"),  # a face that has landmarks
    (_with(face_on_prior(5), 14, NAN), "label"),
    (_with(face_on_prior(5), 14, 0.0), "label"),  # would silently turn the face into background
    (_with(face_on_prior(5), 14, 0.4), "label"),
    (_with(face_on_prior(5), 14, 2.0), "label"),
    (_with(face_on_prior(5, weight=1.0), 15, NAN), "weight"),
    (_with(face_on_prior(5, weight=1.0), 15, -0.5), "weight"),  # would make the loss negative
    (torch.tensor([[0.6, 0.45, 0.5, 0.55] + [-1.0] * 10 + [-1.0]]), "x2 < x1"),
])
def test_malformed_targets_raise_naming_the_image(bad, what):
    """Bad target values used to poison training silently: a NaN box or an inverted box
    knocked other faces' priors out of the matching, a NaN landmark or weight gave a NaN
    loss with no hint where it came from, label 0 trained a face as background and a
    negative weight gave a negative loss."""
    good = face_on_prior(0, weight=1.0 if bad.shape[1] == 16 else None)
    targets = [good, torch.cat([good, bad])]
    with pytest.raises(ValueError, match=r"targets\[1\].*" + what):
        MultiBoxLoss()(zeros_preds(2), ROW_PRIORS, targets)


def test_nan_box_does_not_silently_unmatch_other_faces():
    priors = prior_boxes((64, 64))
    face = torch.tensor([[0.3, 0.3, 0.56, 0.56] + [0.4] * 10 + [1.0]])
    nan_face = torch.tensor([[NAN] * 4 + [0.4] * 10 + [1.0]])
    preds = zeros_preds(1, priors.shape[0])
    assert MultiBoxLoss()(preds, priors, [face])["num_pos"] == 3
    with pytest.raises(ValueError, match="non-finite box"):  # was: num_pos 1 and a finite loss
        MultiBoxLoss()(preds, priors, [torch.cat([face, nan_face])])


def test_ignored_landmarks_and_degenerate_boxes_are_accepted():
    # a face without landmarks may carry anything there (even NaN): its landmarks are ignored
    plain = face_on_prior(3, label=-1.0)
    nan_ldm = plain.clone()
    nan_ldm[0, 4:14] = NAN
    preds = (torch.full((1, N, 4), 0.3), torch.randn(1, N, 2), torch.full((1, N, 10), 0.3))
    a = MultiBoxLoss()(preds, ROW_PRIORS, [plain])
    b = MultiBoxLoss()(preds, ROW_PRIORS, [nan_ldm])
    assert torch.isfinite(b["loss"]) and b["loss"].item() == a["loss"].item() and b["num_pos"] == 1
    # a zero-area box (a point or a line) overlaps no prior: ignored, like RetinaFace does
    for box in ([0.3, 0.5, 0.3, 0.5], [0.3, 0.45, 0.3, 0.55]):
        point = torch.tensor([box + [-1.0] * 10 + [-1.0]])
        out = MultiBoxLoss()(preds, ROW_PRIORS, [point])
        assert out["num_pos"] == 0 and torch.isfinite(out["loss"])


def test_half_precision_and_autocast_predictions_give_a_float32_loss():
    priors = prior_boxes((64, 64))
    targets = [torch.tensor([[0.2, 0.2, 0.6, 0.7] + [0.4] * 10 + [1.0]])]
    g = torch.Generator().manual_seed(0)
    preds = tuple(torch.randn(1, priors.shape[0], k, generator=g) for k in (4, 2, 10))
    ref = MultiBoxLoss()(preds, priors, targets)
    for dtype in (torch.float16, torch.bfloat16):
        low = tuple(p.to(dtype).requires_grad_(True) for p in preds)
        out = MultiBoxLoss()(low, priors.to(dtype), targets)
        assert out["loss"].dtype == torch.float32 and out["num_pos"] == ref["num_pos"]
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-2)
        out["loss"].backward()
        assert all(torch.isfinite(p.grad).all() for p in low)
