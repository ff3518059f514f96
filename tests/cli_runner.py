"""The `recallfix` command as the tests run it: in this process, or in a new one.

`recallfix(...)` calls `main()`, the function the console script calls, in this process: what it prints, logs and
returns comes back as a `subprocess.CompletedProcess`, as from a subprocess, without the seconds a new interpreter
spends importing torch and transformers (a test run made about a hundred such calls). `recallfix_process(...)` runs
`python -m recallfix.patches.cli` for the tests that need a process of its own (signals, a clean interpreter).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

from recallfix.patches.cli import main


def recallfix(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`recallfix ARGS` in this process, with `env` set for the call: (exit status, stdout, stderr)."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []  # main() sets up logging to the stderr of its call (logging.basicConfig)
    try:
        with mock.patch.dict(os.environ, env or {}), redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse's usage errors and --help
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    finally:
        root.handlers, root.level = handlers, level
    return subprocess.CompletedProcess(["recallfix", *argv], code, out.getvalue(), err.getvalue())


def recallfix_process(*args: str | Path, env: dict[str, str] | None = None,
                      timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`recallfix ARGS` in a new interpreter."""
    return subprocess.run([sys.executable, "-m", "recallfix.patches.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
