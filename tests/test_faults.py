"""Faults: what a client and the files on disk see when things break.

- An upstream vLLM server SIGKILLed mid-stream, seen through `recallfix serve` (its own child) and through
  `recallfix router` (pointed at that same child, so one engine serves both fronts): each stream ends with an
  error event in OpenAI's shape and `[DONE]`, each non-streaming request in flight gets 503, `/ready` goes
  false; once `recallfix serve` has restarted the child, both fronts serve again (same greedy replies), the
  fronts never restarted.
- SIGTERM to `recallfix serve`: the requests in flight finish, it exits 0, and every process it had started is
  gone.
- Refused patches (`--patch` at start here; `load_patch` in test_server_lifecycle.py).
- A merged export, a model conversion and an analysis run SIGKILLed midway: their output directory is absent or
  the complete previous one, and the next run removes the scratch the killed one left.
- A full disk and an unwritable cache: one line naming the path, nothing half-written.

Every wait is bounded: a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from cli_runner import recallfix
from server_fixtures import (
    API_KEY,
    CACHE,
    START_TIMEOUT_S,
    START_TIMES,
    TEST_TIMEOUT_S,
    Process,
    wait_for,
)
from tiny import build_model

pytestmark = pytest.mark.faults

NAME = "tiny"
# The tiny random llama of tests/tiny.py with a long context: a fast engine, and requests long enough to be in
# flight when the fault strikes, however fast the machine generates and however slowly the test's own threads run
# beside other work. At 1,000 tokens a request lived 3 s on an idle engine, and on a busy machine the four of the
# kill test never overlapped.
CONTEXT = 16384
TINY_VLLM = ["--dtype", "float32", "--max-model-len", str(CONTEXT), "--enforce-eager", "--seed", "0",
             "--kv-cache-memory-bytes", str(256 * 2**20)]
CUT = CONTEXT - 32  # tokens asked of the requests the kill cuts: far more than they can make before it
LONG = 4000  # tokens of the requests SIGTERM lets finish
READ_TIMEOUT = httpx.Timeout(120.0)  # no read waits longer: a hang fails the test
SERVER_TEST_TIMEOUT = 2 * START_TIMEOUT_S + TEST_TIMEOUT_S  # a start and a restart of a vLLM server


def one_error_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    """A non-zero exit, no traceback, and one `recallfix: error:` line naming what went wrong."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("recallfix: error:")]
    assert len(errors) == 1, done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# -- the servers -----------------------------------------------------------------------------------------
def vllm_child(front: Process) -> psutil.Process:
    (child,) = [p for p in psutil.Process(front.proc.pid).children()
                if "vllm.entrypoints.openai.api_server" in command_line(p)]
    return child


def command_line(process: psutil.Process) -> str:
    """Its command line; empty for a process that has exited (a zombie its parent has not reaped yet, or gone)."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


def option(process: psutil.Process, name: str) -> str:
    argv = process.cmdline()
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    """`recallfix serve` of a tiny llama (no patch: one vLLM child), and `recallfix router` pointed at that
    child with the child's own API key."""
    model, tokenizer = build_model("llama")
    model.config.max_position_embeddings = CONTEXT  # rotary positions: the weights do not depend on it
    model_dir = tmp_path_factory.mktemp("faults-model")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    serve = Process(["-m", "recallfix.server", "serve", str(model_dir), "--served-model-name", NAME,
                     "--api-key", API_KEY, "--drain-timeout", "600", "--upstream-start-timeout",
                     str(START_TIMEOUT_S), *TINY_VLLM], CACHE / "server-tests" / "faults-serve.log")
    router = None
    try:
        started = time.monotonic()
        serve.start().wait()
        START_TIMES.append(("faults: recallfix serve (tiny)", time.monotonic() - started))
        child = vllm_child(serve)
        upstream = f"http://127.0.0.1:{option(child, '--port')}"
        router = Process(["-m", "recallfix.server", "router", "--served-model-name", NAME, "--base-url", upstream,
                          "--upstream-api-key", option(child, "--api-key"), "--api-key", API_KEY,
                          "--probe-interval", "0.5"], CACHE / "server-tests" / "faults-router.log").start().wait()
        yield serve, router
    finally:
        if router is not None:
            router.stop()
        serve.stop()


