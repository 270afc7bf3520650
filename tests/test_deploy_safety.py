"""The export and the package's example lose nothing: outputs that would overwrite an input, a user's
folder or the current directory are refused before anything is written, a failed move puts every
target back, bad flags are one error line, and calibration and the example only read/write files."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from models import build_model
from tests.conftest import ROOT, shared_path
from utils.checkpoint import save_checkpoint
from utils.deploy import staging
from utils.deploy.package import TEMPLATE_DIR, not_a_package
from utils.deploy.staging import check_targets, staged
from utils.errors import FeatherFaceError, run_cli

import export_dynamic_onnx as script  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "images"
GROUP = SAMPLE / "group_8.jpg"
PACKAGE_NAMES = ["README.md", "deployment_config.json", "model.onnx", "model.pth", "model_postprocess.onnx",
                 "usage_example.py"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "v2.pth"
    save_checkpoint(path, build_model("v2"))
    return path


def tree(folder) -> dict:
    """Every file under `folder` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def earlier_package(folder):
    folder.mkdir(parents=True)
    for name in PACKAGE_NAMES:
        (folder / name).write_text("{}" if name.endswith(".json") else "old " + name)
    return folder


def _cli(capsys, *argv):
    args = script.get_args_parser().parse_args([str(a) for a in argv])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, args)
    return exit_info.value.code, capsys.readouterr().err


def test_an_existing_folder_is_never_an_onnx_output(tmp_path, checkpoint, capsys):
    keep = tmp_path / "keepdir"
    keep.mkdir()
    (keep / "notes.txt").write_text("my notes")
    code, err = _cli(capsys, "--weights", checkpoint, "--output", keep)
    assert code == 2 and "keepdir is an existing folder; give a file path" in err
    assert tree(tmp_path) == {"keepdir/notes.txt": b"my notes"}


def test_no_output_overwrites_the_checkpoint(tmp_path, checkpoint, capsys):
    weights = tmp_path / "v2copy.pth"
    shutil.copyfile(checkpoint, weights)
    before = tree(tmp_path)
    code, err = _cli(capsys, "--weights", weights, "--output", weights)
    assert code == 2 and "is the input" in err and tree(tmp_path) == before
    package = earlier_package(tmp_path / "pkg")  # re-exporting a package from its own model.pth
    shutil.copyfile(checkpoint, package / "model.pth")
    before = tree(tmp_path)
    code, err = _cli(capsys, "--weights", package / "model.pth", "--output", tmp_path / "v2.onnx",
                     "--deployment_package", package)
    assert code == 2 and "input" in err and "lies inside" in err and str(package) in err
    assert tree(tmp_path) == before
    os.link(weights, tmp_path / "hardlink.onnx")  # the same file under another name
    with pytest.raises(FeatherFaceError, match="is the input"):
        check_targets([tmp_path / "hardlink.onnx"], inputs=[weights])


def test_only_a_new_or_empty_folder_or_an_earlier_package_is_replaced(tmp_path, checkpoint, capsys, monkeypatch):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("chapter 1")
    (tmp_path / "v2.onnx").write_text("the previous graph")
    before = tree(tmp_path)
    code, err = _cli(capsys, "--weights", checkpoint, "--output", tmp_path / "v2.onnx", "--deployment_package", thesis)
    assert code == 2 and "thesis would be replaced as a whole, but it is not a deployment package" in err
    monkeypatch.chdir(tmp_path)  # the current folder: refused before the graphs are moved into place
    code, err = _cli(capsys, "--weights", checkpoint, "--output", "v2.onnx", "--deployment_package", ".")
    assert code == 2 and "is the current folder, one of its parents or a mount point" in err
    assert tree(tmp_path) == before  # no graph replaced, no hidden staging folder left

    package = earlier_package(tmp_path / "pkg")
    assert not_a_package(package) is None
    (package / "annotated.jpg").write_text("a user's output")
    assert "not part of a deployment package (annotated.jpg)" in not_a_package(package)
    (tmp_path / "empty").mkdir()
    check_targets([tmp_path / "v2.onnx", tmp_path / "empty"], [tmp_path / "empty"], check_folder=not_a_package)
    with pytest.raises(FeatherFaceError, match="current folder"):
        check_targets([tmp_path.parent], [tmp_path.parent])  # an ancestor of the current folder


