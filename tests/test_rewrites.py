"""Deployment rewrites (utils/deploy/rewrites.py): every rewrite keeps the network's outputs
within the export parity tolerances (1e-4 scores, 1e-3 boxes/landmarks) for V1, V2, v1_slim
and the converted published v1_original, at odd sizes and batch > 1, in PyTorch and in ONNX
Runtime; the standard-op (GridSample) deformable conv agrees with DeformConv.

Random-init networks have near-zero activations (BN statistics at their defaults) and
zero-initialised offsets, which would let a wrong rewrite pass; `realistic` re-estimates the BN
statistics on real pixels, gives the deformable convs offsets of a few pixels and the BiFPN
unequal fusion weights, so every rewritten op carries signal.
"""
from __future__ import annotations

import pytest
import torch

from data.preprocess import preprocess
from models import build_model
from models.bifpn import BiFPNCell, BiFPNLightCell, normalised_fusion_weights
from models.deform_conv import DeformableConv2d
from tests.conftest import ROOT
from utils.deploy.fuse import count_batchnorms
from utils.deploy.parity import TOLERANCES
from utils.deploy.rewrites import (DEFORM_FORMS, STEM_BLOCK, DeformableSampler, deploy_model, rebuilt_conv,
                                   shuffle_permutation, zero_padded_conv)
from utils.inference.detector import OUTPUT_NAMES

cv2 = pytest.importorskip("cv2")

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = ROOT / "data" / "sample" / "images" / "group_8.jpg"
# (batch, height, width): odd map sizes at every level, a non-square batch of 2.
SHAPES = [(1, 97, 131), (2, 96, 160)]


