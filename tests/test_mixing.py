"""Detection MixUp / CutMix: boxes, landmarks and weights stay consistent with the pixels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.mixing import add_weight_column, cut_paste_targets, cutmix, mixup, random_partners

H = W = 64


def _target(box, weight=None, label=1.0, landmarks=None):
    """One (16,) or (15,) row; landmarks default to 5 points spread inside the box."""
    x1, y1, x2, y2 = box
    if landmarks is None:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        landmarks = [cx - w / 4, cy - h / 4, cx + w / 4, cy - h / 4, cx, cy, cx - w / 4, cy + h / 4, cx + w / 4, cy + h / 4]
    row = list(box) + list(landmarks) + [label]
    if weight is not None:
        row.append(weight)
    return row


def _pixel_box(box):
    x1, y1, x2, y2 = (int(round(v * n)) for v, n in zip(box, (W, H, W, H)))
    return slice(y1, y2), slice(x1, x2)


def test_random_partners_is_a_derangement():
    rng = np.random.default_rng(0)
    for b in (2, 3, 8):
        p = random_partners(b, rng)
        assert sorted(p.tolist()) == list(range(b))
        assert all(p[i] != i for i in range(b))
    assert random_partners(1, rng).tolist() == [0]


# ---------------------------------------------------------------- MixUp

# one box per image at distinct, non-overlapping places; the box is painted with value v_i
MIX_BOXES = [(0.0, 0.0, 0.25, 0.25), (0.5, 0.0, 0.75, 0.25), (0.0, 0.5, 0.25, 0.75), (0.5, 0.5, 0.75, 0.75)]
MIX_VALUES = [10.0, 20.0, 40.0, 80.0]


def _mix_batch():
    images = torch.zeros(4, 3, H, W)
    targets = []
    for i, (box, v) in enumerate(zip(MIX_BOXES, MIX_VALUES)):
        ys, xs = _pixel_box(box)
        images[i, :, ys, xs] = v
        targets.append(torch.tensor([_target(box)]))
    return images, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_pixels_boxes_and_weights_agree(seed):
    images, targets = _mix_batch()
    before = images.clone()
    out, out_targets = mixup(images, targets, alpha=0.4, rng=np.random.default_rng(seed))
    assert torch.equal(images, before)  # input untouched
    partners_seen = []
    for i, t in enumerate(out_targets):
        assert t.shape == (2, 16)
        own, other = t[0], t[1]
        lam = own[15].item()
        assert 0.5 <= lam <= 1.0
        assert own[15].item() + other[15].item() == pytest.approx(1.0)
        assert torch.equal(own[:15], targets[i][0])  # the primary's box and landmarks unchanged
        j = next(k for k, b in enumerate(MIX_BOXES) if torch.allclose(other[:4], torch.tensor(b)))
        assert j != i
        assert torch.equal(other[:15], targets[j][0])
        partners_seen.append(j)
        # the pixels inside each output box are the source's colour times that box's weight
        for row, src in ((own, i), (other, j)):
            ys, xs = _pixel_box(row[:4].tolist())
            expected = torch.full_like(out[i, :, ys, xs], row[15].item() * MIX_VALUES[src])
            assert torch.allclose(out[i, :, ys, xs], expected, rtol=0, atol=1e-4)
        # and the background (inside neither box) is still 0
        covered = torch.zeros(H, W, dtype=torch.bool)
        for row in (own, other):
            covered[_pixel_box(row[:4].tolist())] = True
        assert out[i][:, ~covered].abs().max() == 0
    assert sorted(partners_seen) == [0, 1, 2, 3]  # every image is a partner exactly once


def test_mixup_multiplies_existing_weights_and_is_reproducible():
    images, targets = _mix_batch()
    weighted = add_weight_column(targets)
    for t in weighted:
        t[:, 15] = 0.5
    a_img, a_t = mixup(images, weighted, rng=np.random.default_rng(7))
    b_img, b_t = mixup(images, weighted, rng=np.random.default_rng(7))
    assert torch.equal(a_img, b_img) and all(torch.equal(x, y) for x, y in zip(a_t, b_t))
    for t in a_t:
        assert t[:, 15].sum().item() == pytest.approx(0.5)


def test_mixup_single_image_and_bad_input():
    images, targets = _mix_batch()
    out, t = mixup(images[:1], targets[:1], rng=np.random.default_rng(0))
    assert torch.equal(out, images[:1]) and t[0].shape == (1, 16) and t[0][0, 15] == 1
    with pytest.raises(ValueError, match="target tensors"):
        mixup(images, targets[:3])
    with pytest.raises(ValueError, match=r"\(K, 15\)"):
        mixup(images, [t[:, :14] for t in targets])


# ---------------------------------------------------------------- CutMix rules, exact

REGION = (0.25, 0.25, 0.75, 0.75)


def test_cut_paste_rules_for_primary_boxes():
    primary = torch.tensor([
        _target((0.0, 0.0, 0.125, 0.125)),  # outside: kept with landmarks
        _target((0.5, 0.5, 0.625, 0.625)),  # inside: dropped
        _target((0.0, 0.375, 0.5, 0.5)),  # exactly 50% outside: kept; nose (0.25,.4375) on the border, mouth inside
        _target((0.0, 0.375, 0.375, 0.5), landmarks=[0.1, 0.4] * 5),  # 2/3 outside, landmarks outside: kept
        _target((0.125, 0.375, 0.5, 0.5)),  # 1/3 outside: dropped
    ])
    out = cut_paste_targets(primary, torch.zeros(0, 15), REGION)
    assert out.shape == (3, 16)
    assert torch.equal(out[:, :4], primary[[0, 2, 3], :4])  # primary boxes keep their coordinates
    assert torch.equal(out[0, 4:15], primary[0, 4:15])
    assert torch.all(out[1, 4:14] == -1) and out[1, 14] == -1  # a landmark under the patch
    assert torch.equal(out[2, 4:15], primary[3, 4:15])
    assert torch.all(out[:, 15] == 1)


def test_cut_paste_rules_for_partner_boxes():
    partner = torch.tensor([
        _target((0.375, 0.375, 0.625, 0.625), weight=0.7),  # inside: kept as is, weight kept
        _target((0.5, 0.5, 0.875, 0.875), weight=1.0),  # 44% inside: dropped
        # 75% inside: kept, clipped; its left eye (x 0.2) lies outside the patch
        _target((0.125, 0.375, 0.625, 0.5), weight=1.0, landmarks=[0.2, 0.4, 0.5, 0.4, 0.4, 0.45, 0.3, 0.48, 0.5, 0.48]),
        _target((0.3, 0.3, 0.7, 0.7), weight=1.0, label=-1.0, landmarks=[-1.0] * 10),  # no landmarks stays so
        _target((0.0, 0.0, 0.125, 0.125), weight=1.0),  # outside: dropped
    ])
    out = cut_paste_targets(torch.zeros(0, 16), partner, REGION)
    assert out.shape == (3, 16)
    assert torch.equal(out[0], partner[0])
    assert torch.allclose(out[1, :4], torch.tensor([0.25, 0.375, 0.625, 0.5]))
    assert torch.all(out[1, 4:14] == -1) and out[1, 14] == -1
    assert torch.equal(out[2], partner[3])
    assert out[:, 15].tolist() == pytest.approx([0.7, 1.0, 1.0])


def test_cut_paste_region_validation():
    with pytest.raises(ValueError, match="region"):
        cut_paste_targets(torch.zeros(0, 15), torch.zeros(0, 15), (0.5, 0.5, 0.25, 0.75))


# ---------------------------------------------------------------- CutMix against pixels


def _cutmix_batch(rng):
    """4 images: background i+1, faces painted 50+i, box weights tagging (image, box)."""
    images = torch.empty(4, 3, H, W)
    targets = []
    for i in range(4):
        images[i] = i + 1
        rows = []
        for k in range(6):
            w, h = rng.integers(6, 24, size=2)
            x, y = rng.integers(0, W - w), rng.integers(0, H - h)
            box = (x / W, y / H, (x + w) / W, (y + h) / H)
            images[i][(slice(None),) + _pixel_box(box)] = 50 + i
            rows.append(_target(box, weight=1 + i / 10 + k / 100, label=1.0 if k % 3 else -1.0,
                                landmarks=None if k % 3 else [-1.0] * 10))
        targets.append(torch.tensor(rows))
    return images, targets


def _inside_fraction(mask, box):
    ys, xs = _pixel_box(box)
    return mask[ys, xs].float().mean().item()


def test_cutmix_boxes_follow_the_pixels():
    kept_primary = dropped_primary = kept_partner = dropped_landmarks = 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        images, targets = _cutmix_batch(rng)
        out, out_targets = cutmix(images, targets, prob=1.0, rng=rng)
        for i in range(4):
            pasted = (out[i] != images[i]).any(0)  # every image has its own pixel values
            assert pasted.any()
            rows, cols = pasted.nonzero(as_tuple=True)
            y0, y1, x0, x1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
            assert pasted[y0:y1, x0:x1].all() and pasted.sum() == (y1 - y0) * (x1 - x0)  # one rectangle
            j = int(out[i, 0, y0, x0].item()) - 1 if out[i, 0, y0, x0] < 50 else int(out[i, 0, y0, x0].item()) - 50
            assert j != i and torch.equal(out[i][:, pasted], images[j][:, pasted])
            assert torch.equal(out[i][:, ~pasted], images[i][:, ~pasted])
            region = [x0 / W, y0 / H, x1 / W, y1 / H]

            result = {round(r[15].item(), 4): r for r in out_targets[i]}
            for src, is_primary in ((i, True), (j, False)):
                for k, row in enumerate(targets[src]):
                    tag = round(1 + src / 10 + k / 100, 4)
                    frac_in = _inside_fraction(pasted, row[:4].tolist())
                    if is_primary:
                        if 1 - frac_in >= 0.5:
                            kept_primary += 1
                            got = result.pop(tag)
                            assert torch.equal(got[:4], row[:4])
                            pts = row[4:14].view(5, 2)
                            under = ((pts[:, 0] > region[0]) & (pts[:, 0] < region[2]) & (pts[:, 1] > region[1]) & (pts[:, 1] < region[3])).any()
                            if row[14] > 0 and not under:
                                assert torch.equal(got[4:15], row[4:15])
                            else:
                                dropped_landmarks += int(row[14] > 0)
                                assert torch.all(got[4:14] == -1) and got[14] == -1
                        else:
                            dropped_primary += 1
                            assert tag not in result
                    else:
                        if frac_in >= 0.5:
                            kept_partner += 1
                            got = result.pop(tag)
                            # every pixel of the clipped box comes from the partner
                            ys, xs = _pixel_box(got[:4].tolist())
                            assert pasted[ys, xs].all()
                            assert torch.equal(out[i][:, ys, xs], images[j][:, ys, xs])
                            x1_, y1_, x2_, y2_ = row[:4].tolist()
                            clipped = [max(x1_, region[0]), max(y1_, region[1]), min(x2_, region[2]), min(y2_, region[3])]
                            assert got[:4].tolist() == pytest.approx(clipped)
                            pts = row[4:14].view(5, 2)
                            within = ((pts[:, 0] >= region[0]) & (pts[:, 0] <= region[2]) & (pts[:, 1] >= region[1]) & (pts[:, 1] <= region[3])).all()
                            if row[14] > 0 and within:
                                assert torch.equal(got[4:14], row[4:14])
                            else:
                                assert torch.all(got[4:14] == -1) and got[14] == -1
                        else:
                            assert tag not in result
            assert not result  # nothing else appeared
    # the seeds exercise every branch
    assert kept_primary and dropped_primary and kept_partner and dropped_landmarks


def test_cutmix_probability_zero_and_reproducibility():
    images, targets = _cutmix_batch(np.random.default_rng(0))
    out, t = cutmix(images, targets, prob=0.0, rng=np.random.default_rng(1))
    assert torch.equal(out, images)
    assert all(torch.equal(a, b) for a, b in zip(t, targets))
    a = cutmix(images, targets, prob=0.5, rng=np.random.default_rng(3))
    b = cutmix(images, targets, prob=0.5, rng=np.random.default_rng(3))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_mixup_then_cutmix_chain():
    images, targets = _mix_batch()
    rng = np.random.default_rng(5)
    images, targets = mixup(images, targets, rng=rng)
    images, targets = cutmix(images, targets, prob=1.0, rng=rng)
    assert all(t.shape[1] == 16 and torch.all((t[:, 15] > 0) & (t[:, 15] <= 1)) for t in targets)
