"""Prior boxes (counts, goldens, head order) and box encode/decode/match."""
from __future__ import annotations

import math

import pytest
import torch

from data.config import get_config
from layers.box_utils import (assign_priors, center_size, decode, decode_landmarks, encode, encode_landmarks,
                              match, point_form)
from layers.prior_box import cached_prior_boxes, num_priors, prior_boxes, prior_boxes_for

VAR = (0.1, 0.2)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)


# ----------------------------------------------------------------------------- priors
@pytest.mark.parametrize("size,count", [
    ((640, 640), 16_800), ((320, 320), 4_200), ((416, 416), 7_098), ((832, 832), 28_392),
    ((1024, 1024), 43_008), ((480, 640), 12_600), ((500, 375), 7_842),
])
def test_prior_counts(size, count):
    priors = prior_boxes(size)
    assert priors.shape == (count, 4)
    assert priors.dtype == torch.float32
    assert num_priors(size) == count


def test_goldens_640():
    p = prior_boxes((640, 640))
    # level 8, row 0, col 0, sizes 16 and 32; then col 1
    torch.testing.assert_close(p[0], torch.tensor([4 / 640, 4 / 640, 16 / 640, 16 / 640]))
    torch.testing.assert_close(p[0], torch.tensor([0.00625, 0.00625, 0.025, 0.025]))
    torch.testing.assert_close(p[1], torch.tensor([0.00625, 0.00625, 0.05, 0.05]))
    torch.testing.assert_close(p[2], torch.tensor([0.01875, 0.00625, 0.025, 0.025]))
    # first prior of row 1 at stride 8 (80 columns x 2 anchors per row)
    torch.testing.assert_close(p[160], torch.tensor([0.00625, 0.01875, 0.025, 0.025]))
    # first prior of stride 16 comes after 80*80*2 = 12,800 stride-8 priors
    torch.testing.assert_close(p[12_800], torch.tensor([0.0125, 0.0125, 0.1, 0.1]))
    # first prior of stride 32 after 12,800 + 40*40*2 = 16,000
    torch.testing.assert_close(p[16_000], torch.tensor([0.025, 0.025, 0.4, 0.4]))
    # last: stride 32, row 19, col 19, size 512: centre 19.5*32 = 624 px
    torch.testing.assert_close(p[-1], torch.tensor([0.975, 0.975, 0.8, 0.8]))
    torch.testing.assert_close(p[-2], torch.tensor([0.975, 0.975, 0.4, 0.4]))


def test_goldens_odd_size():
    # H=500, W=375: grids 63x47, 32x24, 16x12 -> (2961 + 768 + 192) * 2 = 7842 priors
    p = prior_boxes((500, 375))
    torch.testing.assert_close(p[0], torch.tensor([4 / 375, 4 / 500, 16 / 375, 16 / 500]))
    torch.testing.assert_close(p[0], torch.tensor([0.0106667, 0.008, 0.0426667, 0.032]), rtol=0, atol=1e-6)
    # last stride-8 prior: row 62, col 46, size 32 -> centre (372, 500) px, beyond the image
    torch.testing.assert_close(p[2 * 2961 - 1], torch.tensor([372 / 375, 500 / 500, 32 / 375, 32 / 500]))
    # last prior: stride 32, row 15, col 11, size 512 -> centre (368, 496) px
    torch.testing.assert_close(p[-1], torch.tensor([0.9813333, 0.992, 1.3653333, 1.024]), rtol=0, atol=1e-6)


def _loop_priors(h, w):
    """Direct transcription of the loop order in docs/ARCHITECTURE.md §1.2, for comparison."""
    out = []
    for s, sizes in zip(STEPS, MIN_SIZES):
        for i in range(math.ceil(h / s)):
            for j in range(math.ceil(w / s)):
                for m in sizes:
                    out.append([(j + 0.5) * s / w, (i + 0.5) * s / h, m / w, m / h])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("size", [(100, 75), (64, 64), (33, 97)])
def test_matches_loop_order_exactly(size):
    assert torch.equal(prior_boxes(size), _loop_priors(*size))


