"""The pre-flight data check runs in processes and caches decode outcomes by (path, size, mtime)."""
from __future__ import annotations

import os
import shutil

from data.check import cache_dir, check_dataset
from tests.conftest import ROOT

SAMPLE = ROOT / "data" / "sample"


def make_copies(tmp_path, copies: int):
    """A label file listing `copies` copies of each shipped sample photo (distinct files)."""
    images = tmp_path / "images"
    images.mkdir()
    records = SAMPLE.joinpath("label.txt").read_text().split("# ")[1:]
    lines = []
    for k in range(copies):
        for record in records:
            name, rest = record.split("\n", 1)
            new = f"{k}_{os.path.basename(name.strip())}"
            shutil.copy(SAMPLE / "images" / os.path.basename(name.strip()), images / new)
            lines.append(f"# {new}\n{rest}")
    label = tmp_path / "label.txt"
    label.write_text("".join(lines))
    return label, images


def test_parallel_check_equals_serial_and_is_cached(tmp_path, private_cache):
    label, images = make_copies(tmp_path, 4)  # 12 images: enough for a 2-process pool
    assert cache_dir().is_relative_to(private_cache)
    serial = check_dataset(label, num_workers=1, use_cache=False)
    cold = check_dataset(label, num_workers=2)
    assert serial.ok and cold.ok and (cold.num_images, cold.num_faces) == (serial.num_images, serial.num_faces)
    assert (cold.decoded, cold.cached) == (12, 0) and "images/s" in cold.timing()
    warm = check_dataset(label, num_workers=2)
    assert (warm.decoded, warm.cached) == (0, 12) and warm.ok
    assert not check_dataset(label, use_cache=False).cached  # use_cache=False decodes everything

    # a changed file (other size or mtime) is decoded again; the cache does not hide it
    (images / "0_group_8.jpg").write_bytes(b"\xff\xd8 not a jpeg any more")
    changed = check_dataset(label, num_workers=2)
    assert (changed.decoded, changed.cached) == (1, 11)
    assert not changed.ok and "cannot be decoded" in str(changed.problems[0])
    assert changed.bad_samples == {next(i for i, line in enumerate(label.read_text().split("# ")[1:])
                                        if line.startswith("0_group_8.jpg"))}
    os.remove(images / "1_astronaut.png")
    gone = check_dataset(label, num_workers=2)
    assert any("image not found" in str(p) for p in gone.problems) and gone.decoded == 0
