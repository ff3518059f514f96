"""Run the `recallfix` CLI so that it stops, and stays stopped, where a directory it writes would appear.

    python held.py MARKER ARG...    (ARG...: what `recallfix` would take)

Every output directory of recallfix is written as a scratch directory that `patches.io.commit_directory` makes the
real one in one step. Here that step is replaced: the writer has written everything into its scratch, writes
MARKER (its pid) and sleeps until it is killed. The fault tests kill it there, whatever the machine's speed: a
writer polled from outside can finish between two polls on a fast machine, or be killed before it wrote anything.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from recallfix.patches import io
from recallfix.patches.cli import main


def hold(scratch: Path, out: Path) -> None:
    marker = Path(sys.argv[1])
    marker.write_text(f"{os.getpid()} {scratch} {out}\n")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    io.commit_directory = hold
    sys.exit(main(sys.argv[2:]))
