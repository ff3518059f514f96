"""What a long run shows while it works: tqdm bars, and `[analyze]` lines that do not break them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, progress: bool, desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm bar over items when asked for and stderr is a terminal (a log file gets no \\r frames)."""
    # disable=None: tqdm itself turns the bar off when its output is not a TTY.
    return tqdm(items, total=total, desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)


def log(progress: bool, message: str) -> None:
    """One `[analyze]` line on stderr, printed above any bar (when `progress`)."""
    if progress:
        tqdm.write(f"[analyze] {message}")
