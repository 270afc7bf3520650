"""Importing checkpoints of the published FeatherFace code: renaming rules, rejection of other
architectures and broken files, the CLI, and detections equal to the published code's."""
from __future__ import annotations

import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from data.preprocess import preprocess
from layers.prior_box import prior_boxes
from models import build_model
from tests.conftest import ROOT, shared_path
from utils.checkpoint import load_model, save_checkpoint
from utils.convert_official import (convert_file, convert_key, convert_state_dict, get_args_parser, load_official,
                                    main)
from utils.errors import CheckpointError, run_cli
from utils.inference.postprocess import detect_faces

PUBLISHED = ("weights", "featherface_v1_original_widerface.pth")

# Detections of the PUBLISHED code on group_8.jpg at its own size (768x1024), mean-subtracted BGR:
# fokouarnaud/featherface-train @ f2a0228 models/retinaface.py + net.py, RetinaFace(cfg_mnet,
# phase='test', pretrain off) with this weights file loaded strictly, CPU float32; decoded with the
# RetinaFace formula (variance 0.1/0.2), score > 0.02, py_cpu_nms at 0.4. All 8 detections;
# [x1, y1, x2, y2] and five landmarks in pixels (rounded to 1e-4), score rounded to 1e-6.
GOLDEN_GROUP_8 = [  # x1, y1, x2, y2, score, (lx, ly) * 5
    (507.4377, 120.7475, 627.0447, 267.8691, 0.999983,
     539.0784, 186.2817, 594.6593, 183.4761, 568.0570, 214.5203, 544.1998, 234.1158, 593.1074, 231.6782),
    (162.4798, 138.7935, 279.8216, 281.7844, 0.999973,
     202.3791, 189.9913, 255.2714, 195.9788, 229.5729, 220.4402, 197.0425, 236.1992, 248.7336, 241.2410),
    (361.7247, 271.2920, 495.7399, 427.8387, 0.999966,
     395.8792, 335.8665, 460.2719, 327.0163, 433.4615, 367.7226, 404.6971, 390.4362, 465.5424, 382.7211),
    (834.3791, 307.5014, 958.1816, 453.0183, 0.999965,
     870.2026, 369.4420, 928.8654, 369.3488, 901.0956, 408.0757, 874.0878, 424.0297, 921.1695, 423.9301),
    (572.9104, 317.0178, 703.3853, 473.3432, 0.999960,
     607.8726, 384.0054, 670.0656, 374.3889, 645.4605, 414.3846, 618.6168, 435.8105, 675.2301, 427.4361),
    (162.9693, 332.8617, 303.1461, 508.7531, 0.999899,
     223.3560, 390.4517, 280.5723, 412.1278, 252.2511, 435.1867, 201.4161, 450.3892, 254.2474, 468.5679),
    (323.3239, 102.3070, 416.0395, 229.6651, 0.999844,
     348.9945, 155.4518, 393.4935, 151.0857, 375.0041, 176.7852, 354.1618, 195.1222, 395.0098, 191.2305),
    (709.2194, 170.1029, 804.3851, 298.9084, 0.999795,
     734.8753, 230.6589, 779.8709, 229.9065, 758.4579, 250.8034, 739.5461, 273.6842, 773.9973, 273.0125),
]

_BRANCHES = {"conv3x3": "conv3X3", "conv5x5_1": "conv5X5_1", "conv5x5_2": "conv5X5_2",
             "conv7x7_2": "conv7X7_2", "conv7x7_3": "conv7x7_3"}
_HEADS = {"class_head": "ClassHead", "bbox_head": "BboxHead", "landmark_head": "LandmarkHead"}