def test_a_failed_move_puts_every_target_back(tmp_path, monkeypatch):
    graph, package = tmp_path / "v2.onnx", earlier_package(tmp_path / "pkg")
    graph.write_text("old graph")
    before = tree(tmp_path)
    real_replace, failed = os.replace, []

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(package) and not failed:  # the last move: the new package into place
            failed.append(src)
            raise OSError(16, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", replace)
    with pytest.raises(OSError, match="busy"):
        with staged([graph, package], [package], check_folder=not_a_package) as (new_graph, new_package):
            new_graph.write_text("new graph")
            new_package.mkdir()
            (new_package / "README.md").write_text("new")
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["pkg", "v2.onnx"]


@pytest.mark.parametrize("flag, value", [("--keep_top_k", "-1"), ("--keep_top_k", "0"), ("--top_k", "0"),
                                         ("--score_threshold", "7"), ("--nms_threshold", "1.5"),
                                         ("--score_threshold", "nan")])
def test_postprocess_flags_are_range_checked(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.get_args_parser().parse_args(["--random_init", "--model", "v2", flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err


def test_calibration_images_are_files_only(tmp_path):
    from utils.deploy.export import ExportError
    from utils.deploy.quantize import find_images

    (tmp_path / "album.jpg").mkdir()  # a folder named like an image
    with pytest.raises(ExportError, match="no images"):
        find_images(tmp_path)
    shutil.copyfile(GROUP, tmp_path / "album.jpg" / "group_8.jpg")
    assert find_images(tmp_path) == [tmp_path / "album.jpg" / "group_8.jpg"]


def usage_example():
    """The package's example script, imported from the template as shipped (it needs nothing of ours)."""
    spec = importlib.util.spec_from_file_location("usage_example_template", TEMPLATE_DIR / "usage_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_judges_truncation_like_the_repository():
    """The package's own JPEG/PNG check (it ships without data/preprocess.py) agrees with the
    repository's: cut at many points, complete, and complete with data after the end marker."""
    from data.preprocess import truncation_problem

    example = usage_example()
    full = GROUP.read_bytes()
    png = (SAMPLE / "astronaut.png").read_bytes()
    cases = [full[:n] for n in (3, 100, 700, 2000, 5000, 60000, len(full) - 2, len(full) - 1)]
    cases += [full, full + full[:3000], full + b"\x00ftypmp42\xff\xda\x00\x08 tail", png, png[:len(png) // 2]]
    for data in cases:
        expected = truncation_problem(data) is not None
        shipped = data[:2] == b"\xff\xd8" and not example.jpeg_has_end(data) or (
            data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data)
        assert shipped == expected, (len(data), expected)
    assert not example.jpeg_has_end(full[:5000]) and example.jpeg_has_end(full + full[:3000])


def run_example(*argv) -> str:
    """The example's exit message (its errors are `error: ...` and exit status 1)."""
    example = usage_example()
    with pytest.raises(SystemExit) as exit_info:
        example.main(example.get_args_parser().parse_args([str(a) for a in argv]))
    return str(exit_info.value.code)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "deployment_config.json"
    path.write_text(json.dumps({"input": {"name": "input", "fixed_size": None, "min_side": 32},
                                "mean_bgr": [104, 117, 123], "thresholds": {"score": 0.5}}))
    return path


def test_usage_example_output_errors_come_before_any_work(tmp_path, config, capsys):
    photo = tmp_path / "photo.jpg"
    shutil.copyfile(GROUP, photo)
    (tmp_path / "somedir").mkdir()
    missing = tmp_path / "missing.onnx"  # never loaded: the outputs are checked first
    for flag in ("--output", "--json"):
        message = run_example(photo, flag, tmp_path / "somedir", "--model", missing, "--config", config)
        assert message == f"error: {flag} {tmp_path / 'somedir'} is a folder; give a file path"
    message = run_example(photo, "--output", tmp_path / "annotated", "--model", missing, "--config", config)
    assert "OpenCV cannot write this image type" in message
    message = run_example(photo, "--output", photo, "--model", missing, "--config", config)
    assert "is the input image" in message and photo.read_bytes() == GROUP.read_bytes()
    message = run_example(photo, "--model", missing, "--config", tmp_path / "none.json")
    assert message.startswith("error: cannot read the package config")
    with pytest.raises(SystemExit) as exit_info:
        usage_example().get_args_parser().parse_args([str(photo), "--threshold", "5"])
    assert exit_info.value.code == 2 and "--threshold: expected a score from 0 to 1" in capsys.readouterr().err


def test_usage_example_refuses_graphs_that_are_not_a_detection_graph(tmp_path, config):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, None, None])
    loc = helper.make_tensor_value_info("loc", TensorProto.FLOAT, [1, 3, None, None])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["loc"])], "other", [image], [loc])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(other))
    message = run_example(GROUP, "--model", other, "--config", config)
    assert message.startswith(f"error: {other} is not a FeatherFace detection graph") and "\n" not in message
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    message = run_example(GROUP, "--model", tmp_path / "broken.onnx", "--config", config)
    assert message.startswith("error: ONNX Runtime cannot load") and "\n" not in message


def test_usage_example_refuses_the_retinaface_graph(config):
    retinaface = shared_path("weights", "retinaface_mnet025.onnx")
    message = run_example(GROUP, "--model", retinaface, "--config", config)
    assert "is not a FeatherFace detection graph" in message and "loc, conf, landmarks" in message