def complete(front: Process, max_tokens: int = 8, **extra: object) -> httpx.Response:
    body = {"model": NAME, "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": 2, **extra}
    return httpx.post(front.url + "/v1/completions", json=body, headers=front.headers(), timeout=READ_TIMEOUT)


def greedy(front: Process) -> tuple[str, list[float]]:
    reply = complete(front)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


@contextlib.contextmanager
def open_stream(front: Process, stack: contextlib.ExitStack, **extra: object) -> Iterator[Iterator[str]]:
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": CUT, "ignore_eos": True, "stream": True}
    body.update(extra)
    response = stack.enter_context(httpx.stream("POST", front.url + "/v1/completions", json=body,
                                                headers=front.headers(), timeout=READ_TIMEOUT))
    assert response.status_code == 200
    lines = (line for line in response.iter_lines() if line.startswith("data: "))
    first = next(lines)
    assert json.loads(first[6:])["choices"], first  # generation has started
    yield lines


class InFlight(threading.Thread):
    """A long non-streaming completion, its reply kept."""

    def __init__(self, front: Process, max_tokens: int = CUT) -> None:
        super().__init__(daemon=True)
        self.front, self.max_tokens, self.reply = front, max_tokens, None

    def run(self) -> None:
        self.reply = complete(self.front, max_tokens=self.max_tokens, ignore_eos=True)


def running(child: psutil.Process) -> float:
    """Requests the vLLM server is generating for (its own vllm:num_requests_running)."""
    url = f"http://127.0.0.1:{option(child, '--port')}/metrics"
    text = httpx.get(url, headers={"Authorization": f"Bearer {option(child, '--api-key')}"}, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def assert_openai_error(error: dict, type_: str) -> None:
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
    assert error["error"]["type"] == type_, error


@pytest.mark.vllm
@pytest.mark.timeout(SERVER_TEST_TIMEOUT)
def test_an_upstream_killed_mid_stream_ends_each_stream_cleanly_then_serving_resumes(fronts) -> None:  # noqa: ANN001
    serve, router = fronts
    before = {front.url: greedy(front) for front in fronts}
    child = vllm_child(serve)
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(open_stream(front, stack)) for front in fronts]
        waiting = [InFlight(front) for front in fronts]
        for thread in waiting:
            thread.start()
        # all four generating at once, so the kill cuts each of them
        assert wait_for(lambda: running(child) >= 4, timeout=120, interval=0.05), "the requests did not all reach vLLM"
        os.killpg(child.pid, signal.SIGKILL)  # the API server and its engine processes, unasked
        rests = [list(lines) for lines in streams]
    for rest in rests:
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert_openai_error(json.loads(rest[-2][6:]), "service_unavailable")
        finished = [json.loads(line[6:])["choices"][0].get("finish_reason") for line in rest[:-2]]
        assert "length" not in finished  # it was cut, not finished
    for thread in waiting:
        thread.join(timeout=180)
        assert not thread.is_alive(), "a request in flight hung"
        assert thread.reply.status_code == 503, thread.reply.text
        assert_openai_error(thread.reply.json(), "service_unavailable")
    for front in fronts:
        down = complete(front)
        assert down.status_code == 503 and down.headers["retry-after"], down.text
        assert_openai_error(down.json(), "service_unavailable")
    assert wait_for(lambda: all(front.get("/ready").status_code == 503 for front in fronts), timeout=30)
    # recallfix serve starts the child again; the router finds it back; neither front restarted
    started = time.monotonic()
    assert wait_for(lambda: serve.get("/ready").status_code == 200, timeout=START_TIMEOUT_S), serve.log()[-3000:]
    START_TIMES.append(("faults: vLLM restarted after SIGKILL", time.monotonic() - started))
    assert wait_for(lambda: router.get("/ready").status_code == 200, timeout=60), router.log()[-3000:]
    assert vllm_child(serve).pid != child.pid
    for front in fronts:
        assert front.proc.poll() is None
        assert greedy(front) == before[front.url]  # the same replies, bit for bit
    assert "exited with signal 9" in serve.log() and "is back" in serve.log()


