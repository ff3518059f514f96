"""Live servers for the server tests, on SmolLM2-135M-Instruct (real weights), and helpers to talk to them.

Four kinds of server, on free loopback ports, each started at most once per session:

    serve-lora     `recallfix serve --patch-mode lora` with the learned gains (one vLLM server, LoRA)
    serve-merged   `recallfix serve` (auto) with the learned gains and the paper's bias edit: auto picks
                   merged, as LoRA cannot carry a bias (two vLLM servers)
    vllm-base      vLLM's own OpenAI server on the base checkpoint, started on its own: the reference the
                   front is compared with
    vllm-merged    the vLLM server serve-merged runs for its patched variant (vLLM's own OpenAI server on
                   the merged checkpoint), asked directly, past the front

A test names the kinds it needs with `@pytest.mark.servers(...)` and gets them from the `servers` fixture
(or `shared(...)` in a module fixture). Tests are ordered so that each kind serves one run of tests
(the LoRA server's first, the merged server's swap last), the next group's servers start while a group runs,
and each kind stops after the last test that needs it: a 2-core, 24 GiB machine never holds more of them than
fits (MAX_MEMORY_GIB), and no vLLM server starts twice. Under pytest-xdist (`make test`) all these tests run on one
worker, first, and every other test on the other worker meanwhile.
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
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RECALLFIX_TEST_CACHE", ROOT / ".cache" / "test-models"))
API_KEY = "test-key"
NAME = "smol"
START_TIMEOUT_S = 2400  # a vLLM CPU server starts in 1-3 min on an idle 2-core machine; far slower when shared
TEST_TIMEOUT_S = 900  # pyproject's pytest timeout, which a test that starts servers gets on top of START_TIMEOUT_S
# The patch `recallfix analyze` learned on this model (real-models.md): four heads of the last layer.
PATCH_GAINS = {"L29H0": 0.40, "L29H4": 1.28, "L29H5": 1.07, "L29H7": 1.31}
OTHER_PATCH_GAINS = {"L29H0": 0.2, "L29H4": 1.5}
LAST_LAYER = 29
LAST_MLP = f"L{LAST_LAYER}MLP"  # where the paper's fix adds its bias
FACT_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "The currency of Japan is the"]
# vLLM options every server in the tests gets (the front passes them on unchanged): float32 for the
# comparison with Hugging Face, a short context, eager mode (no compile: a faster start), the tool parser
# the battery's tool call needs.
VLLM_OPTIONS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0",
                "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
# A small KV cache (256 MiB: about 5,800 tokens of SmolLM2 in float32, 11 full 512-token sequences) for every
# server but serve-lora, which starts with recallfix's own sizing from the free memory (no flag).
SMALL_KV = ["--kv-cache-memory-bytes", str(256 * 2**20)]

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
    from recallfix.patches.registry.models import resolve_model

    return resolve_model("smollm2-135m")


@functools.cache
def hf_model():  # noqa: ANN201 (a transformers model and its tokenizer)
    """SmolLM2-135M in float32 on Hugging Face, loaded once for the session (patches, parity)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir())


def intercept_bias():  # noqa: ANN201 (a [hidden_size] tensor)
    """A bias edit in the manner of the paper's fix: minus the final MLP's mean write at the last position of
    the fact prompts (its shared, prompt-independent part)."""
    import torch

    from recallfix.patches import ComponentMap
    from recallfix.patches.hooks import capture

    model, tokenizer = hf_model()
    point = f"blocks.{LAST_LAYER}.hook_mlp_out"
    writes = []
    with torch.no_grad():
        for prompt in FACT_PROMPTS:
            with capture(ComponentMap(model), [point]) as cache:
                model(**tokenizer(prompt, return_tensors="pt"))
            writes.append(cache[point][0, -1])
    return -torch.stack(writes).mean(dim=0)


def patch_file(name: str) -> Path:
    """A patch of SmolLM2-135M, made once per session: `learned` (PATCH_GAINS), `other` (OTHER_PATCH_GAINS),
    `fix` (PATCH_GAINS and the intercept bias), `bias` (the intercept bias alone)."""
    if name not in _made:
        from recallfix.patches import make_patch

        gains = {"learned": PATCH_GAINS, "other": OTHER_PATCH_GAINS, "fix": PATCH_GAINS, "bias": {}}[name]
        biases = {LAST_MLP: intercept_bias()} if name in ("fix", "bias") else None
        patch = make_patch(hf_model()[0], gains, biases=biases, command="tests")
        _made[name] = patch.save(scratch_dir("patches") / f"{name}.json")
    return _made[name]


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
        # The front passes its environment to its vLLM servers. One OpenMP thread per vLLM engine: up to four
        # engines share two cores here, and an engine's threads wait at each barrier for a peer that is not
        # scheduled (with vLLM's default, a thread per core, generation fell to 0.1 tokens/s on a busy machine; with
        # one thread it ran at 7 tokens/s under the same load). The model in the engine-core process (vLLM's "uni"
        # executor, as demo/demo.py runs it): no worker process of its own, whose engine core waits for it spinning
        # on a core, and one process fewer per engine (0.7 GiB each).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1",
               "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **self.env}
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

    def post(self, path: str, body: dict, key: str | None = "default", timeout: float = 300,
             **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers(key), timeout=timeout, **kwargs)

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
                    served_name, "--host", "127.0.0.1", *VLLM_OPTIONS, *SMALL_KV],
                   CACHE / "server-tests" / f"{log_name}.log", key=None,
                   env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})


