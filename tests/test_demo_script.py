"""demo/demo.py, the script `make demo` runs: Ctrl-C stops it cleanly.

The signal comes while `recallfix serve` is starting its vLLM servers (once the first vLLM API server process
exists), so the test costs the start of a process, not a whole vLLM start. The script must end every process it
started (the front, and the vLLM servers the front runs in sessions of their own) and exit 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from recallfix.patches.cli import main as recallfix_main

pytestmark = [pytest.mark.real_model, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = "vllm.entrypoints.openai.api_server"


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_ctrl_c_while_the_server_starts_stops_every_process_and_exits_130(real_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert recallfix_main(["patch", "new", "--model", str(real_model_dir), "--edit", "L29H0=0.5",
                           "--out", str(run / "patch.json")]) == 0
    # The front's export cache in the test's directory, not the user's.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    demo = subprocess.Popen([sys.executable, str(ROOT / "demo" / "demo.py"), "--model", str(real_model_dir),
                             "--run", str(run), "--skip-analysis", "--name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not any(UPSTREAM in _cmdline(p) for p in _tree(demo.pid)):
            assert demo.poll() is None, demo.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no vLLM server started within 300 s"
            time.sleep(0.2)
        tree = _tree(demo.pid)  # the front, its vLLM server(s) and whatever they started so far
        assert any(UPSTREAM in _cmdline(p) for p in tree)
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
        output, _ = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:  # the test failed: leave nothing behind
            for process in [*_tree(demo.pid), psutil.Process(demo.pid)]:
                process.kill()
    assert demo.returncode == 130, output[-3000:]
    assert "[demo] SIGINT: stopping" in output
    assert "Traceback" not in output, output[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert not alive, [_cmdline(p) for p in alive]
    assert (run / "serve.log").stat().st_size > 0
