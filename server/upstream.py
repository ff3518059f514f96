"""The vLLM servers behind the front: where each is, whether it is up, and (for `recallfix serve`) the
child process that runs it.

An `Upstream` is an OpenAI-compatible vLLM server at a URL. The front probes its `/health`; a request
that cannot reach it marks it down at once. An `UpstreamProcess` is one `recallfix serve` started:
loopback only, a random API key, its own process group, stopped with the front (SIGTERM drains it; a
crash is logged with its exit status and last log lines, and counted).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 40  # of an upstream's output, kept to explain a crash


@dataclass(eq=False)
class Upstream:
    """One vLLM API server. `role` labels its metrics: base, patched, or shared (base and a LoRA adapter)."""

    role: str
    url: str
    api_key: str | None = None
    up: bool = False
    process: UpstreamProcess | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def probe(self, client: httpx.AsyncClient, timeout: float = 5.0) -> bool:
        """Whether /health answers 200 (and the process, if ours, is alive); updates `up`."""
        if self.process is not None and not self.process.alive:
            self.up = False
            return False
        try:
            response = await client.get(self.url + "/health", headers=self.headers(), timeout=timeout)
            self.up = response.status_code == 200
        except (httpx.HTTPError, OSError, AttributeError):
            # AttributeError: a server killed while the connection is being made can leave httpcore a stream whose
            # socket is gone (anyio's getpeername on None), seen under load in tests/test_faults.py; it is down.
            self.up = False
        return self.up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the front dies, even killed, so no orphan engine is left."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class UpstreamProcess:
    """A vLLM API server child process. Its output goes to the front's stderr, each line prefixed with
    `[role]`, and the last lines are kept to explain a crash."""

    def __init__(self, role: str, command: list[str], env: dict[str, str]) -> None:
        self.role, self.command, self.env = role, command, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.stopping = False
        self._reader: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self) -> UpstreamProcess:
        # A session of its own: a Ctrl-C in the terminal reaches the front only, which drains, then stops it.
        self.proc = subprocess.Popen(self.command, env={**os.environ, **self.env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._pump, name=f"upstream-{self.role}-log", daemon=True)
        self._reader.start()
        log.info("started vLLM (%s), pid %d: %s", self.role, self.proc.pid, " ".join(self._shown_command()))
        return self

    def _shown_command(self) -> list[str]:
        shown = list(self.command)
        if "--api-key" in shown:  # the key is a secret of the front's
            shown[shown.index("--api-key") + 1] = "***"
        return shown

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        prefix = f"[{self.role}] ".encode()
        for line in iter(self.proc.stdout.readline, b""):
            self.tail.append(line.decode(errors="replace").rstrip())
            try:
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed at shutdown: keep draining the pipe
                pass

    def crash_report(self) -> str:
        status = self.returncode
        how = f"signal {-status}" if status is not None and status < 0 else f"status {status}"
        tail = "\n".join(f"    {line}" for line in list(self.tail)[-15:])
        return f"vLLM ({self.role}) exited with {how}; its last lines:\n{tail}"

    async def wait_ready(self, upstream: Upstream, client: httpx.AsyncClient, timeout: float) -> None:
        """Until its /health answers 200. RuntimeError (with the crash report) if it exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(self.crash_report())
            if await upstream.probe(client, timeout=2.0):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"vLLM ({self.role}) did not become ready within {timeout:.0f} s")

    def terminate(self) -> None:
        """SIGTERM to the API server alone: it finishes its in-flight requests, then stops the engine
        processes it started (a signal to the whole group would stop the engine under those requests)."""
        self.stopping = True
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGTERM)

    async def stop(self, timeout: float = 30.0) -> None:
        self.terminate()
        deadline = time.monotonic() + timeout
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.alive:
            assert self.proc is not None
            log.warning("vLLM (%s) did not stop within %.0f s: killing it", self.role, timeout)
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait)
        if self._reader is not None:
            self._reader.join(timeout=5)