def realistic(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-init model whose activations, offsets and fusion weights look trained."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DeformableConv2d):  # offsets of a few pixels, masks away from 1
                module.offset_conv.weight.normal_(0, 0.03)
                module.offset_conv.bias.normal_(0, 1.5)
                module.modulator_conv.weight.normal_(0, 0.03)
                module.modulator_conv.bias.normal_(0, 1.0)
            if isinstance(module, (BiFPNCell, BiFPNLightCell)):
                for w in (module.p4_w1, module.p3_w1, module.p4_w2, module.p5_w2):
                    w.uniform_(-0.2, 2.0)  # some negative: relu must zero them
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
        image = torch.nn.functional.interpolate(preprocess(cv2.imread(str(GROUP)))[None], size=(96, 128),
                                                mode="bilinear")
        model.train()
        model(torch.cat([image, image.flip(-1)]))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.clamp_(min=0.1)
        for conv in model.class_head.convs:
            conv.weight.mul_(2.0)
    return model.eval()


def inputs(shape, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    b, h, w = shape
    return torch.rand(b, 3, h, w, generator=gen) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)


def assert_within_tolerance(expected, got, label: str) -> None:
    for name, e, g in zip(OUTPUT_NAMES, expected, got):
        g = torch.as_tensor(g)
        assert g.shape == e.shape, f"{label}: {name} shape {tuple(g.shape)} != {tuple(e.shape)}"
        diff = (g - e).abs().max().item()
        assert diff <= TOLERANCES[name], f"{label}: {name} differs by {diff:.2e} > {TOLERANCES[name]:.0e}"


@pytest.fixture(scope="module")
def models():
    return {name: realistic(name, seed) for seed, name in enumerate(["v1", "v2", "v1_slim", "v1_original"])}


def test_helpers_are_exact():
    perm = shuffle_permutation(8, 2, "official")
    x = torch.arange(8.0).view(1, 8, 1, 1)
    from models.context import channel_shuffle
    assert torch.equal(channel_shuffle(x, 2, "official").view(-1), x.view(-1)[perm])
    assert normalised_fusion_weights(torch.tensor([1.0, -1.0, 3.0])).tolist()[:2] == pytest.approx([1 / 4.0001, 0.0])
    grouped = torch.nn.Conv2d(8, 16, 3, padding=1, groups=4)
    dense = rebuilt_conv(grouped, input_permutation=perm)
    assert dense.groups == 1
    torch.testing.assert_close(dense(x.expand(1, 8, 4, 4)), grouped(x.expand(1, 8, 4, 4)[:, perm]))


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("name", ["v1", "v2", "v1_slim", "v1_original"])
def test_deployed_model_matches_original(models, name, target):
    model = models[name]
    deployed = deploy_model(model, target=target)
    assert count_batchnorms(deployed) == 0
    for shape in SHAPES:
        x = inputs(shape)
        with torch.inference_mode():
            assert_within_tolerance(model(x), deployed(x), f"{name} {target} {shape}")


@pytest.mark.parametrize("form", [f for f in DEFORM_FORMS if f != "auto"])
def test_every_deformable_form_matches(models, form):
    model = models["v1"]
    deployed = deploy_model(model, target="onnx", deform=form)
    forms = {s.form for s in deployed.modules() if isinstance(s, DeformableSampler)}
    assert forms == {form}
    x = inputs((2, 97, 131), seed=1)
    with torch.inference_mode():
        assert_within_tolerance(model(x), deployed(x), form)


@pytest.mark.parametrize("name", ["v1", "v2", "v1_original"])
def test_padded_stem_is_exact(models, name):
    """--pad_stem: 16-channel stem whose extra channels are zero; outputs equal the unpadded graph's."""
    model = models[name]
    plain, padded = deploy_model(model, target="onnx"), deploy_model(model, target="onnx", stem_padded=True)
    stem, first = padded.body.stage1[0][0], padded.body.stage1[1]
    assert (stem.out_channels, first[0].groups, first[3].in_channels, first[3].out_channels) == (STEM_BLOCK, STEM_BLOCK, STEM_BLOCK, 16)
    assert not stem.weight[8:].any() and not stem.bias[8:].any() and not first[3].weight[:, 8:].any()
    for shape in [(2, 97, 131), (1, 64, 48)]:
        x = inputs(shape, seed=2)
        with torch.inference_mode():
            expected, got = model(x), padded(x)
            assert_within_tolerance(expected, got, f"{name} padded stem {shape}")
            for a, b in zip(plain(x), got):
                assert (a - b).abs().max() <= 1e-5


def test_zero_padded_conv_refuses_what_it_cannot_widen():
    with pytest.raises(ValueError, match="depthwise"):
        zero_padded_conv(torch.nn.Conv2d(8, 8, 3, groups=8), 16, 8)
    with pytest.raises(ValueError, match="dense and depthwise"):
        zero_padded_conv(torch.nn.Conv2d(8, 16, 3, groups=2), 32, 8)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    wide = zero_padded_conv(conv, 8, 4)
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(wide(x)[:, :5], conv(x[:, :3]))
        assert not wide(x)[:, 5:].any()


def test_auto_projects_only_narrowing_layers(models):
    deployed = deploy_model(models["v1"], target="onnx")
    forms = [s.form for s in deployed.context[0].samplers]
    assert forms == ["projected", "projected", "deformconv", "deformconv", "deformconv"]  # 52->26, 52->13, 13->13 x3


def test_real_weights_deployed_match(real_checkpoint):
    from utils.checkpoint import load_model

    model, _ = load_model(real_checkpoint)
    image = preprocess(cv2.imread(str(GROUP)))[None]
    for target in ("torch", "onnx"):
        deployed = deploy_model(model, target=target)
        with torch.inference_mode():
            assert_within_tolerance(model(image), deployed(image), f"v1_original published {target}")


def test_frozen_fusion_weights_are_exact_constants():
    """A BiFPN cell with frozen fusion weights computes the same maps and keeps its state dict."""
    import copy

    from models.bifpn import BiFPNCell

    torch.manual_seed(0)
    cell = BiFPNCell(16, (8, 12, 20)).eval()
    with torch.no_grad():
        for name in cell.FUSION_NAMES:
            getattr(cell, name).uniform_(-0.5, 2.0)
    feats = (torch.randn(1, 8, 20, 18), torch.randn(1, 12, 10, 9), torch.randn(1, 20, 5, 5))
    frozen = copy.deepcopy(cell)
    frozen.freeze_fusion_weights()
    assert list(frozen.state_dict()) == list(cell.state_dict())
    assert all(isinstance(v, float) for values in frozen.frozen_fusion.values() for v in values)
    with torch.no_grad():
        for a, b in zip(cell(feats), frozen(feats)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("light", [False, True])
def test_folded_fusion_weights_match(light):
    """fold_fusion_weights: the same maps from one multiply fewer per fusion node, the w0 of each node
    moved into its conv; a node whose own-level weight is clipped to 0 keeps the plain form."""
    import copy

    from models.bifpn import BiFPNCell, BiFPNLightCell

    torch.manual_seed(1)
    cell = (BiFPNLightCell(16, (8, 12, 20)) if light else BiFPNCell(16, (8, 12, 20))).eval()
    with torch.no_grad():
        for name in cell.FUSION_NAMES:
            getattr(cell, name).uniform_(0.1, 2.0)
        cell.p3_w1[0] = -0.5  # relu -> 0: p3_w1 cannot be divided by its first weight
    feats = (torch.randn(2, 8, 21, 18), torch.randn(2, 12, 11, 9), torch.randn(2, 20, 6, 5))
    folded = copy.deepcopy(cell)
    folded.fold_fusion_weights()
    folded.fold_fusion_weights()  # a second call changes nothing
    w0 = {name: folded.frozen_fusion[name][0] for name in cell.FUSION_NAMES}
    assert w0["p3_w1"] == 0.0 and all(w0[n] > 0 for n in ("p4_w1", "p4_w2", "p5_w2"))
    for name, conv_name in cell.FUSION_CONVS.items():  # first conv scaled by w0 (or left as it was)
        before = next(m for m in getattr(cell, conv_name).modules() if isinstance(m, torch.nn.Conv2d))
        after = next(m for m in getattr(folded, conv_name).modules() if isinstance(m, torch.nn.Conv2d))
        torch.testing.assert_close(after.weight, before.weight * (w0[name] if w0[name] > 0 else 1.0))
    with torch.no_grad():
        expected, got = cell(feats), folded(feats)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any(torch.equal(a, b) for a, b in zip(expected, got))  # the arithmetic did change
