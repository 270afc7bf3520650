"""The documentation stands alone and its parameter table is the code's.

- No tracked .py or .md file points into the sibling `shared` folder's spec, which a user who
  clones the repository does not have; docs/ARCHITECTURE.md is the reference instead.
- The summary table of docs/ARCHITECTURE.md (section 0) lists every registered model, and its
  per-module and total parameter counts equal what `build_model` builds.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from data.config import CONFIGS
from models import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
# Split so that this file does not match its own search.
SPEC_REFERENCE = re.compile("shared" + "/spec")


def spec_references(root: Path, paths: List[str]) -> List[str]:
    """'path:line: text' for every line of `paths` (relative to root) that points into the shared spec folder."""
    hits = []
    for rel in paths:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if SPEC_REFERENCE.search(line):
                hits.append(f"{rel}:{number}: {line.strip()}")
    return hits


def tracked_sources() -> List[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot list tracked files")
    out = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "*.md"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]


def test_no_tracked_file_points_into_shared_spec():
    paths = tracked_sources()
    assert "README.md" in paths and "docs/ARCHITECTURE.md" in paths
    hits = spec_references(ROOT, paths)
    assert not hits, "point to docs/ARCHITECTURE.md instead of:\n" + "\n".join(hits)


def test_spec_reference_check_catches_a_reference(tmp_path):
    (tmp_path / "a.py").write_text('"""See ../shared' + '/spec/ARCHITECTURE.md."""\n')
    (tmp_path / "b.md").write_text("See docs/ARCHITECTURE.md.\n")
    assert spec_references(tmp_path, ["a.py", "b.md"]) == ["a.py:1: " + '"""See ../shared' + '/spec/ARCHITECTURE.md."""']


def _cells(line: str) -> List[str]:
    return [c.strip().strip("`*").strip() for c in line.strip().strip("|").split("|")]


def parameter_table(text: str) -> Dict[str, Dict[str, int]]:
    """The first Markdown table whose header is `module` followed by model names:
    {model: {row label: count}} (thousands separators and bold removed)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        header = _cells(line)
        if header[0] != "module" or not set(header[1:]) <= set(CONFIGS):
            continue
        table: Dict[str, Dict[str, int]] = {name: {} for name in header[1:]}
        for row in lines[i + 2:]:  # skip the |---| separator
            if not row.startswith("|"):
                break
            label, *values = _cells(row)
            assert len(values) == len(header) - 1, f"malformed row in {ARCHITECTURE.name}: {row}"
            for name, value in zip(header[1:], values):
                table[name][label] = int(value.replace(",", ""))
        return table
    raise AssertionError(f"{ARCHITECTURE} has no table headed '| module | <model names> |'")


@pytest.fixture(scope="module")
def documented() -> Dict[str, Dict[str, int]]:
    return parameter_table(ARCHITECTURE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def models():
    return {name: build_model(name) for name in CONFIGS}


def test_parameter_table_lists_every_model(documented):
    assert list(documented) == list(CONFIGS)


def test_parameter_table_totals_match_the_code(documented, models):
    for name, model in models.items():
        assert documented[name]["total"] == count_parameters(model), name


def test_parameter_table_modules_match_the_code(documented, models):
    for name, model in models.items():
        groups = {k: count_parameters(m) for k, m in model.module_groups().items()}
        rows = {k: v for k, v in documented[name].items() if k != "total"}
        assert rows == groups, name
        assert sum(rows.values()) == documented[name]["total"], name


def test_parameter_table_parser_reads_numbers():
    text = "x\n| module | v1 | v2 |\n|---|---|---|\n| `ssh` | 1,234 | 5 |\n| **total** | **1,234** | **5** |\n\nafter\n"
    assert parameter_table(text) == {"v1": {"ssh": 1234, "total": 1234}, "v2": {"ssh": 5, "total": 5}}


def readme_commands(text: str) -> List[str]:
    """The commands of the README's ```bash blocks, comments left out, continuation lines joined."""
    commands, in_bash, continued = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continued = False
            continue
        if in_bash and continued:
            commands[-1] = commands[-1].rstrip("\\ ") + " " + line.strip()
        elif in_bash and line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
        continued = in_bash and line.rstrip().endswith("\\")
    return commands


def test_readme_commands_name_files_that_exist_and_an_environment_that_has_them():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = readme_commands(text)
    assert commands[:2] == ['python3 -m venv .venv && .venv/bin/pip install -r requirements.txt',
                            '.venv/bin/python -m pytest -m "not slow" -q']  # what .ci/run runs
    plain = [c for c in commands if re.match(r"(python|tensorboard|torchrun)\b", c)]
    assert plain, "the README has no plain `python` commands: drop the activation sentence"
    # plain `python` is the venv's only when it is active: the set-up section must say so first
    activate = text.find(". .venv/bin/activate")
    assert 0 <= activate < text.find(plain[0]), "say how to activate .venv before the first plain command"
    packages = []  # folders that an earlier command's --deployment_package DIR writes
    for command in commands:
        for script in re.findall(r"(?:python|torchrun [^ ]+ [^ ]+) ([\w/]+\.py)\b", command):
            made = any(script == f"{folder}/usage_example.py" for folder in packages)
            assert made or (ROOT / script).is_file(), f"README runs a missing script: {command}"
        packages += re.findall(r"--deployment_package (?!-)(\S+)", command)
        for module in re.findall(r"python -m ([\w.]+)", command):
            if module not in ("venv", "pytest"):
                path = ROOT / module.replace(".", "/")
                assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), command
