"""Hostile requests that generators miss, sent to `recallfix serve` (SmolLM2-135M, the patch as a LoRA adapter):
bytes that are not UTF-8, lone surrogates, NaN and Infinity, huge and negative numbers, JSON nested 100,000
deep, a prompt far over the context, thousands of prompts, token ids out of the vocabulary, an oversized body,
and `load_patch` paths outside the patch directory. Each gets a 4xx in OpenAI's shape (no stack trace), at once,
and the server serves on: a completion right after each, and the same greedy replies at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from server_fixtures import NAME, Process, greedy_replies, patch_file, shared

pytestmark = [pytest.mark.fuzz, pytest.mark.servers("serve-lora")]

ERROR_KEYS = {"message", "type", "param", "code"}
DEEP = 100_000


def completion(**fields: object) -> bytes:
    return json.dumps({"model": NAME, "prompt": "Hi", "max_tokens": 1, **fields}).encode()


def chat(content: str) -> bytes:
    return json.dumps({"model": f"{NAME}:patched", "messages": [{"role": "user", "content": content}],
                       "max_tokens": 1}).encode()


def raw(text: str) -> bytes:
    """A body written by hand (JSON's own escapes, or tokens `json.dumps` would not write)."""
    return text.encode()


# (id, path, body, status, param the error names (None: any))
CASES = [
    ("utf8-prompt", "/v1/completions", raw(f'{{"model":"{NAME}","prompt":"') + b"\xff\xfe\xc3\x28" + b'"}', 400, None),
    ("utf8-chat", "/v1/chat/completions",
     raw(f'{{"model":"{NAME}","messages":[{{"role":"user","content":"') + b"\xed\xa0\x80" + b'"}]}', 400, None),
    ("surrogate-prompt", "/v1/completions", raw(f'{{"model":"{NAME}","prompt":"a\\ud800b","max_tokens":1}}'), 400,
     None),
    ("surrogate-chat", "/v1/chat/completions",
     raw(f'{{"model":"{NAME}","messages":[{{"role":"user","content":"\\udfff"}}],"max_tokens":1}}'), 400, None),
    ("nan", "/v1/completions", raw(f'{{"model":"{NAME}","prompt":"Hi","temperature":NaN}}'), 400, None),
    ("infinity", "/v1/completions", raw(f'{{"model":"{NAME}","prompt":"Hi","top_p":Infinity}}'), 400, None),
    ("minus-infinity", "/v1/chat/completions",
     raw(f'{{"model":"{NAME}","messages":[{{"role":"user","content":"Hi"}}],"temperature":-Infinity}}'), 400, None),
    ("overflowing-float", "/v1/completions", raw(f'{{"model":"{NAME}","prompt":"Hi","temperature":1e400}}'), 400,
     None),
    ("nan-feedback", "/v1/feedback", raw('{"id":"x","correct":true,"index":NaN}'), 400, None),
    ("max-tokens-negative", "/v1/completions", completion(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-huge", "/v1/completions", completion(max_tokens=10**30), 400, "max_tokens"),
    ("temperature-huge", "/v1/completions", completion(temperature=1e308), 400, "temperature"),
    ("logprobs-negative", "/v1/completions", completion(logprobs=-5), 400, "logprobs"),
    ("n-huge", "/v1/completions", completion(n=10**9), 400, "prompt"),
    ("n-huge-chat", "/v1/chat/completions",
     json.dumps({"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "n": 10**9}).encode(), 400, "prompt"),
    ("deep-completion", "/v1/completions", raw(f'{{"model":"{NAME}","prompt":' + "[" * DEEP + "]" * DEEP + "}"), 400,
     None),
    ("deep-array", "/v1/completions", raw("[" * DEEP + "]" * DEEP), 400, None),
    ("deep-feedback", "/v1/feedback", raw('{"id":' + "{" * DEEP), 400, None),
    ("deep-load-patch", "/v1/load_patch", raw('{"patch":' + '{"a":' * DEEP + "1" + "}" * DEEP + "}"), 400, None),
    ("over-context", "/v1/completions", completion(prompt="hello " * 5000), 400, None),
    ("thousands-of-prompts", "/v1/completions", completion(prompt=["Hi"] * 5000), 400, "prompt"),
    ("thousands-of-token-prompts", "/v1/completions", completion(prompt=[[1, 2]] * 5000), 400, "prompt"),
    ("token-out-of-vocabulary", "/v1/completions", completion(prompt=[10**9]), 400, None),
    ("token-negative", "/v1/completions", completion(prompt=[-1]), 400, None),
    ("token-over-int64", "/v1/completions", completion(prompt=[2**64]), 400, None),
    ("tokens-out-of-vocabulary-batch", "/v1/completions", completion(prompt=[[1], [10**9]]), 400, None),
    ("over-body-limit", "/v1/completions", completion(prompt="x" * (33 * 2**20)), 413, None),
    # vLLM 0.32 reads `.text` of an earlier assistant message's first part: a refusal there was its 500 (fuzzing)
    ("refusal-in-responses-input", "/v1/responses", json.dumps({"model": NAME, "max_output_tokens": 8, "input": [
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "refusal", "refusal": "no"}]}]}).encode(), 400, "input[0].content[0]"),
]


@pytest.fixture(scope="module")
def front() -> Process:
    return shared("serve-lora")[0]


@pytest.fixture(scope="module")
def greedy_before(front: Process) -> dict[str, str]:
    return greedy_replies(front)




def send(front: Process, path: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(front.url + path, content=body, headers={**front.headers(), "content-type": content_type},
                      timeout=120)


def assert_refused(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:2000]
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text[:2000]
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_serves(front: Process) -> None:
    response = front.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("path", "body", "status", "param"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_hostile_body_is_refused_in_openais_shape(front: Process, greedy_before: dict[str, str], path: str,
                                                  body: bytes, status: int, param: str | None) -> None:
    assert_refused(send(front, path, body), status, param)
    assert_serves(front)


def test_a_body_not_labelled_json_is_still_checked(front: Process) -> None:
    """vLLM reads any body but a form as JSON, whatever its content type: the front checks it all the same."""
    assert_refused(send(front, "/v1/completions", raw("[" * DEEP), "text/plain"), 400)
    assert_serves(front)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid patch of this model outside the patch directory: only where it lies makes it refused."""
    copy = tmp_path / "elsewhere.json"
    copy.write_bytes(patch_file("other").read_bytes())
    return copy


@pytest.fixture
def escaping_link(outside: Path) -> Path:
    link = patch_file("learned").parent / "escape.json"
    link.symlink_to(outside)
    yield link
    link.unlink()


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink", "nul-byte", "directory", "missing"])
def test_load_patch_reads_no_file_outside_the_patch_directory(front: Process, greedy_before: dict[str, str],
                                                              outside: Path, escaping_link: Path, how: str) -> None:
    patch_dir = patch_file("learned").parent
    path = {"dot-dot": f"{patch_dir}/{'../' * 16}{str(outside).lstrip('/')}", "absolute": str(outside),
            "symlink": str(escaping_link), "nul-byte": f"{patch_dir}/learned.json\x00", "directory": str(patch_dir),
            "missing": f"{patch_dir}/missing.json"}[how]
    before = front.get("/metrics").text
    error = assert_refused(front.post("/v1/load_patch", {"path": path}), 400, "path")
    assert error["code"] == "patch_refused"
    if how in ("dot-dot", "absolute", "symlink"):
        assert "outside the patch directory" in error["message"]
    assert patch_id(front.get("/metrics").text) == patch_id(before)  # a refused patch changes nothing
    assert_serves(front)


def patch_id(metrics: str) -> str:
    return next(line for line in metrics.splitlines() if line.startswith("recallfix_patch_info{"))


def test_the_server_serves_the_same_greedy_replies_after_all_this(front: Process,
                                                                 greedy_before: dict[str, str]) -> None:
    assert greedy_replies(front) == greedy_before
