"""benchmark.py's command line: bad values and unusable files are one error line, before anything is built."""
from __future__ import annotations

import pytest

import benchmark
from tests.conftest import ROOT
from utils.errors import FeatherFaceError


def parse(*argv):
    return benchmark.get_args_parser().parse_args([str(a) for a in argv])


@pytest.mark.parametrize("argv", [["--threads", "-1"], ["--threads", "0"], ["--batch", "0"], ["--runs", "0"],
                                  ["--warmup", "-1"], ["--rounds", "0"]])
def test_out_of_range_counts_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert f"argument {argv[0]}: expected" in capsys.readouterr().err


def test_json_folder_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "build_model", lambda name: pytest.fail("a model was built"))
    with pytest.raises(FeatherFaceError, match="--json .* is a folder; give a file path"):
        benchmark.main(parse("--quick", "--models", "v2", "--json", tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(FeatherFaceError, match="is a file, not a folder"):
        benchmark.main(parse("--quick", "--models", "v2", "--json", tmp_path / "file" / "out.json"))


@pytest.mark.parametrize("name", ["data/sample/images/group_8.jpg", "missing.onnx"])
def test_compare_file_that_is_no_onnx_model_is_one_error(name, monkeypatch):
    monkeypatch.setattr(benchmark, "build_model", lambda name: pytest.fail("a model was built"))
    with pytest.raises(FeatherFaceError, match=r"--compare .*: ONNX Runtime cannot load it as a model"):
        benchmark.main(parse("--quick", "--models", "v2", "--compare", ROOT / name))