def published_name(ours: str) -> str:
    """Our key -> the published code's, written independently of the converter's rule table."""
    name = re.sub(r"^backbone_cbam\.(\d)\.", r"bacbkbone_\1_cbam.", ours)
    name = re.sub(r"^bifpn_cbam\.(\d)\.", r"bif_cbam_\1.", name)
    name = name.replace(".channel_gate.fc1.", ".ChannelGate.mlp.1.").replace(".channel_gate.fc2.", ".ChannelGate.mlp.3.")
    name = name.replace(".spatial_gate.", ".SpatialGate.spatial.")
    name = name.replace(".depthwise.", ".depthwise_conv.conv.").replace(".pointwise.", ".pointwise_conv.conv.")
    name = re.sub(r"(down_channel(?:_2)?)\.0\.", r"\1.0.conv.", name)
    match = re.match(r"^ssh\.(\d)\.(\w+)\.(.*)$", name)
    if match:
        name = f"ssh{int(match[1]) + 1}.{_BRANCHES[match[2]]}.{match[3]}"
    name = re.sub(r"^shuffle\.(\d)\.", lambda m: f"ssh{int(m[1]) + 1}_cs.", name)
    match = re.match(r"^(class_head|bbox_head|landmark_head)\.convs\.(\d)\.(.*)$", name)
    if match:
        name = f"{_HEADS[match[1]]}.{match[2]}.conv1x1.{match[3]}"
    return name


