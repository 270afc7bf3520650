"""detect.py (images, folders with broken files, videos) and benchmark.py (--quick) end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = ROOT / "data" / "sample" / "images"
# One thread: on a shared 2-core machine OpenMP spinning makes 2 threads far slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)






@pytest.mark.parametrize("script", ["detect.py", "benchmark.py"])
def test_help_needs_nothing(script, capsys):
    module = __import__(script[:-3])
    with pytest.raises(SystemExit) as exit_info:
        module.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out


def test_detect_folder_with_a_corrupt_file(real_checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "group_8.jpg").write_bytes((SAMPLE / "group_8.jpg").read_bytes())
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    whole = (SAMPLE / "crowd_27.jpg").read_bytes()
    (inputs / "cut_short.jpg").write_bytes(whole[: len(whole) // 2])  # cv2.imread fills the rest with grey
    png = cv2.imencode(".png", cv2.imread(str(SAMPLE / "group_8.jpg")))[1].tobytes()
    (inputs / "cut_short.png").write_bytes(png[: len(png) - 100])  # no IEND chunk
    (inputs / "notes.txt").write_text("not an image: ignored")
    result = run_script("detect.py", "--weights", str(real_checkpoint), "--input", str(inputs), "--output", str(out),
                        "--image_size", "384", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "broken.jpg" in result.stderr  # reported, not fatal
    for name, cut in (("cut_short.jpg", "JPEG is truncated"), ("cut_short.png", "PNG is truncated")):
        assert f"{name}: image cannot be decoded (corrupt or not an image; {cut}" in result.stderr
    report = json.loads((out / "detections.json").read_text())
    assert [Path(e["file"]).name for e in report["errors"]] == ["broken.jpg", "cut_short.jpg", "cut_short.png"]
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "group_8.jpg"]  # nothing drawn for them
    (image,) = report["images"]
    assert Path(image["file"]).name == "group_8.jpg" and (image["width"], image["height"]) == (1024, 768)
    assert len(image["faces"]) == 8 and all(f["score"] > 0.5 for f in image["faces"])
    assert all(len(f["box"]) == 4 and len(f["landmarks"]) == 5 for f in image["faces"])
    annotated, original = cv2.imread(image["output"]), cv2.imread(str(SAMPLE / "group_8.jpg"))
    assert annotated.shape == original.shape and not np.array_equal(annotated, original)  # boxes drawn


def test_detect_caps_the_long_side_unless_original_size(real_checkpoint, tmp_path, monkeypatch):
    import detect
    from utils.inference.detector import FaceDetector

    big = cv2.resize(cv2.imread(str(SAMPLE / "group_8.jpg")), (1600, 1200))
    (tmp_path / "big.jpg").write_bytes(cv2.imencode(".jpg", big)[1].tobytes())
    network_sides = []
    original_detect = FaceDetector.detect_arrays

    def spy(self, images, scale=None):
        network_sides.append(max(images[0].shape[:2]) * self.scale_for(images[0]))
        return original_detect(self, images, scale)

    monkeypatch.setattr(FaceDetector, "detect_arrays", spy)
    base = ["--weights", str(real_checkpoint), "--input", str(tmp_path / "big.jpg"), "--threads", "1"]
    assert detect.get_args_parser().parse_args(base).max_size == detect.DEFAULT_MAX_SIZE
    runs = {"capped": ["--max_size", "800"], "original": ["--original_size"]}
    faces = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert detect.main(detect.get_args_parser().parse_args(base + ["--output", str(out)] + extra)) == 0
        report = json.loads((out / "detections.json").read_text())
        faces[name] = report["images"][0]["faces"]
        assert report["max_size"] == (800 if name == "capped" else None)
    assert network_sides == [800, 1600]
    # Boxes come back in original-image pixels either way: the same 8 faces, within a few pixels.
    assert len(faces["capped"]) == len(faces["original"]) == 8
    boxes = [sorted(f["box"][0] for f in faces[name]) for name in runs]
    assert max(abs(a - b) for a, b in zip(*boxes)) < 12 and max(boxes[0]) > 800


def test_detect_nothing_readable_exits_2(real_checkpoint, tmp_path, capsys):
    import detect
    from utils.errors import run_cli

    (tmp_path / "only.png").write_bytes(b"garbage")
    args = detect.get_args_parser().parse_args(["--weights", str(real_checkpoint), "--input", str(tmp_path),
                                                "--output", str(tmp_path / "out"), "--quiet"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(detect.main, args)
    assert exit_info.value.code == 2 and "nothing could be processed" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "detections.json").read_text())["errors"][0]["file"].endswith("only.png")
    args.input = tmp_path / "missing.jpg"
    with pytest.raises(SystemExit):
        run_cli(detect.main, args)
    args.input, args.image_size = SAMPLE / "group_8.jpg", 0  # used to end in a cv2.error traceback
    with pytest.raises(SystemExit) as exit_info:
        run_cli(detect.main, args)
    assert exit_info.value.code == 2 and "image_size must be a positive number of pixels" in capsys.readouterr().err


def test_detect_video(real_checkpoint, tmp_path):
    import detect

    frame = cv2.resize(cv2.imread(str(SAMPLE / "group_8.jpg")), (320, 240))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (320, 240))
    for i in range(3):
        writer.write(frame if i != 1 else cv2.flip(frame, 1))
    writer.release()
    out = tmp_path / "out"
    args = detect.get_args_parser().parse_args(["--weights", str(real_checkpoint), "--input", str(video),
                                                "--output", str(out), "--quiet", "--show"])
    assert detect.main(args) == 0
    (result,) = json.loads((out / "detections.json").read_text())["videos"]
    assert [f["frame"] for f in result["frames"]] == [0, 1, 2]
    assert all(len(f["faces"]) >= 6 for f in result["frames"])  # small faces at 320x240
    capture = cv2.VideoCapture(result["output"])
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 3 and int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 320
    # Two videos with one name (clip.avi, clip.mkv) used to write one clip.avi over the other.
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("clip.avi", "clip.mkv"):
        (folder / name).write_bytes(video.read_bytes())
    args = detect.get_args_parser().parse_args(["--weights", str(real_checkpoint), "--input", str(folder),
                                                "--output", str(tmp_path / "out2"), "--quiet"])
    assert detect.main(args) == 0
    results = json.loads((tmp_path / "out2" / "detections.json").read_text())["videos"]
    assert [Path(r["output"]).name for r in results] == ["clip.avi", "clip_mkv.avi"]
    assert all(Path(r["output"]).is_file() for r in results)


def tiny_onnx(path: Path) -> Path:
    """A RetinaFace-style stand-in for --compare: one NCHW input, fixed 1x3x64x64, two outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.01, np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["feat"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["feat"], ["scores"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
                              [helper.make_tensor_value_info("feat", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_benchmark_quick_prints_table_and_json(tmp_path):
    report = tmp_path / "bench.json"
    result = run_script("benchmark.py", "--quick", "--models", "v2", "--backends", "torch", "eager",
                        "--compare", str(tiny_onnx(tmp_path / "other.onnx")), "--json", str(report))
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | backend |") and len(table) == 2 + 3
    data = json.loads(report.read_text())
    rows = {(r["model"], r["backend"]): r for r in data["results"]}
    assert set(rows) == {("v2", "torch"), ("v2", "eager"), ("other.onnx", "onnx_compare")}
    for row in rows.values():
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["images_per_s"] > 0
    assert rows[("v2", "torch")]["size"] == "64x64" and rows[("v2", "torch")]["gflops"] > 0
    assert rows[("other.onnx", "onnx_compare")]["gflops"] is None  # not counted for foreign models
    assert data["machine"]["cpu_count"] >= 1 and data["settings"]["runs"] == 3
    # --compare: same-run ratios to the first compared model, printed and stored.
    assert rows[("other.onnx", "onnx_compare")]["ratio"] == 1.0
    for backend in ("torch", "eager"):
        low, high = rows[("v2", backend)]["ratio_range"]
        assert 0 < low <= rows[("v2", backend)]["ratio"] <= high
    assert "Same-run ratios to other.onnx" in result.stdout


def test_cpu_busy_and_steal_shares_from_proc_stat(tmp_path):
    from utils.timing import CpuTicks, _cpu_times, busy_fraction, cpu_busy_before_run, steal_fraction

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 0 50 800 50 0 0 30 7 0\ncpu0 50 0 25 400 25 0 0 15 0 0\n")
    assert _cpu_times(str(stat)) == CpuTicks(busy=180, total=1030, steal=30)
    stat.write_text("cpu  100 0 50 800\n")  # an old kernel: no iowait, irq, softirq or steal columns
    assert _cpu_times(str(stat)) == CpuTicks(150, 950, 0)
    assert _cpu_times(str(tmp_path / "missing")) is None
    assert busy_fraction(CpuTicks(150, 1000, 0), CpuTicks(450, 1400, 0)) == 0.75  # 300 busy ticks of 400
    assert busy_fraction(CpuTicks(150, 1000, 0), CpuTicks(150, 1000, 0)) == 0.0
    assert steal_fraction(CpuTicks(150, 1000, 20), CpuTicks(450, 1400, 70)) == 0.125  # 50 stolen of 400
    assert steal_fraction(CpuTicks(150, 1000, 20), CpuTicks(150, 1000, 20)) == 0.0
    if Path("/proc/stat").exists():
        busy = cpu_busy_before_run(0.05)
        assert busy is not None and 0.0 <= busy <= 1.0


def _fake_proc_stat(monkeypatch, readings):
    import utils.timing

    # benchmark.main reads /proc/stat twice for the busy share before the run, twice for the steal during it.
    monkeypatch.setattr(utils.timing, "_cpu_times", lambda: utils.timing.CpuTicks(*readings.pop(0)))


def test_benchmark_warns_when_the_cpus_are_busy(tmp_path, monkeypatch, capsys):
    import benchmark

    readings = [(150, 1000, 0), (510, 1400, 0), (0, 0, 0), (0, 100, 0)]  # 360 of 400 ticks busy before the run
    _fake_proc_stat(monkeypatch, readings)
    report = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args(
        ["--quick", "--models", "--compare", str(tiny_onnx(tmp_path / "other.onnx")), "--json", str(report)])
    benchmark.main(args)
    assert "warning: 90% of the CPUs' time went to other work" in capsys.readouterr().err
    assert json.loads(report.read_text())["machine"]["cpu_busy_at_start"] == 0.9
    readings[:] = [(150, 1000, 0), (160, 1400, 0), (0, 0, 0), (0, 100, 0)]  # 10 of 400: 2.5 % busy
    benchmark.main(args)
    assert "warning" not in capsys.readouterr().err


def test_benchmark_warns_when_the_hypervisor_takes_cpu_time(tmp_path, monkeypatch, capsys):
    import benchmark

    # Idle before the run; during it 25 of 200 ticks stolen (12.5 %), then 4 of 200 (2 %).
    readings = [(0, 0, 0), (0, 100, 0), (500, 1000, 40), (690, 1200, 65)]
    _fake_proc_stat(monkeypatch, readings)
    report = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args(
        ["--quick", "--models", "--compare", str(tiny_onnx(tmp_path / "other.onnx")), "--json", str(report)])
    benchmark.main(args)
    err = capsys.readouterr().err
    assert "warning: the hypervisor took 12% of the CPUs' time during the timed run (steal)" in err
    assert "went to other work" not in err
    machine = json.loads(report.read_text())["machine"]
    assert machine["cpu_steal_during_run"] == 0.125 and machine["cpu_busy_at_start"] == 0.0
    readings[:] = [(0, 0, 0), (0, 100, 0), (500, 1000, 40), (690, 1200, 44)]
    benchmark.main(args)
    assert "warning" not in capsys.readouterr().err
    assert json.loads(report.read_text())["machine"]["cpu_steal_during_run"] == 0.02


def test_ratios_are_per_round_and_matched_by_setting(monkeypatch):
    import utils.timing as timing

    # Round medians: the model 5 then 12 ms, the baseline calls paired with it 10 then 20 ms ->
    # ratios 0.5, 0.6; the baseline's own row (its unpaired calls) 9 then 11 ms.
    own = {0: [[0.009], [0.011]], 1: [[0.005], [0.012]], 2: [[0.003], [0.003]]}
    paired = {1: [[0.010], [0.020]]}
    seen = {}

    def fake(fns, runs, warmup, rounds, partners):
        seen["partners"] = partners
        return ([[timing.Latency(t) for t in own[i]] for i in range(len(fns))],
                [[timing.Latency(t) for t in paired[i]] if i in paired else [None, None] for i in range(len(fns))])

    monkeypatch.setattr(timing, "prepare_config", lambda config: (lambda: None, None))
    monkeypatch.setattr(timing, "interleaved_latencies", fake)
    make = lambda: None  # noqa: E731
    configs = [timing.BenchConfig("base", "onnx_compare", 2, 1, (640, 640), None, make, baseline=True),
               timing.BenchConfig("v2", "onnx", 2, 1, (640, 640), 1, make),
               timing.BenchConfig("v2", "onnx", 1, 1, (640, 640), 1, make)]  # no baseline at 1 thread
    rows = timing.measure_configs(configs, runs=2, warmup=0, rounds=2)
    assert seen["partners"] == [0, 0, None]
    assert rows[0]["ratio"] == 1.0 and rows[0]["median_ms"] == pytest.approx(10.0)
    assert rows[1]["ratio"] == pytest.approx(0.55) and rows[1]["ratio_range"] == [0.5, 0.6]
    assert rows[2]["ratio"] is None and rows[1]["median_ms"] == pytest.approx(8.5)


def test_paired_blocks_follow_the_partner():
    from utils.timing import interleaved_latencies

    calls = []
    fns = [lambda: calls.append("base"), lambda: calls.append("a"), lambda: calls.append("b")]
    own, paired = interleaved_latencies(fns, runs=3, warmup=1, rounds=2, partners=[None, 0, None])
    assert calls[:3] == ["base", "a", "b"]  # warm-up
    # Every block: one untimed call, then 3 timed; "a" right after a block of its partner's.
    round_calls = ["base"] * 4 + ["base"] * 4 + ["a"] * 4 + ["b"] * 4
    assert calls[3:] == round_calls * 2
    assert [len(r) for r in own] == [2, 2, 2] and all(len(lat.times) == 3 for r in own for lat in r)
    assert paired[0] == [None, None] and paired[2] == [None, None]
    assert all(len(lat.times) == 3 for lat in paired[1])


@pytest.mark.slow
def test_benchmark_onnx_backend(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (torch.onnx.export(dynamo=True))")
    report = tmp_path / "bench.json"
    result = run_script("benchmark.py", "--quick", "--models", "v2", "--backends", "torch", "onnx",
                        "--json", str(report), timeout=600)
    assert result.returncode == 0, result.stderr
    backends = [r["backend"] for r in json.loads(report.read_text())["results"]]
    assert backends == ["torch", "onnx"]
