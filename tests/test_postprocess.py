"""The shared decode + NMS: thresholds, NMS, top-k limits, scaling, output format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from layers.box_utils import encode, encode_landmarks
from layers.prior_box import prior_boxes
from utils.errors import FeatherFaceError
from utils.inference.postprocess import WIDER_POSTPROCESS, PostProcessConfig, detect_faces, detect_faces_batch

VAR = (0.1, 0.2)
SIZE = (100, 200)  # network input (H, W)
# 20x20 px priors: p0 at (50, 50); p1 the same shifted 2 px right (IoU 0.818 with p0);
# p2 at (150, 50); p3 at (100, 20).
PRIORS = torch.tensor([[0.25, 0.5, 0.1, 0.2], [0.26, 0.5, 0.1, 0.2], [0.75, 0.5, 0.1, 0.2], [0.5, 0.2, 0.1, 0.2]])
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.01])


def outputs(scores=SCORES, n=4):
    conf = torch.stack([1 - scores, scores], dim=1)
    return torch.zeros(n, 4), conf, torch.zeros(n, 10)


def run(**kwargs):
    loc, conf, landm = outputs()
    return detect_faces(loc, conf, landm, PRIORS, VAR, SIZE, **kwargs)


def test_nms_removes_duplicate_and_low_scores():
    dets = run()
    assert dets.dtype == np.float32 and dets.shape == (2, 15)
    expected = np.array([[40, 40, 60, 60, 0.9] + [50, 50] * 5,
                         [140, 40, 160, 60, 0.7] + [150, 50] * 5], dtype=np.float32)
    np.testing.assert_allclose(dets, expected, rtol=0, atol=1e-4)


def test_thresholds():
    dets = run(conf_threshold=0.005)  # p3 (score 0.01) now passes
    assert dets.shape == (3, 15)
    assert list(dets[:, 4]) == sorted(dets[:, 4], reverse=True)
    np.testing.assert_allclose(dets[-1, :5], [90, 10, 110, 30, 0.01], atol=1e-4)
    assert run(nms_threshold=0.9).shape == (3, 15)  # IoU 0.818 < 0.9: duplicate kept
    assert run(conf_threshold=0.75).shape == (1, 15)


def test_keep_top_k_and_top_k():
    dets = run(keep_top_k=1)
    assert dets.shape == (1, 15) and dets[0, 4] == pytest.approx(0.9)
    # top_k cuts before NMS: p0 and p1 survive the cut, then NMS removes p1
    assert run(top_k=2).shape == (1, 15)
    assert run(top_k=3).shape == (2, 15)


@pytest.mark.parametrize("field, value", [("conf_threshold", 2.0), ("conf_threshold", -1.0),
                                          ("conf_threshold", float("nan")), ("nms_threshold", -1.0),
                                          ("nms_threshold", 5.0), ("nms_threshold", float("inf")),
                                          ("top_k", -5), ("keep_top_k", -1), ("keep_top_k", 2.5),
                                          ("top_k", True)])
def test_settings_out_of_range_are_refused(field, value):
    """A negative keep_top_k used to slice [:-1] (one face lost), top_k -5 ended in a torch
    RuntimeError, a NaN conf silently found nothing: PostProcessConfig and detect_faces refuse them."""
    with pytest.raises(FeatherFaceError, match=f"^{field} must be"):
        PostProcessConfig(**{field: value})
    with pytest.raises(FeatherFaceError, match=f"^{field} must be"):
        run(**{field: value})


def test_top_k_0_means_no_limit_as_in_the_evaluation_scripts():
    """test_widerface.py's --top_k 0 / --keep_top_k 0 mean "all boxes"; the API used to return none."""
    assert PostProcessConfig(top_k=0, keep_top_k=0) == PostProcessConfig(top_k=None, keep_top_k=None)
    np.testing.assert_array_equal(run(top_k=0, keep_top_k=0), run(top_k=None, keep_top_k=None))
    assert run(top_k=0, keep_top_k=0).shape == (2, 15)
    assert PostProcessConfig(conf_threshold=0, nms_threshold=1).conf_threshold == 0  # the ends are fine
    assert WIDER_POSTPROCESS.top_k is None and PostProcessConfig(top_k=np.int64(3)).top_k == 3