def test_clip_and_bad_input():
    p = prior_boxes((64, 64), clip=True)
    assert p.min() >= 0 and p.max() <= 1
    assert prior_boxes((64, 64)).max() > 1  # 256/64 without clipping
    with pytest.raises(ValueError, match="image_size"):
        prior_boxes((0, 64))
    with pytest.raises(ValueError, match="levels"):
        prior_boxes((64, 64), min_sizes=((16, 32),), steps=(8, 16))


def test_num_priors_rejects_mismatched_levels_like_prior_boxes():
    # zip() used to drop the extra level silently: 2 levels counted for a 3-step config
    with pytest.raises(ValueError, match="levels"):
        num_priors((64, 64), min_sizes=((16, 32), (64, 128)), steps=(8, 16, 32))
    assert num_priors((64, 64), MIN_SIZES, STEPS) == prior_boxes((64, 64), MIN_SIZES, STEPS).shape[0]


def test_cache_returns_independent_copies():
    a = cached_prior_boxes((96, 128))
    a.zero_()
    b = cached_prior_boxes((96, 128))
    assert torch.equal(b, prior_boxes((96, 128)))
    cfg = get_config("v2")
    assert torch.equal(prior_boxes_for(cfg, (96, 128)), b)


def test_head_flattening_order_matches_priors():
    """Channels of a fake (B, A*k, H, W) head encode (col, row, anchor); after the heads'
    permute/reshape and level concat, row n must describe prior n."""
    h, w, a = 72, 104, 2  # not multiples of 32
    priors = prior_boxes((h, w))
    flat = []
    for level, s in enumerate(STEPS):
        fh, fw = math.ceil(h / s), math.ceil(w / s)
        rows = torch.arange(fh, dtype=torch.float32)[:, None].expand(fh, fw)
        cols = torch.arange(fw, dtype=torch.float32)[None, :].expand(fh, fw)
        chans = []
        for anchor in range(a):
            chans += [cols, rows, torch.full((fh, fw), float(MIN_SIZES[level][anchor])), torch.full((fh, fw), float(s))]
        head = torch.stack(chans)[None]  # (1, A*4, fh, fw), channel = anchor*4 + k
        flat.append(head.permute(0, 2, 3, 1).reshape(1, -1, 4))
    flat = torch.cat(flat, dim=1)[0]
    assert flat.shape[0] == priors.shape[0]
    col, row, size, step = flat.unbind(1)
    torch.testing.assert_close(priors[:, 0], (col + 0.5) * step / w)
    torch.testing.assert_close(priors[:, 1], (row + 0.5) * step / h)
    torch.testing.assert_close(priors[:, 2], size / w)
    torch.testing.assert_close(priors[:, 3], size / h)


def test_head_regression_decodes_at_its_cell():
    """A box regression written at (level 1, row 2, col 3, anchor 1) of an NCHW head map
    decodes, after flattening, to a box around that cell's centre shifted by the offset."""
    h = w = 128
    a, k = 2, 4
    maps = [torch.zeros(1, a * k, math.ceil(h / s), math.ceil(w / s)) for s in STEPS]
    level, row, col, anchor, dx_px = 1, 2, 3, 1, 6.4
    m = MIN_SIZES[level][anchor]
    maps[level][0, anchor * k + 0, row, col] = dx_px / (VAR[0] * m)  # x shift in units of 0.1*w
    maps[level][0, anchor * k + 3, row, col] = math.log(2.0) / VAR[1]  # double the height
    loc = torch.cat([t.permute(0, 2, 3, 1).reshape(1, -1, k) for t in maps], dim=1)
    boxes = decode(loc, prior_boxes((h, w)), VAR)[0] * torch.tensor([w, h, w, h])
    cx, cy = (col + 0.5) * STEPS[level] + dx_px, (row + 0.5) * STEPS[level]
    expected = torch.tensor([cx - m / 2, cy - m, cx + m / 2, cy + m])
    hit = torch.isclose(boxes, expected[None], atol=1e-3).all(1).nonzero().flatten()
    n0 = 2 * 16 * 16  # stride-8 priors at 128x128
    assert hit.tolist() == [n0 + (row * 8 + col) * a + anchor]
    # everything else decodes to its own prior
    others = torch.ones(boxes.shape[0], dtype=torch.bool)
    others[hit] = False
    torch.testing.assert_close(boxes[others], point_form(prior_boxes((h, w)))[others] * torch.tensor([w, h, w, h]))


