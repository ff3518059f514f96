"""Live `recallfix serve` processes for the server tests, and helpers to talk to them.

Servers run as subprocesses (vLLM spawns its engine core, so it cannot start inside pytest's process)
on a free loopback port. Each kind of server starts once per test session however many test modules
use it (pytest would run a session fixture once per importing module), and is stopped at exit.
"""

from __future__ import annotations

import atexit
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
# Built models are reused across sessions (the demo model takes minutes to train). Override in CI.
CACHE = Path(os.environ.get("RECALLFIX_TEST_CACHE", ROOT / ".cache" / "test-models"))
API_KEY = "test-key"
NAME = "demo"
START_TIMEOUT_S = 600  # a vLLM engine starts in ~25 s on an idle 2-core machine; shared CI is slower

# A minimal template (the demo model has none): enough to exercise /v1/chat/completions end to end.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Silence the demo model's last layer, where its hedging is planted (LoRA rank 64 over two projections).
PATCH_GAINS = {"L1H0": 0.0, "L1H1": 0.0, "L1MLP": 0.0}
OTHER_PATCH_GAINS = {"L1H0": 0.5}
_models: dict[str, Path] = {}  # built once per session
_running: list[Server] = []  # every server started, stopped at exit
_shared: dict[str, Server] = {}  # the session-wide servers, by engine
_scratch: list[Path] = []  # temporary directories, removed at exit

FACT_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The currency of Japan is the"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_model_dir() -> Path:
    """The tiny demo model: $RECALLFIX_TEST_DEMO_MODEL if set (a prebuilt one), else trained once into the
    cache and reused while its recipe is unchanged."""
    from recallfix.analysis.demo_model import build_demo_model

    if os.environ.get("RECALLFIX_TEST_DEMO_MODEL"):
        return Path(os.environ["RECALLFIX_TEST_DEMO_MODEL"])
    if "demo" not in _models:
        _models["demo"] = build_demo_model(CACHE / "demo-tiny", size="tiny", seed=0, progress=False)
    return _models["demo"]


def tiny_model_dir(arch: str) -> Path:
    from tiny import save_model

    out = CACHE / f"tiny-{arch}"
    if not (out / "model.safetensors").exists():
        save_model(arch, out)
    return out


def patch_file(model_dir: Path, gains: dict[str, float], out: Path) -> Path:
    from recallfix.patches import make_patch
    from recallfix.patches.io import load_causal_lm

    model, _ = load_causal_lm(model_dir)
    return make_patch(model, gains, command="tests").save(out)


def _die_with_parent() -> None:
    """In the child, on Linux: SIGTERM it when the test process dies, even killed (no orphan servers in CI).
    vLLM's engine processes follow their parent on their own."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Server:
    """A `python -m recallfix.server` subprocess."""

    args: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        # One torch thread: tiny models gain nothing from more, and on a shared 2-core machine spinning
        # OpenMP threads make requests 10-100x slower. vLLM's CPU KV cache: 1 GiB per engine.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w") as log:
            # A session of its own: stop() ends the server and the engine processes vLLM spawned.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "recallfix.server", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _running.append(self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, path: str = "/ready", timeout: float = START_TIMEOUT_S) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
                if httpx.get(self.url + "/health", timeout=2).status_code == 503:  # the engine died
                    raise RuntimeError(f"the server's engine is down:\n{self.log()[-5000:]}")
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.url}{path} not 200 after {timeout} s:\n{self.log()[-5000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # graceful: uvicorn shuts the engine down
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    # -- talking to it ---------------------------------------------------------------------------------
    def client(self, **kwargs):  # noqa: ANN201 (openai.OpenAI)
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", API_KEY), max_retries=0,
                             timeout=120, **kwargs)

    def post(self, path: str, body: dict, key: str | None = API_KEY, timeout: float = 120,
             **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=timeout, **kwargs)

    def get(self, path: str, key: str | None = API_KEY) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(self.url + path, headers=headers, timeout=60)

    def metrics_text(self) -> str:
        response = httpx.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        return response.text

    def metrics(self) -> Metrics:
        return Metrics.parse(self.metrics_text())


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


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2):  # noqa: ANN001, ANN201
    """Poll until `predicate()` is truthy (for background work such as shadow scoring); return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)




@atexit.register
def _stop_all() -> None:
    for server in _running:
        server.stop()
    for path in _scratch:
        shutil.rmtree(path, ignore_errors=True)


def shared_server(*kinds: str) -> Server:
    """The session's server of each kind ("vllm", "transformers": the demo model and its patch, the same
    options), started on first use (all kinds asked for at once, so their starts overlap) and kept for
    the session. Returns the first kind's."""
    for kind in kinds:
        if kind not in _shared:
            _shared[kind] = Server(_shared_args(kind), CACHE / "server-tests" / f"{kind}.log").start()
    for kind in kinds:
        _shared[kind].wait()
    return _shared[kinds[0]]


def _shared_args(kind: str) -> list[str]:
    model = demo_model_dir()
    work = scratch_dir()
    patch = patch_file(model, PATCH_GAINS, work / "demo-patch.json")
    template = work / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    return [
        "--model", str(model), "--patch", str(patch), "--engine", kind, "--served-model-name", NAME,
        "--api-key", API_KEY, "--chat-template", str(template), "--dtype", "float32", "--max-model-len", "128",
        "--shadow-rate", "1.0", "--ab-split", "0.3", "--max-concurrency", "4", "--cache-dir", str(work / "cache"),
    ]


def scratch_dir() -> Path:
    """A fresh directory for this session (export caches), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="recallfix-server-test-"))
    _scratch.append(path)
    return path


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data of a server-sent-event stream: parsed JSON, or the raw text ('[DONE]')."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