def as_published(state: dict) -> dict:
    return {published_name(k): v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def target() -> dict:
    torch.manual_seed(0)
    return build_model("v1_original").state_dict()


@pytest.fixture(scope="module")
def published() -> dict:
    return load_official(shared_path(*PUBLISHED))


@pytest.mark.parametrize("official,ours", [
    ("body.stage1.0.0.weight", "body.stage1.0.0.weight"),
    ("body.stage3.1.4.num_batches_tracked", "body.stage3.1.4.num_batches_tracked"),
    ("bacbkbone_2_cbam.ChannelGate.mlp.3.bias", "backbone_cbam.2.channel_gate.fc2.bias"),
    ("bacbkbone_0_cbam.SpatialGate.spatial.bn.running_var", "backbone_cbam.0.spatial_gate.bn.running_var"),
    ("bif_cbam_1.ChannelGate.mlp.1.weight", "bifpn_cbam.1.channel_gate.fc1.weight"),
    ("bif_cbam_2.SpatialGate.spatial.conv.weight", "bifpn_cbam.2.spatial_gate.conv.weight"),
    ("bifpn.2.p5_w2", "bifpn.2.p5_w2"),
    ("bifpn.1.conv4_up.depthwise_conv.conv.weight", "bifpn.1.conv4_up.depthwise.weight"),
    ("bifpn.0.conv5_down.pointwise_conv.conv.bias", "bifpn.0.conv5_down.pointwise.bias"),
    ("bifpn.2.conv3_up.bn.running_mean", "bifpn.2.conv3_up.bn.running_mean"),
    ("bifpn.0.p5_down_channel.0.conv.weight", "bifpn.0.p5_down_channel.0.weight"),
    ("bifpn.0.p4_down_channel_2.1.bias", "bifpn.0.p4_down_channel_2.1.bias"),
    ("ssh1.conv3X3.0.offset_conv.weight", "ssh.0.conv3x3.0.offset_conv.weight"),
    ("ssh3.conv7X7_2.0.regular_conv.weight", "ssh.2.conv7x7_2.0.regular_conv.weight"),
    ("ssh2.conv7x7_3.1.running_mean", "ssh.1.conv7x7_3.1.running_mean"),
    ("ssh2_cs.3.weight", "shuffle.1.3.weight"),
    ("ssh3_cs.6.num_batches_tracked", "shuffle.2.6.num_batches_tracked"),
    ("ClassHead.0.conv1x1.weight", "class_head.convs.0.weight"),
    ("LandmarkHead.2.conv1x1.bias", "landmark_head.convs.2.bias"),
])
def test_convert_key_examples(official, ours):
    assert convert_key(official) == ours


@pytest.mark.parametrize("name", [
    "fpn.output1.0.weight",  # RetinaFace's FPN
    "bacbkbone_3_cbam.ChannelGate.mlp.1.weight",  # no fourth level
    "ssh1.conv3X3.0.regular_conv.bias",  # the deformable convs have no bias
    "ssh1.conv3X3.0.weight",  # RetinaFace's plain-conv SSH
    "ssh1_cs.0.weight",  # index 0 is the parameter-free shuffle
    "bifpn.1.p3_down_channel.0.conv.weight",  # projections exist in the first cell only
    "ClassHead.0.conv1x1.weight.extra",
])
def test_convert_key_rejects_names_without_a_rule(name):
    with pytest.raises(CheckpointError, match="matches no conversion rules"):
        convert_key(name)


def test_roundtrip_fills_every_key_with_its_tensor(target):
    official = as_published(target)
    assert len(official) == len(target) == 587
    converted = convert_state_dict(official, target)
    assert list(converted) == list(target)
    assert all(torch.equal(converted[k], target[k]) for k in target)


def test_wrapper_prefix_and_profiler_entries_are_dropped(target):
    official = {f"module.{k}": v for k, v in as_published(target).items()}
    official.update({"total_ops": torch.zeros(1), "total_params": torch.zeros(1),
                     "module.ssh1.conv3X3.0.total_ops": torch.zeros(1),
                     "module.bifpn.0.conv3_up.bn.total_params": torch.zeros(1)})
    converted = convert_state_dict(official, target)
    assert all(torch.equal(converted[k], target[k]) for k in target)
    official["ssh1_cs.1.weight"] = torch.zeros(32, 64, 1, 1)  # also present as module.ssh1_cs.1.weight
    with pytest.raises(CheckpointError, match="both with and without"):
        convert_state_dict(official, target)


def test_other_widths_are_rejected_naming_keys_and_shapes(target):
    # The C=52 "v1" model (6 CBAM, parameter-free shuffle), written with the published names.
    narrow = as_published(build_model("v1").state_dict())
    with pytest.raises(CheckpointError) as info:
        convert_state_dict(narrow, target, source="c52.pth")
    message = str(info.value)
    assert "c52.pth" in message and "wrong shapes" in message
    assert "bifpn.0.p3_down_channel.0.conv.weight (52, 64, 1, 1) (expected (64, 64, 1, 1)" in message
    assert "left unfilled: shuffle.0.1.weight" in message  # no conv shuffle block in that model


@pytest.mark.parametrize("state,named", [
    ({"body.conv1.weight": torch.zeros(64, 3, 7, 7), "body.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
      "fpn.output1.0.weight": torch.zeros(64, 512, 1, 1), "ssh1.conv3X3.0.weight": torch.zeros(128, 256, 3, 3),
      "ClassHead.0.conv1x1.weight": torch.zeros(4, 256, 1, 1)}, "fpn.output1.0.weight"),
])
def test_other_architectures_are_rejected(target, state, named):
    with pytest.raises(CheckpointError, match="no conversion rule") as info:
        convert_state_dict(state, target)
    assert named in str(info.value)


def test_missing_and_surplus_keys_are_named(target):
    official = as_published(target)
    del official["ssh2.conv5X5_1.1.running_var"]
    official["bifpn.3.p4_w1"] = torch.ones(2)  # a fourth BiFPN cell
    with pytest.raises(CheckpointError) as info:
        convert_state_dict(official, target)
    assert "unfilled: ssh.1.conv5x5_1.1.running_var" in str(info.value)
    assert "does not have: bifpn.3.p4_w1" in str(info.value)


@pytest.mark.parametrize("blob", [{}, {"a": 1}, [torch.zeros(1)]])
def test_non_state_dicts_are_rejected(tmp_path, blob):
    path = tmp_path / "x.pth"
    torch.save(blob, path)
    with pytest.raises(CheckpointError):
        convert_state_dict(load_official(path))


def test_unreadable_files_are_rejected(tmp_path, target):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_official(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_official(tmp_path / "absent.pth")
    full = tmp_path / "full.pth"
    torch.save(as_published(target), full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_official(truncated)
    ours = tmp_path / "ours.pth"
    save_checkpoint(ours, build_model("v1_original"))
    with pytest.raises(CheckpointError, match="already a FeatherFace checkpoint"):
        load_official(ours)


def test_convert_file_writes_a_checkpoint_that_rebuilds_itself(tmp_path, target):
    src, dst = tmp_path / "published.pth", tmp_path / "out" / "ours.pth"
    torch.save(as_published(target), src)
    convert_file(src, dst)
    model, blob = load_model(dst, expected="v1_original")
    assert "published.pth" in blob["source"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in target.items())
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        convert_file(src, src)


def test_help_works_without_files(capsys):
    with pytest.raises(SystemExit) as info:
        get_args_parser().parse_args(["--help"])
    assert info.value.code == 0 and "SRC" in capsys.readouterr().out.upper()


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "utils.convert_official", str(junk), str(tmp_path / "out.pth")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot read") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.pth").exists()


def test_published_checkpoint_converts_completely(published, target):
    assert len(published) == 587
    converted = convert_state_dict(published, target)
    assert set(converted) == set(target)
    for key, value in published.items():  # every published tensor lands, unchanged, under its new name
        assert torch.equal(converted[convert_key(key)], value), key


@pytest.fixture(scope="module")
def converted_model(tmp_path_factory, published):
    dst = tmp_path_factory.mktemp("converted") / "v1_original.pth"
    main(get_args_parser().parse_args([str(shared_path(*PUBLISHED)), str(dst)]))
    model, blob = load_model(dst, expected="v1_original")
    return model, blob


def test_converted_checkpoint_rebuilds_itself(converted_model, published):
    model, blob = converted_model
    assert blob["model_config"]["name"] == "v1_original"
    assert "featherface_v1_original_widerface.pth" in blob["source"] and "sha256" in blob["source"]
    assert sum(p.numel() for p in model.parameters()) == 592_371
    state = model.state_dict()
    assert torch.equal(state["ssh.2.conv7x7_3.0.offset_conv.weight"], published["ssh3.conv7x7_3.0.offset_conv.weight"])


def test_detections_match_the_published_code(converted_model):
    model, _ = converted_model
    image = cv2.imread(str(shared_path("data", "sample", "images", "group_8.jpg")))
    x = preprocess(image)[None]
    size = tuple(x.shape[2:])
    with torch.inference_mode():
        loc, conf, landm = model(x)
    dets = detect_faces(loc[0], conf[0], landm[0], prior_boxes(size), model.config.variance, size)
    faces = dets[dets[:, 4] > 0.5]
    assert len(faces) == 8
    golden = np.array(GOLDEN_GROUP_8, dtype=np.float64)
    # Equal scores can come out of NMS in either order: pair each golden face with its nearest box.
    order = [int(np.abs(faces[:, :4] - g[:4]).sum(1).argmin()) for g in golden]
    assert sorted(order) == list(range(8))
    faces = faces[order].astype(np.float64)
    np.testing.assert_allclose(faces[:, :4], golden[:, :4], rtol=0, atol=2e-3)
    np.testing.assert_allclose(faces[:, 5:], golden[:, 5:], rtol=0, atol=2e-3)
    np.testing.assert_allclose(faces[:, 4], golden[:, 4], rtol=0, atol=3e-6)


def test_shipped_weights_are_the_converted_published_file(converted_model):
    """weights/featherface_v1_original.pth (detect.py's default) is exactly what the converter
    writes from the published file, so tests may use it in place of ../shared."""
    from utils.inference.detector import PUBLISHED_WEIGHTS

    model, blob = converted_model
    shipped, shipped_blob = load_model(PUBLISHED_WEIGHTS, expected="v1_original")
    assert shipped_blob["model_config"] == blob["model_config"]
    assert shipped_blob["source"] == blob["source"]
    ours, theirs = shipped.state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", ["v1_original", "v2"])
def test_state_dict_in_this_repositorys_naming_gets_the_save_hint(tmp_path, capsys, name):
    # Not a long list of keys without a conversion rule: one line saying there is nothing to convert and
    # how to make a checkpoint of it (the hint load_checkpoint gives), also for a DataParallel-wrapped one.
    src, dst = tmp_path / "bare.pth", tmp_path / "out.pth"
    torch.save({f"module.{k}": v for k, v in build_model(name).state_dict().items()}, src)
    with pytest.raises(SystemExit) as info:
        run_cli(main, get_args_parser().parse_args([str(src), str(dst)]))
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "no conversion rule" not in err
    assert err.startswith(f"error: {src} is already in this repository's naming, not the published one")
    assert f"bare state dict of this repository's '{name}' model" in err and "save_checkpoint(path, model)" in err
    assert not dst.exists()
