"""The documented interface survives the move of utils/ into subpackages (issue 16): old import
paths and `python -m` entry points keep working, and every script answers --help."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train.py", "train_v2.py", "test_widerface.py", "test_v1_v2_comparison.py", "export_dynamic_onnx.py",
           "detect.py", "benchmark.py", "validate_parameters.py"]
MODULES = ["utils.widerface_eval", "utils.evaluation.widerface_eval", "utils.convert_official", "data.check"]


def test_old_import_paths_are_the_moved_objects():
    import utils.detector
    import utils.evaluation.widerface_eval as moved_eval
    import utils.inference.detector as moved_detector
    import utils.widerface_eval
    from models import build_model  # noqa: F401

    assert utils.detector.FaceDetector is moved_detector.FaceDetector
    assert utils.widerface_eval.evaluate is moved_eval.evaluate
    assert utils.widerface_eval.main is moved_eval.main


_HELP_ALL = """
import contextlib, io, runpy, sys
failed = []
for target in sys.argv[1:]:
    sys.argv = [target, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if target.endswith(".py"):
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code not in (0, None) or "usage:" not in out.getvalue():
        failed.append(f"{target}: exit {code}")
print("FAILED: " + "; ".join(failed) if failed else "all ok")
"""


def test_help_works_for_every_script_and_module():
    """--help on every script and `python -m` entry point (one interpreter, so imports are paid once)."""
    done = subprocess.run([sys.executable, "-c", _HELP_ALL, *SCRIPTS, *MODULES], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("all ok"), done.stdout[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_thin(script):
    """get_args_parser() + main(args), no classes, under ~150 lines (STYLE.md)."""
    source = (ROOT / script).read_text()
    assert "def get_args_parser(" in source and "def main(" in source
    assert "\nclass " not in source
    assert len(source.splitlines()) <= 160, f"{script} has {len(source.splitlines())} lines"


def test_fresh_clone_quick_start_finds_the_8_faces(tmp_path):
    """README quick start: the shipped converted published model is detect.py's default."""
    import json

    from utils.inference.detector import PUBLISHED_WEIGHTS

    assert PUBLISHED_WEIGHTS.is_file(), "weights/featherface_v1_original.pth must be committed"
    done = subprocess.run([sys.executable, "detect.py", "--input", "data/sample/images/group_8.jpg",
                           "--output", str(tmp_path), "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "detections.json").read_text())
    assert report["weights"] == str(PUBLISHED_WEIGHTS)
    assert len(report["images"][0]["faces"]) == 8
    assert (tmp_path / "group_8.jpg").is_file()


def test_readme_layout_table_matches_the_tree():
    """Every library module under utils/ and every tool is named in the README's Layout table, and
    every top-level folder of the table exists."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    table = table[:table.index("\n## ", 1)]
    modules = [p for p in (ROOT / "utils").rglob("*.py") if p.name != "__init__.py" and "template" not in p.parts]
    modules += list((ROOT / "tools").glob("*.py"))
    missing = [str(p.relative_to(ROOT)) for p in modules if f"`{p.name}`" not in table]
    assert not missing, f"README Layout table does not name: {missing}"
    for folder in ("models", "layers", "data", "utils/training", "utils/evaluation", "utils/inference",
                   "utils/deploy", "docs", "weights", "tools"):
        assert f"`{folder}/`" in table and (ROOT / folder).is_dir(), folder
