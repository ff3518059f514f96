"""Run the `recallfix` CLI so that it stops, and stays stopped, at a chosen point of writing its output.

    python held.py POINT MARKER ARG...    (ARG...: what `recallfix` would take)

Every output directory of recallfix is written as a scratch directory beside it (`patches.io.atomic_directory`).
POINT is where the writer stops:

    commit    all written into its scratch directory, before `commit_directory` makes it the real one
    cleanup   as it starts, right after it removed what a writer killed before it left (`remove_stale_scratch`
              removed something)

There it writes MARKER (its pid) and sleeps until it is killed. The fault tests kill it there, whatever the
machine's speed: a writer polled from outside can finish between two polls on a fast machine, or be killed before
it wrote anything on a slow one.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recallfix.patches import io
from recallfix.patches.cli import main


def hold() -> None:
    Path(sys.argv[2]).write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(3600)


def hold_after_cleanup(remove: Callable[[Path], list[Path]]) -> Callable[[Path], list[Path]]:
    def removing(target: Path) -> list[Path]:
        removed = remove(target)
        if removed:
            hold()
        return removed

    return removing


def holding(*_args: Any) -> None:
    hold()


if __name__ == "__main__":
    point = sys.argv[1]
    if point == "commit":
        io.commit_directory = holding
    elif point == "cleanup":
        io.remove_stale_scratch = hold_after_cleanup(io.remove_stale_scratch)
    else:
        sys.exit(f"held.py: POINT must be commit or cleanup, not {point!r}")
    sys.exit(main(sys.argv[3:]))