# ------------------------------------------------------------------- encode / decode
def test_point_form_center_size_inverse():
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.1, 0.9, 0.05, 0.3]])
    torch.testing.assert_close(point_form(boxes), torch.tensor([[0.4, 0.35, 0.6, 0.45], [0.075, 0.75, 0.125, 1.05]]))
    torch.testing.assert_close(center_size(point_form(boxes)), boxes)


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    priors = prior_boxes((64, 96))
    n = priors.shape[0]
    xy = torch.rand(n, 2, generator=g) * 0.8
    wh = torch.rand(n, 2, generator=g) * 0.5 + 0.01
    boxes = torch.cat([xy, xy + wh], dim=1)
    t = encode(boxes, priors, VAR)
    torch.testing.assert_close(decode(t, priors, VAR), boxes, rtol=0, atol=1e-5)
    # leading batch dimension against (N, 4) priors
    tb = torch.stack([t, t * 0.5])
    out = decode(tb, priors, VAR)
    assert out.shape == (2, n, 4)
    torch.testing.assert_close(out[0], boxes, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], decode(t * 0.5, priors, VAR))

    ldm = torch.rand(n, 10, generator=g)
    tl = encode_landmarks(ldm, priors, VAR)
    torch.testing.assert_close(decode_landmarks(tl, priors, VAR), ldm, rtol=0, atol=1e-5)
    torch.testing.assert_close(decode_landmarks(tl[None], priors, VAR)[0], ldm, rtol=0, atol=1e-5)


def test_decode_formula_golden():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.1]])
    loc = torch.tensor([[1.0, -2.0, 0.0, math.log(2) / 0.2]])
    # centre (0.5 + 1*0.1*0.2, 0.5 - 2*0.1*0.1) = (0.52, 0.48); size (0.2, 0.2)
    torch.testing.assert_close(decode(loc, prior, VAR), torch.tensor([[0.42, 0.38, 0.62, 0.58]]))
    ldm = torch.tensor([[1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 5.0, -5.0]])
    expected = torch.tensor([[0.52, 0.51, 0.48, 0.5, 0.5, 0.5, 0.5, 0.52, 0.6, 0.45]])
    torch.testing.assert_close(decode_landmarks(ldm, prior, VAR), expected)


# ----------------------------------------------------------------------------- match
def _cxcywh(x1, y1, x2, y2):
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


PRIORS = torch.tensor([
    _cxcywh(0.1, 0.1, 0.3, 0.3),     # 0: IoU 1 with face A
    _cxcywh(0.15, 0.15, 0.35, 0.35),  # 1: IoU 0.391 with A -> positive by threshold
    _cxcywh(0.2, 0.2, 0.4, 0.4),     # 2: IoU 0.143 with A -> background
    _cxcywh(0.6, 0.6, 0.75, 0.75),   # 3: IoU 0.25 with B, B's best -> forced positive
    _cxcywh(0.0, 0.8, 0.1, 0.9),     # 4: overlaps nothing
    _cxcywh(0.9, 0.0, 1.0, 0.1),     # 5: IoU 0.04 with tiny face C -> C is ignored
])
TRUTHS = torch.tensor([
    [0.1, 0.1, 0.3, 0.3],      # A, with landmarks
    [0.6, 0.6, 0.9, 0.9],      # B, without landmarks (label -1)
    [0.95, 0.0, 0.97, 0.02],   # C, best IoU 0.04 < 0.2
])
LABELS = torch.tensor([1.0, -1.0, 1.0])
LANDMARKS = torch.tensor([
    [0.15, 0.15, 0.25, 0.15, 0.2, 0.2, 0.15, 0.25, 0.25, 0.25],
    [-1.0] * 10,
    [0.96, 0.01] * 5,
])