@pytest.mark.vllm
@pytest.mark.timeout(SERVER_TEST_TIMEOUT)
def test_sigterm_drains_requests_in_flight_exits_0_and_leaves_no_process(fronts) -> None:  # noqa: ANN001
    serve, router = fronts
    router.stop()  # it holds connections to the child; the drain is serve's
    descendants = psutil.Process(serve.proc.pid).children(recursive=True)
    assert any("vllm" in command_line(p) for p in descendants), descendants
    child = vllm_child(serve)
    with contextlib.ExitStack() as stack:
        # Both requests are long (a fast machine generated 200 tokens between two polls and two of 1,000 tokens
        # never overlapped), and vLLM is polled often: the signal comes while both generate.
        stream = stack.enter_context(open_stream(serve, stack, max_tokens=LONG,
                                                 stream_options={"include_usage": True}))
        waiting = InFlight(serve, LONG)
        waiting.start()
        assert wait_for(lambda: running(child) >= 2, timeout=120, interval=0.05), "the two never ran together"
        serve.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
    waiting.join(timeout=300)
    assert rest[-1] == "data: [DONE]", rest[-3:]
    events = [json.loads(line[6:]) for line in rest[:-1]]
    assert not any("error" in e for e in events), events[-2:]
    assert any(e["choices"] and e["choices"][0]["text"] for e in events)  # tokens came after the signal
    assert events[-1]["usage"]["completion_tokens"] == LONG  # ... all of them
    assert waiting.reply is not None and waiting.reply.status_code == 200, waiting.reply
    assert waiting.reply.json()["usage"]["completion_tokens"] == LONG
    assert serve.proc.wait(timeout=300) == 0
    gone, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive, f"left behind: {[(p.pid, p.cmdline()[:3]) for p in alive]}"


