"""A vLLM server whose patch cannot be LoRA (GPT-2: no LoRA in vLLM; the patch also scales an MLP bias):
503 while the engines start, the merged checkpoint in a second engine, errors a model without a chat
template gives, and 503 once the engine has died."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import torch
from server_fixtures import CACHE, Server, patch_file, scratch_dir, tiny_model_dir, wait_for

from recallfix.patches import Patch, apply_patch

NAME = "tiny-gpt2"
GAINS = {"L1H0": 0.0, "L1MLP": 1.5}
PROMPT = "The capital of France is"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.fixture(scope="module")
def starting() -> Iterator[Server]:
    """The server process, started but not yet ready."""
    model = tiny_model_dir("gpt2")
    work = scratch_dir()
    patch = patch_file(model, GAINS, work / "gpt2-patch.json")
    server = Server(["--model", str(model), "--patch", str(patch), "--engine", "vllm", "--served-model-name", NAME,
                     "--dtype", "float32", "--max-model-len", "64", "--cache-dir", str(work / "cache")],
                    CACHE / "server-tests" / "vllm-merged.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(starting: Server) -> Server:
    return starting.wait()


def completion(server: Server, **body) -> httpx.Response:  # noqa: ANN003
    return server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 1, **body}, key=None)


def test_http_answers_503_until_the_engine_is_ready(starting: Server) -> None:
    starting.wait("/health")  # the HTTP side is up long before the engines
    met_a_starting_engine = False
    while httpx.get(starting.url + "/ready", timeout=10).status_code != 200:
        answer = completion(starting)
        if httpx.get(starting.url + "/ready", timeout=10).status_code != 200:  # not ready before nor after
            error = error_of(answer, 503)
            assert answer.headers["retry-after"] and error["code"] == "engine_unavailable"
            assert httpx.get(starting.url + "/health", timeout=10).status_code == 200  # process up
            met_a_starting_engine = True
        assert starting.proc is not None and starting.proc.poll() is None, starting.log()[-3000:]
        time.sleep(0.5)
    assert met_a_starting_engine


def test_the_patch_runs_merged_in_a_second_engine(server: Server) -> None:
    info = [labels for name, labels, v in server.metrics().samples if name == "recallfix_patch_info" and v]
    assert [i["applied"] for i in info] == ["merged"]
    log = server.log()
    assert "merged checkpoint" in log and "vLLM has no LoRA for gpt2" in log
    assert log.count("vLLM engine (patched): ready") == 1 and log.count("vLLM engine (base): ready") == 1


def test_both_variants_match_the_patch_applied_in_process(server: Server) -> None:
    from recallfix.patches.io import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_model_dir("gpt2"))
    patch = Patch.load(next(a for a in server.args if a.endswith("gpt2-patch.json")))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = {NAME: torch.log_softmax(model(ids).logits[0, -1], -1)}
        with apply_patch(model, patch):
            expected[f"{NAME}:patched"] = torch.log_softmax(model(ids).logits[0, -1], -1)
    for name, logprobs in expected.items():
        top = completion(server, model=name, temperature=0, logprobs=5).json()["choices"][0]["logprobs"]
        want = logprobs.topk(5)
        for value, index in zip(want.values, want.indices, strict=True):
            assert top["top_logprobs"][0][tokenizer.decode([int(index)])] == pytest.approx(float(value), abs=1e-3)


def test_chat_without_a_template_is_a_clear_400(server: Server) -> None:
    answer = server.post("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]},
                         key=None)
    error = error_of(answer, 400)
    assert error["code"] == "chat_template_missing" and "--chat-template" in error["message"]


def test_prompt_longer_than_the_model_allows_is_400(server: Server) -> None:
    error = error_of(completion(server, prompt=list(range(1, 80))), 400)  # --max-model-len 64
    assert error["param"] == "prompt" and "64" in error["message"]
    assert completion(server, prompt=list(range(1, 60))).status_code == 200


def test_a_dead_engine_answers_503(server: Server) -> None:
    """Last in this module: kills the engines (vLLM's engine-core processes) under the running server."""
    assert server.proc is not None
    cores = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "EngineCore" in p.name()
             or any("EngineCore" in part for part in p.cmdline())]
    assert len(cores) == 2, [p.name() for p in psutil.Process(server.proc.pid).children(recursive=True)]
    for process in cores:
        process.send_signal(signal.SIGKILL)
    assert wait_for(lambda: httpx.get(server.url + "/ready", timeout=10).status_code == 503, timeout=60)
    error = error_of(completion(server), 503)
    assert "Traceback" not in error["message"]
    assert error_of(httpx.get(server.url + "/health", timeout=10), 503)["code"] == "engine_unavailable"
    assert server.proc.poll() is None  # the process stays up and says why; the orchestrator replaces it
