"""A normal (non-editable) install ships every module and data file of the three code folders, its build prints no
setuptools warning, and `recallfix --help` says what the tool does."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"patches": "recallfix/patches", "analysis": "recallfix/analysis", "server": "recallfix/server"}


def test_wheel_contains_every_module_and_data_file(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # e.g. "Package 'recallfix.analysis.checks' is absent from the `packages` configuration": a folder of data
    # files that pyproject's package list leaves out (it shipped all the same, with a page of warning).
    assert "Warning" not in done.stderr, done.stderr
    (wheel,) = tmp_path.glob("recallfix-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, package in FOLDERS.items()
        for pattern in ("*.py", "*.json", "*.md")
        for path in (ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    assert expected - shipped == set()
    # The vendored LRE relations ship whole: every file, byte for byte, with the licence the MIT terms require.
    lre = ROOT / "analysis" / "data" / "lre"
    files = sorted(lre.iterdir())
    assert {"LICENSE", "README.md"} <= {f.name for f in files} and len([f for f in files if f.suffix == ".json"]) == 18
    with zipfile.ZipFile(wheel) as z:
        for f in files:
            assert z.read(f"recallfix/analysis/data/lre/{f.name}") == f.read_bytes(), f.name
    entry_points = next(n for n in shipped if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "recallfix = recallfix.patches.cli:main" in text


def test_help_opens_with_what_recallfix_does() -> None:
    done = subprocess.run([sys.executable, "-m", "recallfix.patches.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    description = " ".join(done.stdout.split("\n\n")[1].split())  # the paragraph after the usage lines
    assert description == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    assert "console script" not in done.stdout
