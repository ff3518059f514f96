"""Live servers for the server tests, on SmolLM2-135M-Instruct (real weights), and helpers to talk to them.

Each server is a subprocess on a free loopback port: vLLM's own OpenAI server started directly (the
reference the front is compared with), `recallfix serve` in each patch mode, and `recallfix router`.
Each kind starts once per test session however many modules use it (pytest would run a session fixture
once per importing module); all asked for at once start together, and all stop at exit.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RECALLFIX_TEST_CACHE", ROOT / ".cache" / "test-models"))
API_KEY = "test-key"
NAME = "smol"
START_TIMEOUT_S = 1800  # a vLLM CPU server starts in 1-3 min on an idle 2-core machine; far slower when shared
# The patch `recallfix analyze` learned on this model (real-models.md): four heads of the last layer.
PATCH_GAINS = {"L29H0": 0.40, "L29H4": 1.28, "L29H5": 1.07, "L29H7": 1.31}
OTHER_PATCH_GAINS = {"L29H0": 0.2, "L29H4": 1.5}
FACT_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The currency of Japan is the"]
# vLLM options every server in the tests gets (the front passes them on unchanged): float32 for the
# comparison with Hugging Face, a short context, eager mode (no compile: a faster start), the tool parser
# the battery's tool call needs.
VLLM_OPTIONS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0",
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]

_running: list[Process] = []  # every server started, stopped at exit
_shared: dict[str, Process] = {}  # the session-wide servers, by kind
_scratch: list[Path] = []  # temporary directories, removed at exit
_made: dict[str, Path] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the model and its patches ---------------------------------------------------------------------------
@functools.cache
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors checkpoint: $RECALLFIX_TEST_SMOLLM2, or the model
    registry's cached copy (`recallfix model get smollm2-135m`, which `make test` runs first)."""
    if os.environ.get("RECALLFIX_TEST_SMOLLM2"):
        return Path(os.environ["RECALLFIX_TEST_SMOLLM2"])
    from recallfix.patches.io import resolve_model_dir

    return resolve_model_dir("smollm2-135m")


def patch_file(gains: dict[str, float], name: str) -> Path:
    """A patch of SmolLM2-135M with these gains, made once per session."""
    if name not in _made:
        from recallfix.patches import make_patch
        from recallfix.patches.io import load_causal_lm

        model, _ = load_causal_lm(smollm2_dir())
        _made[name] = make_patch(model, gains, command="tests").save(scratch_dir("patches") / f"{name}.json")
    return _made[name]


def merged_dir(gains: dict[str, float], name: str) -> Path:
    from recallfix.patches import Patch
    from recallfix.patches.export import export_merged

    out = scratch_dir("merged") / name
    if not out.exists():
        export_merged(smollm2_dir(), Patch.load(patch_file(gains, name)), out)
    return out


def scratch_dir(name: str) -> Path:
    """A directory of this session (export caches, patches), removed at exit."""
    if not _scratch:
        _scratch.append(Path(tempfile.mkdtemp(prefix="recallfix-server-test-")))
    path = _scratch[0] / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- processes -------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child, on Linux: SIGTERM it when the test process dies, even killed (no orphans in CI)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Process:
    """A server subprocess: `recallfix serve|router ...` or vLLM's own API server."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    key: str | None = API_KEY

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Process:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
               **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, *self.args, "--port", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        _running.append(self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, path: str = "/ready", timeout: float = START_TIMEOUT_S) -> Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.url}{path} not 200 after {timeout} s:\n{self.log()[-5000:]}")

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # the front drains, then stops its vLLM servers
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode

    # -- talking to it ---------------------------------------------------------------------------------
    def client(self, **kwargs):  # noqa: ANN201 (openai.OpenAI)
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", self.key or "none"),
                             max_retries=0, timeout=300, **kwargs)

    def headers(self, key: str | None = "default") -> dict[str, str]:
        key = self.key if key == "default" else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: dict, key: str | None = "default", **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers(key), timeout=300, **kwargs)

    def post_stream(self, path: str, body: dict):  # noqa: ANN201 (a context manager of httpx.Response)
        return httpx.stream("POST", self.url + path, json=body, headers=self.headers(), timeout=300)

    def get(self, path: str, key: str | None = "default") -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(key), timeout=60)

    def metrics_text(self) -> str:
        response = httpx.get(self.url + "/metrics", timeout=60)
        response.raise_for_status()
        return response.text

    def metrics(self) -> Metrics:
        return Metrics.parse(self.metrics_text())


def vllm_server(model: Path, served_name: str, log_name: str) -> Process:
    """vLLM's own OpenAI API server, started directly: the reference."""
    return Process(["-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
                    served_name, "--host", "127.0.0.1", *VLLM_OPTIONS],
                   CACHE / "server-tests" / f"{log_name}.log", key=None,
                   env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})


