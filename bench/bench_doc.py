"""docs/benchmarks.md: each benchmark owns the section between its two markers and rewrites only that."""

from __future__ import annotations

from pathlib import Path

from recallfix.patches.io import atomic_write_text

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


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