def test_scale_divides_coordinates():
    base = run()
    halved = run(scale=2.0)
    np.testing.assert_allclose(halved[:, :4], base[:, :4] / 2, rtol=1e-6)
    np.testing.assert_allclose(halved[:, 5:], base[:, 5:] / 2, rtol=1e-6)
    np.testing.assert_array_equal(halved[:, 4], base[:, 4])
    aniso = run(scale=(2.0, 4.0))
    np.testing.assert_allclose(aniso[:, [0, 2]], base[:, [0, 2]] / 2, rtol=1e-6)
    np.testing.assert_allclose(aniso[:, [1, 3]], base[:, [1, 3]] / 4, rtol=1e-6)
    np.testing.assert_allclose(aniso[:, 5::2], base[:, 5::2] / 2, rtol=1e-6)
    np.testing.assert_allclose(aniso[:, 6::2], base[:, 6::2] / 4, rtol=1e-6)


def test_empty_results():
    for n in (0, 4):
        scores = torch.zeros(n)
        dets = detect_faces(*outputs(scores, n), PRIORS[:n], VAR, SIZE)
        assert dets.shape == (0, 15) and dets.dtype == np.float32


def test_decodes_encoded_faces_in_pixels():
    """A face encoded on real priors comes back at its pixel coordinates."""
    h, w = 64, 96
    priors = prior_boxes((h, w))
    n = priors.shape[0]
    face_px = torch.tensor([30.0, 12.0, 54.0, 40.0])
    ldm_px = torch.tensor([36.0, 20.0, 48.0, 20.0, 42.0, 27.0, 37.0, 33.0, 47.0, 33.0])
    norm = torch.tensor([w, h] * 5, dtype=torch.float32)
    loc = encode((face_px / norm[:4]).expand(n, 4), priors, VAR)
    landm = encode_landmarks((ldm_px / norm).expand(n, 10), priors, VAR)
    scores = torch.zeros(n)
    scores[123] = 0.95
    dets = detect_faces(loc, torch.stack([1 - scores, scores], 1), landm, priors, VAR, (h, w), scale=0.5)
    assert dets.shape == (1, 15)
    np.testing.assert_allclose(dets[0, :4], (face_px * 2).numpy(), atol=1e-3)
    np.testing.assert_allclose(dets[0, 5:], (ldm_px * 2).numpy(), atol=1e-3)


def test_numpy_and_batched_inputs():
    loc, conf, landm = outputs()
    ref = run()
    np.testing.assert_array_equal(detect_faces(loc.numpy(), conf.numpy(), landm.numpy(), PRIORS.numpy(), VAR, SIZE), ref)
    np.testing.assert_array_equal(detect_faces(loc[None], conf[None], landm[None], PRIORS, VAR, SIZE), ref)
    conf2 = conf.clone()
    conf2[:, 1] = torch.tensor([0.1, 0.1, 0.9, 0.3])
    conf2[:, 0] = 1 - conf2[:, 1]
    batch = detect_faces_batch(torch.stack([loc, loc]), torch.stack([conf, conf2]), torch.stack([landm, landm]),
                               PRIORS, VAR, SIZE, scale=[1.0, 2.0])
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_array_equal(batch[0], ref)
    np.testing.assert_array_equal(batch[1], detect_faces(loc, conf2, landm, PRIORS, VAR, SIZE, scale=2.0))
    assert batch[1].shape == (3, 15)  # p0 and p1 tie at 0.1 and overlap: one survives
    assert [d.shape for d in detect_faces_batch(torch.stack([loc, loc]), torch.stack([conf, conf2]),
                                                torch.stack([landm, landm]), PRIORS, VAR, SIZE)] == [(2, 15), (3, 15)]


def test_bad_inputs_raise():
    loc, conf, landm = outputs()
    with pytest.raises(ValueError, match="detect_faces expects"):
        detect_faces(loc[:3], conf, landm, PRIORS, VAR, SIZE)
    with pytest.raises(ValueError, match="batch"):
        detect_faces(torch.stack([loc, loc]), torch.stack([conf, conf]), torch.stack([landm, landm]), PRIORS, VAR, SIZE)
    with pytest.raises(ValueError, match="scales"):
        detect_faces_batch(loc[None], conf[None], landm[None], PRIORS, VAR, SIZE, scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="scale"):
        run(scale=0.0)