def serve_process(mode: str, *, kv_auto: bool = False) -> Process:
    """`recallfix serve` of SmolLM2-135M with the learned patch, in one patch mode."""
    patch = patch_file(PATCH_GAINS, "learned")
    args = ["-m", "recallfix.server", "serve", str(smollm2_dir()), "--patch", str(patch), "--patch-mode", mode,
            "--served-model-name", NAME, "--api-key", API_KEY, "--shadow-rate", "1.0", "--ab-split", "0.3",
            "--max-concurrency", "8", "--cache-dir", str(scratch_dir("cache")), *VLLM_OPTIONS]
    # merged: the KV cache sized by recallfix from the free memory (no flag: the default start).
    env = {} if kv_auto else {"VLLM_CPU_KVCACHE_SPACE": "1"}
    return Process(args, CACHE / "server-tests" / f"serve-{mode}.log", env=env)


def _make(kind: str) -> Process:
    if kind == "vllm-base":
        return vllm_server(smollm2_dir(), NAME, kind)
    if kind == "vllm-merged":
        return vllm_server(merged_dir(PATCH_GAINS, "learned"), f"{NAME}:patched", kind)
    if kind == "serve-merged":
        return serve_process("merged", kv_auto=True)
    if kind == "serve-lora":
        return serve_process("lora")
    raise ValueError(kind)


ALL_KINDS = ("vllm-base", "vllm-merged", "serve-merged", "serve-lora")


def shared(*kinds: str) -> list[Process]:
    """The session's servers of these kinds, started on first use and kept: the ones asked for at once
    start together (a vLLM start is minutes, much of it waiting), then each is waited for."""
    for kind in kinds:
        if kind not in _shared:
            _shared[kind] = _make(kind).start()
    for kind in kinds:
        _shared[kind].wait("/ready" if kind.startswith("serve") else "/health")
    return [_shared[kind] for kind in kinds]


@atexit.register
def _stop_all() -> None:
    for server in _running:
        server.stop(timeout=30)
    for path in _scratch:
        shutil.rmtree(path, ignore_errors=True)


# -- reading replies -------------------------------------------------------------------------------------
class Metrics:
    """Samples of one /metrics scrape, looked up by name and a subset of labels."""

    def __init__(self, samples: list[tuple[str, dict[str, str], float]]) -> None:
        self.samples = samples

    @classmethod
    def parse(cls, text: str) -> Metrics:
        return cls([(s.name, dict(s.labels), s.value)
                    for family in text_string_to_metric_families(text) for s in family.samples])

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        return sum(v for n, lab, v in self.samples if n == name and all(lab.get(k) == w for k, w in labels.items()))

    def delta(self, before: Metrics, name: str, **labels: str) -> float:
        return self.value(name, **labels) - before.value(name, **labels)


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.5):  # noqa: ANN001, ANN201
    """Poll until `predicate()` is truthy (for background work such as shadow scoring); return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data of a server-sent-event stream: parsed JSON, or the raw text ('[DONE]')."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
