"""The calibrated confidence of every served answer, and abstention, through `recallfix serve --calibration`
(serve-lora, with server_fixtures' calibrators: a Platt map for the base model, a logistic-tail one for the
learned gains): what each reply says is the calibrator of the variant that answered applied to the logprobs of its first
generated token, in replies and streams, for the `openai` client as for a plain HTTP client; a request may ask to
abstain below a threshold and still gets a reply of OpenAI's shape; the metrics and /v1/feedback see it.
lm-evaluation-harness through the same server: tests/test_compare_vllm.py."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from server_fixtures import (
    API_KEY,
    BASE_CALIBRATOR,
    NAME,
    PATCHED_CALIBRATOR,
    Process,
    calibration_file,
    shared,
    sse_events,
)

from recallfix.patches.calibrator import CalibrationFile, Calibrator

pytestmark = pytest.mark.servers("serve-lora")

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
ABSTAIN = "I don't know."
CALIBRATORS = {NAME: Calibrator(**BASE_CALIBRATOR), f"{NAME}:patched": Calibrator(**PATCHED_CALIBRATOR)}
VARIANTS = {NAME: "base", f"{NAME}:patched": "patched"}


@pytest.fixture(scope="module")
def server() -> Process:
    return shared("serve-lora")[0]


def expected(model: str, first_logprob: float, top: dict[str, float], token: str) -> float:
    """What the calibrator of `model`'s variant makes of a first token: its probability as p1, the others after."""
    row = [first_logprob, *sorted((lp for t, lp in top.items() if t != token), reverse=True)]
    if CALIBRATORS[model].family == "platt":  # in closed form: sigmoid(a logit(p1) + b)
        a, b = CALIBRATORS[model].coef
        p = math.exp(first_logprob)
        return 1 / (1 + math.exp(-(a * math.log(p / (1 - p)) + b)))
    return float(CALIBRATORS[model].predict(np.asarray([row]))[0])


@pytest.mark.parametrize("model", list(VARIANTS))
def test_a_completion_carries_the_calibrated_confidence_of_its_variant(server: Process, model: str) -> None:
    client = server.client()
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0.0, logprobs=20)
    field = reply.model_extra["recallfix"]
    file = CalibrationFile.load(calibration_file())
    assert field["variant"] == VARIANTS[model]
    assert field["calibrator"] == file.variants["base" if model == NAME else "gains"].id
    (entry,) = field["choices"]
    lp = reply.choices[0].logprobs
    assert entry["raw_confidence"] == pytest.approx(math.exp(lp.token_logprobs[0]), rel=1e-9)
    assert entry["confidence"] == pytest.approx(expected(model, lp.token_logprobs[0], lp.top_logprobs[0],
                                                         lp.tokens[0]), rel=1e-9)
    assert entry["abstained"] is False
    # Without logprobs asked, the front asks for them, scores the same greedy answer, and takes them out again.
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0.0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == reply.choices[0].text
    assert plain.model_extra["recallfix"]["choices"][0]["confidence"] == pytest.approx(entry["confidence"], rel=1e-6)
    # Asking for fewer alternatives than the calibrator reads: the client gets its 2 (and the generated token), the
    # calibrator still its 20.
    few = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0.0, logprobs=2)
    assert all(len(top) <= 3 for top in few.choices[0].logprobs.top_logprobs)
    assert few.model_extra["recallfix"]["choices"][0]["confidence"] == pytest.approx(entry["confidence"], rel=1e-6)


def test_a_chat_and_a_stream_carry_it_too(server: Process) -> None:
    client = server.client()
    model = f"{NAME}:patched"
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0.0,
                                          logprobs=True, top_logprobs=20)
    first = chat.choices[0].logprobs.content[0]
    entry = chat.model_extra["recallfix"]["choices"][0]
    assert entry["confidence"] == pytest.approx(
        expected(model, first.logprob, {t.token: t.logprob for t in first.top_logprobs}, first.token), rel=1e-9)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0.0,
                                                 stream=True))
    last = chunks[-1]  # the confidences come last, before [DONE], in a chunk without choices
    assert last.choices == [] and last.model_extra["recallfix"]["variant"] == "patched"
    assert last.model_extra["recallfix"]["choices"][0]["confidence"] == pytest.approx(entry["confidence"], rel=1e-6)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert streamed == chat.choices[0].message.content
    one = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0.0,
                                         logprobs=True, top_logprobs=1)
    assert [len(e.top_logprobs) for e in one.choices[0].logprobs.content] == [1] * len(one.choices[0].logprobs.content)
    assert one.model_extra["recallfix"]["choices"][0]["confidence"] == pytest.approx(entry["confidence"], rel=1e-6)


def test_a_request_may_ask_to_abstain_and_still_gets_openais_shape(server: Process) -> None:
    client = server.client()
    ask = {"recallfix": {"abstain_below": 1.0}}  # no calibrated probability reaches 1: always abstains
    reply = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0.0, extra_body=ask)
    entry = reply.model_extra["recallfix"]["choices"][0]
    assert reply.choices[0].text == ABSTAIN and entry["abstained"] is True
    assert "below the threshold 1" in entry["reason"]
    chat = client.chat.completions.create(model=f"{NAME}:patched", messages=MESSAGES, max_tokens=4, temperature=0.0,
                                          extra_body=ask)
    assert chat.choices[0].message.content == ABSTAIN and chat.model_extra["recallfix"]["choices"][0]["abstained"]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0.0, stream=True,
                                            extra_body=ask))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ABSTAIN
    assert chunks[-1].model_extra["recallfix"]["choices"][0]["abstained"] is True
    kept = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0.0,
                                     extra_body={"recallfix": {"abstain_below": 0.0}})  # 0: never
    assert kept.choices[0].text != ABSTAIN and kept.model_extra["recallfix"]["choices"][0]["abstained"] is False
    bad = server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 1,
                                          "recallfix": {"abstain_below": 2}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "recallfix.abstain_below"


def test_metrics_and_feedback_see_the_calibrated_confidence(server: Process) -> None:
    before = server.metrics()
    reply = server.post("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0.0,
                                            "recallfix": {"abstain_below": 1.0}}).json()
    entry = reply["recallfix"]["choices"][0]
    after = server.metrics()
    labels = {"model": NAME, "variant": "base"}
    assert after.delta(before, "recallfix_calibrated_confidence_count", **labels) == 1
    assert after.delta(before, "recallfix_calibrated_confidence_sum", **labels) == pytest.approx(entry["confidence"])
    assert after.delta(before, "recallfix_abstentions_total", **labels) == 1
    rated = httpx.post(server.url + "/v1/feedback", json={"id": reply["id"], "index": 0, "correct": False},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert rated.status_code == 200 and rated.json()["calibrated_confidence"] == pytest.approx(entry["confidence"])
    last = server.metrics()
    assert last.delta(after, "recallfix_feedback_calibrated_confidence_count", correct="false", **labels) == 1


def test_the_stream_ends_with_the_confidences_then_done(server: Process) -> None:
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2,
                                                                    "temperature": 0.0, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["model"] == NAME
    assert events[-2]["id"] == events[0]["id"] and events[-2]["recallfix"]["choices"][0]["index"] == 0
