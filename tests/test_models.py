"""Model contract: exact parameter counts, output shapes at several sizes, gradients, I/O."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from data.config import CONFIGS, ModelConfig, get_config
from models import build_model, count_parameters
from models.backbone import MobileNetV1
from tests.conftest import ROOT, shared_path
from utils.checkpoint import load_model, load_pretrained_backbone, save_checkpoint
from utils.errors import CheckpointError

EXPECTED = {"v1": 488_664, "v1_original": 592_371, "v1_slim": 321_041, "v2": 256_156}
MODULES = {  # docs/ARCHITECTURE.md §0, per-module breakdown
    "v1": {"backbone": 213_072, "backbone_cbam": 11_528, "bifpn": 84_010, "bifpn_cbam": 1_401,
           "ssh": 173_565, "channel_shuffle": 0, "heads": 5_088},
    "v1_original": {"backbone": 213_072, "backbone_cbam": 11_528, "bifpn": 112_606, "bifpn_cbam": 2_040,
                    "ssh": 232_965, "channel_shuffle": 13_920, "heads": 6_240},
    "v1_slim": {"backbone": 213_072, "backbone_cbam": 11_528, "bifpn": 30_726, "bifpn_cbam": 0,
                "ssh": 63_315, "channel_shuffle": 0, "heads": 2_400},
    "v2": {"backbone": 213_072, "backbone_cbam": 5_732, "bifpn": 26_068, "bifpn_cbam": 868,
           "ssh": 6_192, "channel_shuffle": 1_056, "heads": 3_168},
}


def num_anchors(h: int, w: int) -> int:
    return 2 * sum(-(-h // s) * -(-w // s) for s in (8, 16, 32))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build_model(name).eval() for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_parameter_counts(models, name):
    model = models[name]
    assert count_parameters(model) == EXPECTED[name] == model.config.expected_params
    assert {k: count_parameters(m) for k, m in model.module_groups().items()} == MODULES[name]


def test_anchor_formula_examples():
    assert num_anchors(640, 640) == 16_800
    assert num_anchors(320, 320) == 4_200
    assert num_anchors(480, 640) == 12_600
    assert num_anchors(1024, 1024) == 43_008


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("batch,h,w", [(1, 640, 640), (1, 480, 640), (1, 500, 375), (2, 96, 160), (1, 33, 47)])
def test_output_shapes_and_scores(models, name, batch, h, w):
    model = models[name]
    with torch.inference_mode():
        bbox, cls, ldm = model(torch.randn(batch, 3, h, w) * 50)
    n = num_anchors(h, w)
    assert bbox.shape == (batch, n, 4) and cls.shape == (batch, n, 2) and ldm.shape == (batch, n, 10)
    assert torch.isfinite(bbox).all() and torch.isfinite(cls).all() and torch.isfinite(ldm).all()
    torch.testing.assert_close(cls.sum(-1), torch.ones(batch, n))


@pytest.mark.parametrize("name", ["v1", "v2"])
@pytest.mark.parametrize("h,w", [(1, 1), (31, 31), (17, 40)])
def test_images_smaller_than_the_coarsest_stride(models, name, h, w):
    """Any side >= 1 works: every stride-2 layer maps n to ceil(n/2), down to 1x1 maps."""
    with torch.inference_mode():
        bbox, cls, ldm = models[name](torch.randn(1, 3, h, w) * 50)
    assert bbox.shape == (1, num_anchors(h, w), 4) and torch.isfinite(bbox).all()


@pytest.mark.parametrize("name", ["v1", "v2"])
@pytest.mark.parametrize("train", [False, True])
def test_empty_batch_gives_empty_outputs(name, train):
    """B = 0 (e.g. the last chunk of a filtered batch) gives (0, N, k) outputs, not a reshape error."""
    model = build_model(name).train(train)
    bbox, cls, ldm = model(torch.randn(0, 3, 64, 48))
    n = num_anchors(64, 48)
    assert bbox.shape == (0, n, 4) and cls.shape == (0, n, 2) and ldm.shape == (0, n, 10)


@pytest.mark.parametrize("bad,message", [
    (torch.randn(3, 64, 64), r"\(B, 3, H, W\).*\(3, 64, 64\)"),  # unbatched image
    (torch.randn(1, 64, 64, 3), r"\(B, 3, H, W\).*\(1, 64, 64, 3\)"),  # NHWC
    (torch.randn(1, 4, 64, 64), r"\(B, 3, H, W\).*\(1, 4, 64, 64\)"),  # BGRA
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point.*uint8"),  # raw pixels
])
@pytest.mark.parametrize("train", [False, True])
def test_wrong_input_is_a_clear_error(models, bad, message, train):
    model = models["v2"]
    try:
        with pytest.raises(ValueError, match=message):
            model.train(train)(bad)
    finally:
        model.eval()


@pytest.mark.parametrize("order", ["standard", "official"])
@pytest.mark.parametrize("groups,shape", [(2, (2, 52, 7, 9)), (4, (1, 32, 5, 4)), (2, (1, 24, 1, 3))])
def test_channel_shuffle_keeps_channels_last_and_values(order, groups, shape):
    from models.context import channel_shuffle

    x = torch.randn(shape)
    expected = channel_shuffle(x, groups, order)
    assert expected.is_contiguous()
    got = channel_shuffle(x.contiguous(memory_format=torch.channels_last), groups, order)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_eval_forward_on_the_cpu_stays_channels_last(models, name):
    """Every 4-D map of an eval-mode CPU forward is channels-last (oneDNN's fast layout): a module
    that hands the next one a plain NCHW map makes the convs after it convert or run slower
    (the channel shuffle did: the heads took twice as long)."""
    plain = []

    def check(module, inputs, output):
        for out in output if isinstance(output, (tuple, list)) else [output]:
            if (isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1
                    and not out.is_contiguous(memory_format=torch.channels_last)):
                plain.append((type(module).__name__, tuple(out.shape)))

    model = models[name]
    hooks = [m.register_forward_hook(check) for m in model.modules()]
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, 96, 128))
    finally:
        for hook in hooks:
            hook.remove()
    assert not plain, plain


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_training_mode_logits_and_backward_reaches_every_parameter(name):
    torch.manual_seed(1)
    model = build_model(name).train()
    bbox, cls, ldm = model(torch.randn(2, 3, 64, 96) * 50)
    assert not torch.allclose(cls.sum(-1), torch.ones_like(cls[..., 0]))  # logits, not probabilities
    (bbox.square().mean() + cls.square().mean() + ldm.square().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    # The only parameter entries with an identically zero gradient may be V1's unused third
    # P5 fusion weight (published quirk) - the tensor itself still receives a gradient.
    assert all(n.endswith("p5_w2") for n in zero), zero


def test_dropblock_only_in_training():
    model = build_model("v2")
    x = torch.randn(1, 3, 64, 64) * 50
    model.eval()
    with torch.no_grad():
        a, b = model(x)[1], model(x)[1]
    torch.testing.assert_close(a, b)  # eval is deterministic: no DropBlock


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError, match="known models: v1, v1_original, v1_slim, v2"):
        build_model("v3")


def test_config_round_trip_and_frozen():
    cfg = get_config("v1")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception):
        cfg.out_channels = 8  # type: ignore[misc]
    assert set(CONFIGS) == set(EXPECTED)


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(2)
    model = build_model(name).eval()
    for p in model.parameters():  # make the weights differ from a fresh init
        p.data.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "model.pth"
    save_checkpoint(path, model, epoch=3)
    loaded, blob = load_model(path)
    assert blob["epoch"] == 3 and loaded.config == model.config
    x = torch.randn(1, 3, 64, 64) * 50
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_of_wrong_model_is_a_clear_error(tmp_path):
    path = tmp_path / "v2.pth"
    save_checkpoint(path, build_model("v2"))
    with pytest.raises(CheckpointError, match="holds a 'v2' model"):
        load_model(path, expected="v1")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(junk)
    blob = torch.load(path, weights_only=False)
    blob["model"].pop("class_head.convs.0.weight")
    blob["model"]["extra.weight"] = torch.zeros(1)
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"missing keys: class_head\.convs\.0\.weight; unexpected keys: extra\.weight"):
        load_model(path)


def test_pretrained_backbone_loads_from_the_distributed_file():
    path = shared_path("weights", "mobilenetV1X0.25_pretrain.tar")
    backbone = MobileNetV1()
    before = backbone.stage1[0][0].weight.clone()
    load_pretrained_backbone(backbone, path)
    assert not torch.equal(before, backbone.stage1[0][0].weight)
    raw = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(backbone.stage3[1][3].weight, raw["module.stage3.1.3.weight"])


def test_pretrained_backbone_mismatch_lists_keys(tmp_path):
    state = {f"module.{k}": v for k, v in MobileNetV1().state_dict().items() if not k.startswith("stage3")}
    state["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.tar"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys: stage3\.0\.0\.weight.*unexpected keys: extra\.weight"):
        load_pretrained_backbone(MobileNetV1(), path)


def test_validate_parameters_script():
    out = subprocess.run([sys.executable, "validate_parameters.py", "--no_flops", "--image_size", "64"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for total in ("488,664", "592,371", "321,041", "256,156"):
        assert total in out.stdout


def test_validate_parameters_exits_1_on_a_mismatch(monkeypatch, capsys):
    import dataclasses

    import validate_parameters
    from data import config

    monkeypatch.setitem(config.CONFIGS, "v2", dataclasses.replace(config.CONFIGS["v2"], expected_params=256_155))
    args = validate_parameters.get_args_parser().parse_args(["--model", "v2", "--no_flops", "--image_size", "64"])
    assert validate_parameters.main(args) == 1
    assert "MISMATCH: v2 has 256,156 parameters, target 256,155" in capsys.readouterr().err
    args = validate_parameters.get_args_parser().parse_args(["--model", "v1", "--no_flops", "--image_size", "64", "--json"])
    assert validate_parameters.main(args) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report[0]["total"] == 488_664 and report[0]["ok"]