# The calibrators serve-lora applies (`calibration_file`): a Platt map for the base model, a logistic one for the
# learned gains; their numbers are arbitrary but fixed, so a test can compute what each reply must say.
BASE_CALIBRATOR = {"family": "platt", "features": ["logit_p1"], "coef": [0.8, -0.6]}
PATCHED_CALIBRATOR = {"family": "logistic-tail", "features": ["log_p1", "log1m_p1", "margin", "entropy", "log_tail"],
                      "coef": [0.7, -0.2, 0.2, -0.3, -0.1, -0.4]}


def calibration_file() -> Path:
    """A calibration file of SmolLM2-135M (its fingerprint) with calibrators for the base model and the learned
    gains: what serve-lora serves with `--calibration`."""
    path = scratch_dir("calibration") / "calibration.json"
    if not path.exists():
        from recallfix.patches import Patch
        from recallfix.patches.calibrator import (
            CalibrationFile,
            Calibrator,
            VariantCalibration,
            final_block_fingerprint,
        )
        from recallfix.patches.patch import Provenance

        CalibrationFile(model=final_block_fingerprint(smollm2_dir()), fitted_on="tests",
                        variants={"base": VariantCalibration(patch_id=None, calibrator=Calibrator(**BASE_CALIBRATOR)),
                                  "gains": VariantCalibration(patch_id=Patch.load(patch_file("learned")).id,
                                                              calibrator=Calibrator(**PATCHED_CALIBRATOR))},
                        recommended="gains", provenance=Provenance(tool_version="tests")).save(path)
    return path


def serve_process(kind: str) -> Process:
    """`recallfix serve` of SmolLM2-135M: serve-lora (the learned gains as a LoRA adapter; no KV cache flag,
    so recallfix sizes it from the free memory: the default start; with `calibration_file`'s calibrators), or
    serve-merged (the learned gains and the paper's bias edit, --patch-mode auto)."""
    mode, patch = ("lora", patch_file("learned")) if kind == "serve-lora" else ("auto", patch_file("fix"))
    calibration = ["--calibration", str(calibration_file())] if kind == "serve-lora" else []
    args = ["-m", "recallfix.server", "serve", str(smollm2_dir()), "--patch", str(patch), "--patch-mode", mode,
            *calibration,
            "--served-model-name", NAME, "--api-key", API_KEY, "--shadow-rate", "1.0", "--ab-split", "0.3",
            "--max-concurrency", "8", "--cache-dir", str(scratch_dir("cache")),
            "--upstream-start-timeout", str(START_TIMEOUT_S), *VLLM_OPTIONS,
            *([] if kind == "serve-lora" else SMALL_KV)]
    return Process(args, CACHE / "server-tests" / f"{kind}.log")


class Upstream(Process):
    """A vLLM server that a `recallfix serve` front started for one of its variants, asked directly: its port and
    API key read from its command line. The front owns it: `stop` leaves it alone."""

    @classmethod
    def of(cls, front: Process, served_name: str) -> Upstream:
        import psutil

        for child in psutil.Process(front.proc.pid).children():
            argv = child.cmdline()
            if "--served-model-name" in argv and argv[argv.index("--served-model-name") + 1] == served_name:
                return cls([], front.log_path, port=int(argv[argv.index("--port") + 1]),
                           key=argv[argv.index("--api-key") + 1])
        raise RuntimeError(f"{front.url} runs no vLLM server for {served_name!r}")

    def wait(self, path: str = "/health", timeout: float = START_TIMEOUT_S) -> Process:
        assert httpx.get(self.url + path, headers=self.headers(), timeout=30).status_code == 200
        return self

    def stop(self, timeout: float = 60) -> int | None:
        return None


def _make(kind: str) -> Process:
    if kind == "vllm-base":
        return vllm_server(smollm2_dir(), NAME, kind)
    if kind in ("serve-lora", "serve-merged"):
        return serve_process(kind)
    raise ValueError(f"unknown server kind {kind!r}: one of {', '.join(KINDS)}")


