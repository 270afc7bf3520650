"""Export bookkeeping without exporting: detection comparisons that tolerate score ties (at the
keep-top-k cut and inside NMS) but nothing else, and all-or-nothing staged outputs."""
from __future__ import annotations

import numpy as np
import pytest

from utils.deploy.parity import compare_detections, detection_graph_ok
from utils.deploy.staging import staged
from utils.errors import FeatherFaceError, run_cli


def faces(rows) -> np.ndarray:
    """(K, 15) faces from (x1, y1, size, score) rows; landmarks at the box corner."""
    out = np.zeros((len(rows), 15), np.float32)
    for i, (x, y, size, score) in enumerate(rows):
        out[i, :5] = [x, y, x + size, y + size, score]
        out[i, 5:] = np.tile([x, y], 5)
    return out


def grid(n: int, score=lambda i: 0.9 - 0.0001 * i) -> list:
    """n disjoint boxes with decreasing scores."""
    return [(30.0 * (i % 20), 30.0 * (i // 20), 20.0, score(i)) for i in range(n)]


def test_identical_detections_are_ok():
    rows = faces(grid(12))
    diff = compare_detections("same", rows, rows.copy(), keep_top_k=750, nms_threshold=0.4)
    assert diff.matched == 12 and diff.ties == 0 and detection_graph_ok(diff)


def test_cut_through_tied_scores_at_keep_top_k_is_ok():
    # 10 faces above the cut, then 6 tied at 0.6; each pipeline keeps 12, different tied ones.
    rows = grid(10) + [(600.0 + 30 * i, 0.0, 20.0, 0.6) for i in range(6)]
    reference, candidate = faces(rows[:12]), faces(rows[:10] + rows[13:15])
    strict = compare_detections("crowd", reference, candidate)
    assert not detection_graph_ok(strict)  # what the export used to report
    diff = compare_detections("crowd", reference, candidate, keep_top_k=12, nms_threshold=0.4)
    assert diff.matched == 10 and diff.ties == 4 and diff.unexplained == 0 and detection_graph_ok(diff)
    assert "unmatched at tied scores" in diff.line()


def test_a_missing_face_above_the_cut_still_fails():
    rows = grid(12)
    reference, candidate = faces(rows), faces(rows[:3] + rows[4:])  # face 3 (score 0.8997) lost
    diff = compare_detections("crowd", reference, candidate, keep_top_k=12, nms_threshold=0.4)
    assert diff.unexplained == 1 and not detection_graph_ok(diff)
    uncapped = compare_detections("crowd", reference, candidate, keep_top_k=750, nms_threshold=0.4)
    assert not detection_graph_ok(uncapped)


def test_nms_keeping_the_other_of_two_tied_overlapping_boxes_is_ok():
    a, b = (100.0, 100.0, 40.0, 0.7), (104.0, 100.0, 40.0, 0.7 + 2e-5)  # IoU ~0.82, scores tied
    reference, candidate = faces(grid(5) + [a]), faces(grid(5) + [b])
    diff = compare_detections("pair", reference, candidate, keep_top_k=750, nms_threshold=0.4)
    # The two kept boxes pair up (IoU >= 0.5) but are different anchors 4 px apart: a tie swap.
    assert diff.matched == 5 and diff.ties == 2 and diff.max_coord_diff == 0 and detection_graph_ok(diff)
    far = faces(grid(5) + [(104.0, 100.0, 40.0, 0.75)])  # same box, clearly different score
    assert not detection_graph_ok(compare_detections("pair", reference, far, keep_top_k=750, nms_threshold=0.4))


def test_tie_between_non_overlapping_faces_is_not_excused():
    a, b = (100.0, 100.0, 40.0, 0.7), (400.0, 400.0, 40.0, 0.7)
    diff = compare_detections("apart", faces(grid(5) + [a]), faces(grid(5) + [b]), keep_top_k=750,
                              nms_threshold=0.4)
    assert diff.unexplained == 2 and not detection_graph_ok(diff)


def test_staged_outputs_appear_only_on_success(tmp_path):
    target_file, target_dir = tmp_path / "out" / "model.onnx", tmp_path / "pkg" / "v2"
    with pytest.raises(RuntimeError):
        with staged([target_file, target_dir]) as (f, d):
            f.write_text("graph")
            d.mkdir()
            (d / "README.md").write_text("package")
            raise RuntimeError("parity failed")
    assert not (tmp_path / "out").exists() and not (tmp_path / "pkg").exists()  # nothing left behind
    with staged([target_file, target_dir]) as (f, d):
        f.write_text("graph")
        d.mkdir()
        (d / "README.md").write_text("package")
        assert not target_file.exists()
    assert target_file.read_text() == "graph" and (target_dir / "README.md").read_text() == "package"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["README.md", "model.onnx", "out", "pkg", "v2"]


def test_staged_replaces_an_older_package_whole(tmp_path):
    target = tmp_path / "pkg"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    earlier_package = lambda folder: None  # noqa: E731 - check_folder found nothing against replacing it
    with staged([target], [target], check_folder=earlier_package) as (d,):
        d.mkdir()
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    with pytest.raises(ValueError):
        with staged([target], [target], check_folder=earlier_package) as (d,):
            d.mkdir()
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # a failure keeps the previous one
    with pytest.raises(FeatherFaceError, match="would be replaced as a whole, but it is not empty"):
        with staged([target], [target]):  # by default a folder holding anything is never replaced
            pass
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_an_output_inside_a_staged_folder_is_refused(tmp_path, capsys):
    # export_dynamic_onnx.py --output pkg/custom.onnx --deployment_package pkg used to print
    # "wrote pkg/custom.onnx" and then replace pkg, graph included, with the staged package.
    with pytest.raises(FeatherFaceError, match="custom.onnx lies inside .*pkg, which is written as a whole folder"):
        with staged([tmp_path / "pkg" / "custom.onnx", tmp_path / "pkg"]):
            pass
    assert not (tmp_path / "pkg").exists()
    import export_dynamic_onnx

    args = export_dynamic_onnx.get_args_parser().parse_args(
        ["--random_init", "--model", "v2", "--output", str(tmp_path / "pkg" / "custom.onnx"),
         "--deployment_package", str(tmp_path / "pkg")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(export_dynamic_onnx.main, args)
    out = capsys.readouterr()
    assert exit_info.value.code == 2 and "lies inside" in out.err and "wrote" not in out.out
    assert not (tmp_path / "pkg").exists()