# -- refused patches at start --------------------------------------------------------------------------
def bad_patches(where: Path, tiny_dirs: dict[str, Path]) -> dict[str, tuple[Path, str]]:
    """name -> (patch file, what the refusal must say), each a spoilt patch of the tiny llama: truncated, tampered
    (a tensor's sha256 changed), made for another model, and non-finite gains (NaN, Infinity, and 1e39: finite in
    JSON, not in float32)."""
    from recallfix.patches import make_patch
    from recallfix.patches.registry.load import load_model

    good = make_patch(load_model(tiny_dirs["llama"]), {"L1H0": 0.5, "L1H2": 1.5})
    text = good.model_dump_json(indent=2)
    doc = json.loads(text)
    made: dict[str, tuple[Path, str]] = {}

    def write(name: str, content: str, why: str) -> None:
        (where / f"{name}.json").write_text(content)
        made[name] = (where / f"{name}.json", why)

    write("truncated", text[: len(text) // 2], "invalid patch: (document): Invalid JSON")
    tensor, digest = next(iter(doc["model"]["tensors"].items()))
    tampered = json.loads(text)
    tampered["model"]["tensors"][tensor] = digest[::-1]
    write("tampered", json.dumps(tampered), tensor)
    foreign = make_patch(load_model(tiny_dirs["gpt2"]), {"L1H0": 0.5})
    write("foreign", foreign.model_dump_json(), "architecture: the patch was made for 'gpt2', this model has 'llama'")
    for name, gain, why in (("nan", float("nan"), "gain must be a finite number, got nan"),
                            ("inf", float("inf"), "gain must be a finite number, got inf"),
                            ("huge", 1e39, "finite")):
        changed = json.loads(text)
        changed["edits"][0]["gain"] = gain
        write(name, json.dumps(changed), why)
    return made


def test_serve_refuses_a_bad_patch_at_start_in_one_line(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    for path, why in bad_patches(tmp_path, tiny_dirs).values():  # each stops before any vLLM server starts
        done = recallfix("serve", tiny_dirs["llama"], "--patch", path, *TINY_VLLM[:2])
        line = one_error_line(done, f"--patch {path}", why)
        assert "started vLLM" not in done.stderr, line


# -- interrupted operations ----------------------------------------------------------------------------
def write_facts(path: Path) -> Path:
    """A few facts (the tiny model knows none: the analysis runs, its numbers do not matter here)."""
    rows = [{"prompt": f"The capital of {country} is", "answer": city, "subject": country, "relation": "capital"}
            for country, city in (("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Spain", "Madrid"),
                                  ("Italy", "Rome"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo"))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def debris(target: Path) -> list[str]:
    """What writers of `target` left beside it (temp files and directories)."""
    if not target.parent.is_dir():
        return []
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


HELD = Path(__file__).with_name("held.py")


def start_held(marker: Path, *args: str | Path, at: str = "commit",
               env: dict[str, str] | None = None) -> subprocess.Popen:
    """`recallfix ARGS` stopped for good at a point of writing its output (held.py): `commit` (all written into
    its scratch directory, nothing committed) or `cleanup` (as it starts, once it removed a killed writer's
    scratch). `marker` appears when it is there."""
    return subprocess.Popen([sys.executable, str(HELD), at, str(marker), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def kill_held(process: subprocess.Popen, marker: Path, timeout: float = 900) -> None:
    """SIGKILL `process` once it holds (`marker` written); fails if it ended instead (it errored) or never got
    there."""
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert process.poll() is None, f"ended before it reached the point to hold at: {process.communicate()}"
            assert time.monotonic() < deadline, "never reached its commit"
            time.sleep(0.05)
    finally:
        process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def test_a_killed_merged_export_leaves_no_partial_directory(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from recallfix.patches import make_patch
    from recallfix.patches.registry.load import load_model

    model = tiny_dirs["llama"]  # held before its commit, however small the model: no race with the writer
    patch = make_patch(load_model(model), {"L1H0": 0.5}).save(tmp_path / "p.json")
    out = tmp_path / "merged"
    export = ("patch", "export", "--model", model, "--patch", patch, "--format", "merged", "--out", out)
    kill_held(start_held(tmp_path / "held-1", *export), tmp_path / "held-1")  # the edited shard written, uncommitted
    assert not out.exists()
    (left,) = debris(out)  # the killed writer's scratch, until the next run
    assert list((out.parent / left).glob("*.safetensors")), "it was to be killed with its checkpoint written"
    done = recallfix(*export)
    assert done.returncode == 0, done.stderr
    assert debris(out) == [], "the next run did not remove the killed one's scratch"
    whole = snapshot(out)
    assert {"model.safetensors.index.json", "config.json", "recallfix_patch.json"} <= set(whole)  # sharded
    kill_held(start_held(tmp_path / "held-2", *export, "--force"), tmp_path / "held-2")
    assert snapshot(out) == whole, "a killed --force export changed the previous checkpoint"


def test_a_killed_model_conversion_leaves_no_partial_directory(real_gguf: Path, tmp_path: Path) -> None:
    from recallfix.patches.registry.models import sha256_file

    cache = tmp_path / "cache"
    out = cache / "gguf" / sha256_file(real_gguf)[:16]
    convert = ("patch", "new", "--model", real_gguf, "--edit", "L29H0=0.5", "--out", tmp_path / "p.json")
    kill_held(start_held(tmp_path / "held-1", *convert, env={"RECALLFIX_CACHE": str(cache)}), tmp_path / "held-1")
    assert not out.exists()
    (left,) = debris(out)
    assert (out.parent / left / "config.json").is_file()  # killed with the checkpoint saved, uncommitted
    # the next conversion removes it as it starts (killed right then: the whole conversion is test_models.py's)
    second = start_held(tmp_path / "held-2", *convert, at="cleanup", env={"RECALLFIX_CACHE": str(cache)})
    kill_held(second, tmp_path / "held-2")
    assert not out.exists() and debris(out) == []


def test_a_killed_analysis_run_leaves_the_previous_run_whole(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    analyze = ("analyze", "--model", tiny_dirs["llama"], "--facts", write_facts(tmp_path / "facts.jsonl"),
               "--method", "intercept", "--n-boot", "20", "--no-progress", "--out", out)
    kill_held(start_held(tmp_path / "held-1", *analyze), tmp_path / "held-1")  # its report written, uncommitted
    assert not out.exists()
    (left,) = debris(out)
    assert (out.parent / left / "logit_lens.png").is_file() and (out.parent / left / "report.md").is_file()
    done = recallfix(*analyze)
    assert done.returncode == 0, done.stderr
    assert debris(out) == [] and (out / "analysis.json").is_file() and (out / "report.md").is_file()
    whole = snapshot(out)
    kill_held(start_held(tmp_path / "held-2", *analyze, "--force"), tmp_path / "held-2")
    assert snapshot(out) == whole


# -- full disk, unwritable cache -----------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at `where` (root only); skips the test, saying why, where it cannot be mounted."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(directory: Path) -> None:
    """Fill the file system of `directory` to its last byte."""
    with (directory / "filler").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


def test_a_full_disk_is_one_line_naming_the_path_and_nothing_is_left(tiny_dirs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    from recallfix.patches import make_patch
    from recallfix.patches.registry.load import load_model

    patch = make_patch(load_model(tiny_dirs["llama"]), {"L1H0": 0.5}).save(tmp_path / "p.json")
    with tmpfs(tmp_path / "small", "size=1m") as disk:  # the tiny llama's checkpoint is 1.5 MB
        out = disk / "merged"
        done = recallfix("patch", "export", "--model", tiny_dirs["llama"], "--patch", patch, "--format", "merged",
                   "--out", out)
        one_error_line(done, f"cannot write {out}: No space left on device")
        assert list(disk.iterdir()) == []  # no half checkpoint, no scratch
        fill(disk)
        out = disk / "patch.json"
        done = recallfix("patch", "new", "--model", tiny_dirs["llama"], "--edit", "L1H0=0.5", "--out", out)
        one_error_line(done, f"cannot write {out}: No space left on device")
        assert [p.name for p in disk.iterdir()] == ["filler"]


def test_an_unwritable_cache_is_one_line_naming_the_path(real_gguf: Path, tmp_path: Path) -> None:
    from recallfix.patches.registry.models import sha256_file

    digest = sha256_file(real_gguf)[:16]
    convert = ("patch", "new", "--model", real_gguf, "--edit", "L29H0=0.5", "--out", tmp_path / "p.json")
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    under_a_file = a_file / "cache"
    done = recallfix(*convert, env={"RECALLFIX_CACHE": str(under_a_file)})
    one_error_line(done, f"cannot write {under_a_file / 'gguf' / digest}: Not a directory")
    # root ignores permission bits: a read-only file system stops it
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as cache:
        done = recallfix(*convert, env={"RECALLFIX_CACHE": str(cache)})
        one_error_line(done, f"cannot write {cache / 'gguf' / digest}: Read-only file system")
        done = recallfix("model", "get", "smollm2-135m", env={"RECALLFIX_CACHE": str(cache)})
        one_error_line(done, f"cannot write {cache / 'downloads' / 'smollm2-135m'}: Read-only file system")
    assert not (tmp_path / "p.json").exists()