KINDS = ("serve-lora", "vllm-base", "vllm-merged", "serve-merged")
# Kinds that are a vLLM server of a front's, not a process of their own: (that front's kind, the served name).
UPSTREAMS = {"vllm-merged": ("serve-merged", f"{NAME}:patched")}
PATCH_OF = {"serve-lora": "learned", "serve-merged": "fix"}  # the patch each `recallfix serve` starts with
_stopped: set[str] = set()
_failed: dict[str, str] = {}  # kind -> why it did not start (later tests fail at once, pointing at the first)


def shared(*kinds: str) -> list[Process]:
    """The session's servers of these kinds, started on first use: the ones asked for at once start
    together, then each is waited for. A kind whose last test has run is stopped and never started again."""
    wanted = with_fronts(kinds)
    for kind in wanted:
        if kind in _failed:
            raise RuntimeError(f"the {kind} server did not start ({_failed[kind]}): see the first test that needed it")
        if kind in _stopped:
            raise RuntimeError(f"the {kind} server was stopped after what was thought its last test; a test "
                               "that needs it must say so with @pytest.mark.servers")
        if kind not in _shared and kind not in UPSTREAMS:
            _shared[kind] = _make(kind).start()
            _started_at[kind] = time.monotonic()
    for kind in wanted:
        try:
            if kind in UPSTREAMS and kind not in _shared:  # its front is ready (waited for before it)
                _shared[kind] = Upstream.of(_shared[UPSTREAMS[kind][0]], UPSTREAMS[kind][1])
            _shared[kind].wait("/ready" if kind.startswith("serve") else "/health")
        except (RuntimeError, TimeoutError) as err:
            _failed[kind] = f"{type(err).__name__}, log {_shared[kind].log_path}"
            stop(kind)
            raise
        if kind in _started_at:
            what = f"{kind} (started ahead, beside other tests: to its first use)" if kind in _ahead else kind
            START_TIMES.append((what, time.monotonic() - _started_at.pop(kind)))
    return [_shared[kind] for kind in kinds]


_started_at: dict[str, float] = {}
_ahead: set[str] = set()  # kinds started before the test that first needs them (their time includes waiting)
START_TIMES: list[tuple[str, float]] = []  # (what, seconds from start to ready), shown at the end of the run


def stop(kind: str) -> None:
    if kind in _shared:
        _shared.pop(kind).stop()
    _stopped.add(kind)