def test_match_golden():
    loc_t, conf_t, landm_t, _ = match(0.35, TRUTHS, PRIORS, VAR, LABELS, LANDMARKS)
    assert conf_t.dtype == torch.long
    assert conf_t.tolist() == [1, 1, 0, -1, 0, 0]
    torch.testing.assert_close(loc_t[0], torch.zeros(4))
    # A centre 0.2 vs prior 1 centre 0.25, width 0.2: (0.2-0.25)/(0.1*0.2) = -2.5; same size -> 0
    torch.testing.assert_close(loc_t[1], torch.tensor([-2.5, -2.5, 0.0, 0.0]))
    # B (centre 0.75, side 0.3) against prior 3 (centre 0.675, side 0.15)
    torch.testing.assert_close(loc_t[3], torch.tensor([5.0, 5.0, math.log(2) / 0.2, math.log(2) / 0.2]))
    torch.testing.assert_close(landm_t[0], torch.tensor([-2.5, -2.5, 2.5, -2.5, 0, 0, -2.5, 2.5, 2.5, 2.5]))


def test_match_forced_best_prior_beats_higher_iou_face():
    priors = torch.tensor([_cxcywh(0, 0, 0.3, 0.3), _cxcywh(0, 0, 0.4, 0.4)])
    truths = torch.tensor([[0, 0, 0.4, 0.4], [0, 0, 0.2, 0.2]])
    # prior 0: IoU 0.5625 with face 0 but 0.444 with face 1, whose best prior it is
    _, conf_t, _, _ = match(0.35, truths, priors, VAR, torch.tensor([1.0, -1.0]), torch.zeros(2, 10))
    assert conf_t.tolist() == [-1, 1]
    idx, fg = assign_priors(0.35, truths, priors)
    assert idx.tolist() == [1, 0] and fg.tolist() == [True, True]


def test_match_shared_best_prior_later_face_wins():
    priors = torch.tensor([_cxcywh(0, 0, 0.2, 0.2), _cxcywh(0.5, 0.5, 0.9, 0.9)])
    truths = torch.tensor([[0, 0, 0.2, 0.2], [0, 0, 0.21, 0.2]])
    idx, fg = assign_priors(0.35, truths, priors)
    assert idx.tolist()[0] == 1 and fg.tolist() == [True, False]


def test_match_all_faces_ignored_or_absent():
    loc_t, conf_t, landm_t, _ = match(0.35, TRUTHS[2:], PRIORS, VAR, LABELS[2:], LANDMARKS[2:])
    assert conf_t.tolist() == [0] * 6
    assert not loc_t.any() and not landm_t.any()
    loc_t, conf_t, landm_t, _ = match(0.35, torch.zeros(0, 4), PRIORS, VAR, torch.zeros(0), torch.zeros(0, 10))
    assert conf_t.tolist() == [0] * 6 and loc_t.shape == (6, 4) and landm_t.shape == (6, 10)
    with pytest.raises(ValueError, match="labels"):
        match(0.35, TRUTHS, PRIORS, VAR, LABELS[:2], LANDMARKS)


def test_match_threshold_is_respected():
    # raising the threshold above prior 1's IoU (0.391) turns it into background
    _, conf_t, _, _ = match(0.4, TRUTHS, PRIORS, VAR, LABELS, LANDMARKS)
    assert conf_t.tolist() == [1, 0, 0, -1, 0, 0]


def test_match_weights_apply_to_foreground_priors_only():
    weights = torch.linspace(0.25, 1.0, TRUTHS.shape[0])
    loc_t, conf_t, landm_t, weight_t = match(0.35, TRUTHS, PRIORS, VAR, LABELS, LANDMARKS, weights)
    plain = match(0.35, TRUTHS, PRIORS, VAR, LABELS, LANDMARKS)
    for a, b in zip((loc_t, conf_t, landm_t), plain[:3]):
        assert torch.equal(a, b)
    assert torch.all(plain[3] == 1)
    fg = conf_t != 0
    assert torch.all(weight_t[~fg] == 1)
    assert set(weight_t[fg].tolist()) <= set(weights.tolist()) and weight_t[fg].min() < 1
    with pytest.raises(ValueError):
        match(0.35, TRUTHS, PRIORS, VAR, LABELS, LANDMARKS, weights[:1])
