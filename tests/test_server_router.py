"""`recallfix router` in front of two vLLM servers that run elsewhere (vLLM's own server of the base checkpoint, and
the one serve-merged runs for its merged patched checkpoint): the three names, vLLM's replies unchanged, errors in
OpenAI's shape (401, 404, 429 with Retry-After, 503 while an upstream is down), idle connections kept open longer
than clients keep theirs, SIGTERM draining a stream in flight, and `--calibration` (each reply's calibrated
confidence, from the calibrator of the file's recommended patch for NAME:patched, and abstention).
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from server_fixtures import API_KEY, CACHE, NAME, Process, calibration_file, free_port, shared, sse_events

from recallfix.patches.calibrator import CalibrationFile

pytestmark = pytest.mark.servers("vllm-base", "vllm-merged")


def router(base: Process, *, patched_url: str, upstream_key: str | None = None, extra: tuple[str, ...] = ()) -> Process:
    """`recallfix router` before `base` and `patched_url`, with the key the upstreams want (`--upstream-api-key`:
    the patched one is a recallfix serve's own vLLM server, which answers its front's key only)."""
    key = ["--upstream-api-key", upstream_key] if upstream_key else []
    args = ["-m", "recallfix.server", "router", "--served-model-name", NAME, "--base-url", base.url,
            "--patched-url", patched_url, *key, "--api-key", API_KEY, "--probe-interval", "0.5", *extra]
    return Process(args, CACHE / "server-tests" / f"router-{free_port()}.log").start()


@pytest.fixture(scope="module")
def upstreams() -> tuple[Process, Process]:
    return tuple(shared("vllm-base", "vllm-merged"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def front(upstreams) -> Process:  # noqa: ANN001
    base, merged = upstreams
    process = router(base, patched_url=merged.url, upstream_key=merged.key, extra=("--max-concurrency", "1")).wait()
    yield process
    process.stop()


def test_router_serves_the_three_names_with_vllms_replies(front: Process, upstreams) -> None:  # noqa: ANN001
    base, merged = upstreams
    assert [m.id for m in front.client().models.list().data] == [NAME, f"{NAME}:patched", f"{NAME}:ab"]
    for model, direct in ((NAME, base), (f"{NAME}:patched", merged)):
        ours = front.client().completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                                 temperature=0.0, logprobs=2)
        theirs = direct.client().completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                                                    temperature=0.0, logprobs=2)
        assert ours.model == model and ours.choices[0].text == theirs.choices[0].text
        assert ours.choices[0].logprobs.token_logprobs == theirs.choices[0].logprobs.token_logprobs
    raw = front.client().completions.with_raw_response.create(model=f"{NAME}:ab", prompt="Hi", max_tokens=1,
                                                               user="someone")
    assert raw.headers["x-recallfix-variant"] in ("base", "patched")


def test_errors_have_openais_shape(front: Process) -> None:
    no_key = httpx.post(front.url + "/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=30)
    assert no_key.status_code == 401 and set(no_key.json()["error"]) == {"message", "type", "param", "code"}
    unknown = front.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert "smol:patched" in unknown.json()["error"]["message"]
    refused = front.post("/v1/load_patch", {"patch": {}})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_supported"


def test_an_idle_connection_outlives_the_clients_own_keep_alive(front: Process) -> None:
    """The front keeps an idle connection open past the 5 s after which httpx and the openai client drop theirs, so
    the client always closes first: a request sent just as the server closed its connection would get no reply."""
    with httpx.Client(limits=httpx.Limits(keepalive_expiry=60)) as client:
        ports = []
        for pause in (0, 6):
            time.sleep(pause)
            reply = client.get(front.url + "/health")
            assert reply.status_code == 200
            ports.append(reply.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert ports[0] == ports[1], "the front closed an idle connection within 6 s"


def test_over_max_concurrency_is_429_with_retry_after(front: Process) -> None:
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    started, measured = threading.Event(), threading.Event()

    def hold() -> None:  # one stream in flight until the second request has its answer, then hang up
        with httpx.stream("POST", front.url + "/v1/completions", json=body, headers=front.headers(),
                          timeout=300) as response:
            for _ in response.iter_lines():
                started.set()
                if measured.is_set():
                    break

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(300)
    over = front.post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1})
    measured.set()
    holder.join()
    assert over.status_code == 429 and over.headers["retry-after"]
    assert over.json()["error"]["type"] == "rate_limit_error"


def test_a_down_upstream_is_503_and_the_other_variant_serves(upstreams) -> None:  # noqa: ANN001
    base, _ = upstreams
    lonely = router(base, patched_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        lonely.wait("/health")
        time.sleep(2)  # a few probes
        assert lonely.get("/ready").status_code == 503
        down = lonely.post("/v1/completions", {"model": f"{NAME}:patched", "prompt": "x", "max_tokens": 1})
        assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable"
        assert down.headers["retry-after"]
        up = lonely.post("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1})
        assert up.status_code == 200 and up.headers["x-recallfix-variant"] == "base"
    finally:
        lonely.stop()


def test_sigterm_drains_a_stream_in_flight(upstreams) -> None:  # noqa: ANN001
    base, merged = upstreams
    # --drain-timeout: the stream must finish however slowly a shared machine generates it
    draining = router(base, patched_url=merged.url, upstream_key=merged.key, extra=("--drain-timeout", "600")).wait()
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 16, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", draining.url + "/v1/completions", json=body, headers=draining.headers(),
                      timeout=300) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        draining.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert first and rest[-1] == "data: [DONE]"
    finished = [json.loads(line[6:])["choices"][0].get("finish_reason") for line in rest[:-1]]
    assert finished[-1] == "length"  # all 16 tokens came, after the signal
    assert draining.proc.wait(timeout=60) == 0


def test_streams_end_with_done_through_the_router(front: Process) -> None:
    with httpx.stream("POST", front.url + "/v1/chat/completions", headers=front.headers(), timeout=300,
                      json={"model": f"{NAME}:patched", "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 4, "stream": True}) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and all(e["model"] == f"{NAME}:patched" for e in events[:-1])


def test_the_router_serves_calibrated_confidences_and_abstains(upstreams) -> None:  # noqa: ANN001
    base, merged = upstreams
    calibrated = router(base, patched_url=merged.url, upstream_key=merged.key,
                        extra=("--calibration", str(calibration_file()), "--abstain-below", "0.99",
                               "--abstain-text", "Not sure.")).wait()
    try:
        file = CalibrationFile.load(calibration_file())
        client = calibrated.client()
        for model, variant in ((NAME, "base"), (f"{NAME}:patched", file.recommended)):
            reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3,
                                              temperature=0.0, logprobs=20,
                                              extra_body={"recallfix": {"abstain_below": 0}})  # 0: not this one
            field = reply.model_extra["recallfix"]
            assert field["calibrator"] == file.variants[variant].id  # the router cannot see the patch: the file
            lp = reply.choices[0].logprobs                          # names the patched variant's calibrator
            row = [lp.token_logprobs[0], *sorted((v for t, v in lp.top_logprobs[0].items() if t != lp.tokens[0]),
                                                 reverse=True)]
            want = file.variants[variant].calibrator.predict(np.asarray([row]))[0]
            assert field["choices"][0]["confidence"] == pytest.approx(want, rel=1e-9)
            # The server's own threshold (0.99) where the request asks nothing: OpenAI's shape, the text replaced.
            withheld = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3,
                                                 temperature=0.0)
            assert withheld.choices[0].text == "Not sure."
            assert withheld.model_extra["recallfix"]["choices"][0]["abstained"] is True
    finally:
        calibrated.stop()
