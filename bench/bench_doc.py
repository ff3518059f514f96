"""docs/benchmarks.md: each benchmark owns the section between its two markers and rewrites only that."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from recallfix.patches.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def machine(*versions: str) -> str:
    """The CPU, its cores, the given package versions ("vllm 0.32.0") and Python: the head of every section."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return ", ".join([cpu, f"{os.cpu_count()} cores", *versions, f"Python {platform.python_version()}"])


def number(x: float, digits: int = 2) -> str:
    """`x` with `digits` decimals, or two significant digits where those decimals would show a nonzero value as 0
    (a fast machine's time)."""
    text = f"{x:.{digits}f}"
    return f"{x:.2g}" if x != 0 and float(text) == 0 else text


def spread(values: list[float], digits: int = 2) -> str:
    """Median [min-max] of a side's runs."""
    import statistics

    return f"{number(statistics.median(values), digits)} [{number(min(values), digits)}-{number(max(values), digits)}]"


def commit(*paths: str) -> str:
    """The checkout's commit, marked when `paths` (default: all but this doc, which the benchmarks themselves
    rewrite) have uncommitted changes."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                            *(paths or (".", f":!{DOC.relative_to(ROOT)}"))], capture_output=True, text=True)
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(name: str, section: str) -> None:
    """Replace the section between `name`'s markers (appended when absent); `section` includes the markers."""
    begin, end = markers(name)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(DOC, text)
