"""Eval-mode batch-norm folding (models/folding.py): same outputs as conv -> BN, fewer passes."""
import pytest
import torch
from torch import nn

import models.folding as folding
from models.deform_conv import DeformableConv2d
from models.featherface import build_model
from models.folding import ConvBNSequential, conv_bn_forward, fold_bn
from tests.conftest import randomise


@pytest.mark.parametrize("name", ["v1", "v1_original", "v1_slim", "v2"])
def test_folded_eval_forward_equals_conv_then_bn(name, monkeypatch):
    model = randomise(build_model(name))
    x = torch.randn(2, 3, 161, 223)
    decisions = []
    real = folding.folds_at_call

    def spy(bn, inp):
        decisions.append(real(bn, inp))
        return decisions[-1]

    monkeypatch.setattr(folding, "folds_at_call", spy)
    with torch.no_grad():
        folded = model(x)
        assert any(decisions) and not all(decisions)  # big maps fold, small ones keep their BN pass
        monkeypatch.setattr(folding, "folds_at_call", lambda bn, inp: False)
        plain = model(x)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fold_reflects_the_current_statistics_and_weights():
    """Nothing is cached: a change made through .data (no version bump) shows at the next call."""
    seq = ConvBNSequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    x = torch.randn(1, 4, 128, 128)  # 8 * 128 * 128 values: folded
    assert folding.folds_at_call(seq[1], x)
    before = seq(x)
    seq[1].running_var.data.mul_(4.0)
    seq[0].weight.data.mul_(-1.0)
    after = seq(x)
    torch.testing.assert_close(after, seq[1](seq[0](x)))
    assert not torch.allclose(before, after)


def test_training_mode_and_export_use_the_batch_norm():
    seq = ConvBNSequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))
    x = torch.randn(2, 4, 128, 128)
    out = seq.train()(x)  # batch statistics: zero mean per channel
    assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    seq.eval()
    assert folding.folds_at_call(seq[1], x)
    assert not folding.folds_at_call(nn.BatchNorm2d(8, track_running_stats=False).eval(), x)
    assert not folding.folds_at_call(seq[1], x[..., :8, :8])  # small map: the BN pass is cheaper


def test_gradients_flow_through_the_fold_like_through_the_batch_norm():
    torch.manual_seed(0)
    seq = ConvBNSequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    randomise(seq, seed=1)
    x = torch.randn(1, 3, 96, 96, requires_grad=True)
    seq(x).square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in seq.parameters()]
    x.grad = None
    seq.zero_grad()
    seq[2](seq[1](seq[0](x))).square().sum().backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in seq.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_frozen_batch_norm_in_a_training_model_folds_exactly():
    """Fine-tuning with frozen BNs (BN in eval mode, its affine not trained, the rest training):
    the fold is used and gives the outputs and gradients of conv -> BN (float64: exact)."""
    seq = randomise(ConvBNSequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), seed=3)
    seq.double().train()
    seq[1].eval().requires_grad_(False)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, requires_grad=True)
    assert folding.folds_at_call(seq[1], x)
    stats = seq[1].running_mean.clone(), seq[1].running_var.clone()
    folded = seq(x)
    folded.square().sum().backward()
    grads = [x.grad.clone(), seq[0].weight.grad.clone(), seq[0].bias.grad.clone()]
    x.grad = None
    seq.zero_grad()
    plain = seq[2](seq[1](seq[0](x)))
    plain.square().sum().backward()
    torch.testing.assert_close(folded, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, [x.grad, seq[0].weight.grad, seq[0].bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert seq[1].weight.grad is None  # frozen: no gradient, statistics untouched
    assert seq[1].running_mean.equal(stats[0]) and seq[1].running_var.equal(stats[1])


def test_deformable_conv_takes_the_folded_weights():
    torch.manual_seed(0)
    dcn, bn = DeformableConv2d(6, 4), nn.BatchNorm2d(4)
    randomise(bn)
    with torch.no_grad():
        dcn.offset_conv.weight.normal_(0, 0.1)
    bn.eval()
    x = torch.randn(1, 6, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn_forward(dcn, bn, x), bn(dcn(x)), rtol=1e-5, atol=1e-5)


def test_fold_formula_in_float64():
    conv, bn = nn.Conv2d(3, 5, 3, bias=True), nn.BatchNorm2d(5, eps=1e-3)
    randomise(bn, seed=2)
    bn.eval()
    weight, bias = fold_bn(conv.weight, conv.bias, bn, dtype=torch.float64)
    assert weight.dtype == bias.dtype == torch.float64
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = bn.double()(conv.double()(x))
    torch.testing.assert_close(nn.functional.conv2d(x, weight, bias), expected, rtol=1e-12, atol=1e-12)