# -- pytest: which servers a test needs, the order that serves them, and when each stops -------------------
def with_fronts(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """`kinds`, each front that owns one of them (UPSTREAMS) before it."""
    return tuple(dict.fromkeys(k for kind in kinds for k in ((UPSTREAMS[kind][0], kind) if kind in UPSTREAMS
                                                             else (kind,))))


def needs(item: pytest.Item) -> tuple[str, ...]:
    """The server kinds an item's `servers` marks name (module, class and parameter marks included), with the
    fronts that run them."""
    kinds: list[str] = []
    for mark in item.iter_markers("servers"):
        kinds += [k for k in mark.args if k not in kinds]
    return with_fronts(tuple(kinds))


def rank(item: pytest.Item, long_modules: set[str]) -> tuple[int, ...]:
    """The live-server tests first: the LoRA server's, then the merged server's beside vLLM's own servers, then
    the merged server's alone. Within a group the tests that need the session's analysis run of the real model
    come after the others (under pytest-xdist the other worker makes it meanwhile), and the tests that swap a
    server's patch last. Then every other test, module by module, the modules that run vLLM or the real model
    (`long_modules`: the long ones, for the other worker to start with) first."""
    kinds = set(needs(item))
    if not kinds:
        return 1, item.module.__name__ not in long_modules
    group = 1 if "serve-lora" in kinds else 2 if kinds & {"vllm-base", "vllm-merged"} else 3
    return (0, group, "real_run" in getattr(item, "fixturenames", ()),
            item.get_closest_marker("swaps_patch") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"servers(*kinds): the live servers the test needs ({', '.join(KINDS)})")
    config.addinivalue_line("markers", "swaps_patch: the test changes the patch a shared server serves")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): every test that needs a live server is in
    one group, run on one worker in the order below (each server starts once); every other module is a group of
    its own (its module fixtures made once), run on the other worker meanwhile. A live server runs vLLM on the
    real model: its tests are `vllm` and `real_model` tests too (`make check` leaves both out). A test that names
    its group keeps it (pytest-xdist would join both names): `xdist_group("servers")` runs a test that holds too much
    memory to run beside the servers on their worker, after the last of them has stopped (`rank`)."""
    if needs(item):
        item.add_marker(pytest.mark.vllm)
        item.add_marker(pytest.mark.real_model)
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group("servers" if needs(item) else item.nodeid.split("::")[0]))


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    long_modules = {item.module.__name__ for item in items
                    if item.get_closest_marker("vllm") or item.get_closest_marker("real_model")}
    items.sort(key=lambda item: rank(item, long_modules))  # stable: each group keeps its order
    for item in items:
        if needs(item):  # the first test of a group waits for its servers to start: their timeout on top
            item.add_marker(pytest.mark.timeout(START_TIMEOUT_S + TEST_TIMEOUT_S))


_last_user: dict[str, str] = {}
_prestart: dict[str, tuple[str, ...]] = {}  # nodeid -> kinds to start (not wait for) before it runs
# Memory each kind holds (GiB, its processes' RSS with the uni executor, rounded up): serve-lora sizes its KV cache
# from the free memory (up to 4 GiB), the others have SMALL_KV.
MEMORY_GIB = {"serve-lora": 7, "vllm-base": 3, "vllm-merged": 0, "serve-merged": 6}
# What the live servers may hold at once on a 24 GiB machine beside the test processes: under pytest-xdist the other
# worker runs vLLM engines and analyses of its own meanwhile, so a group's servers start only when it begins.
MAX_MEMORY_GIB = 10 if os.environ.get("PYTEST_XDIST_WORKER") else 16


def pytest_collection_finish(session: pytest.Session) -> None:
    items = session.items
    if session.config.getoption("loadgroup", default=False):  # a pytest-xdist worker of `--dist loadgroup`
        split = [item.nodeid for item in items if needs(item) and not item.nodeid.endswith("@servers")]
        if split:  # each worker would start its own servers: twice the memory of a 24 GiB machine
            raise pytest.UsageError(f"pytest-xdist did not group the live-server tests ({split[0]}): "
                                    "pytest 9.2 breaks --dist loadgroup (pytest-dev/pytest-xdist#1386)")
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        for kind in needs(item):
            first.setdefault(kind, i)
            _last_user[kind] = item.nodeid
    last = {kind: next(i for i, item in enumerate(items) if item.nodeid == nodeid)
            for kind, nodeid in _last_user.items()}
    # While a group of tests runs on its servers, the next group's servers start beside them: an engine's start
    # (1-4 min here) is mostly not CPU-bound, so starting them together saves a start's wait per group.
    for i, item in enumerate(items):
        if not needs(item):
            continue
        live = {kind for kind in first if first[kind] <= i <= last[kind]}
        new = next((set(needs(later)) - live for later in items[i + 1:] if set(needs(later)) - live), set())
        if new and sum(MEMORY_GIB[k] for k in live | new) <= MAX_MEMORY_GIB:
            _prestart[item.nodeid] = tuple(k for k in KINDS if k in new)
    # The first group's servers start as its first test begins, before that test's own fixtures, which then run
    # beside the start.
    first_user = next((item for item in items if needs(item)), None)
    if first_user is not None:
        _prestart[first_user.nodeid] = (*needs(first_user), *_prestart.get(first_user.nodeid, ()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    for kind in _prestart.get(item.nodeid, ()):
        if kind not in _shared and kind not in _stopped and kind not in _failed and kind not in UPSTREAMS:
            _shared[kind] = _make(kind).start()
            _started_at[kind] = time.monotonic()
            _ahead.add(kind)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    for kind, last in _last_user.items():
        if last == item.nodeid and kind in _shared:
            stop(kind)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its controller prints them
        session.config.workeroutput["server_starts"] = START_TIMES


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # noqa: ANN001 (pytest-xdist's hook, on the controller)
    START_TIMES.extend(tuple(start) for start in getattr(node, "workeroutput", {}).get("server_starts", []))


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001
    if START_TIMES:
        terminalreporter.section("server starts (to ready)")
        for what, seconds in START_TIMES:
            terminalreporter.write_line(f"{what}: {seconds:.0f} s")


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> dict[str, Process]:
    """The servers the test's marks name, by kind."""
    kinds = needs(request.node)
    assert kinds, "mark the test with @pytest.mark.servers(KIND, ...)"
    return dict(zip(kinds, shared(*kinds), strict=True))


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


GREEDY = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0}


def greedy_replies(front: Process) -> dict[str, str]:
    """The greedy completion of the base and patched names: what a server serves, to compare before and after."""
    replies = {}
    for model in (NAME, f"{NAME}:patched"):
        response = front.post("/v1/completions", {"model": model, **GREEDY})
        assert response.status_code == 200, response.text
        replies[model] = response.json()["choices"][0]["text"]
    return replies
