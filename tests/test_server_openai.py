"""A battery of common `openai`-client calls works through `recallfix serve` exactly as against vLLM's own
server: for NAME and NAME:patched, each reply (and each streamed event) has the shape of the reply vLLM's
server gives to the same call, and greedy text is the same. NAME's reference is vLLM's server started on its own
on the base checkpoint (`recallfix serve` is a drop-in for it); NAME:patched's is the vLLM server the front runs
for that variant, asked directly (the front passes its replies through unchanged).
"""

from __future__ import annotations

from typing import Any

import pytest
from server_fixtures import NAME, Process

pytestmark = pytest.mark.servers("serve-merged", "vllm-base", "vllm-merged")

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

# (case, endpoint, arguments of the openai client's create()); greedy unless seeded sampling is the point.
BATTERY: list[tuple[str, str, dict[str, Any]]] = [
    ("penalties", "completions", {"presence_penalty": 0.5, "frequency_penalty": 0.5}),
    ("logit_bias", "completions", {"logit_bias": {"7042": -100}}),
    ("top_k_min_p", "completions", {"extra_body": {"top_k": 5, "min_p": 0.1}}),
    ("repetition_penalty", "completions", {"extra_body": {"repetition_penalty": 1.3}}),
    ("min_tokens_ignore_eos", "completions", {"extra_body": {"min_tokens": 6, "ignore_eos": True}}),
    ("structured_choice", "completions", {"extra_body": {"structured_outputs": {"choice": ["Paris", "Lyon"]}}}),
    ("structured_regex", "completions", {"extra_body": {"structured_outputs": {"regex": " [A-Z][a-z]+"}}}),
    ("structured_json", "completions", {"extra_body": {"structured_outputs": {"json": CITY}}}),
    ("echo_prompt_logprobs", "completions", {"echo": True, "logprobs": 2, "max_tokens": 2}),
    ("logprobs", "completions", {"logprobs": 3}),
    ("logprobs_zero", "completions", {"logprobs": 0}),
    ("logprobs_stream", "completions", {"logprobs": 3, "stream": True}),
    ("n_streaming", "completions", {"n": 2, "stream": True, "temperature": 0.8, "seed": 7}),
    ("stream_usage", "completions", {"stream": True, "stream_options": {"include_usage": True}}),
    ("chat_penalties_top_k", "chat", {"presence_penalty": 0.3, "extra_body": {"top_k": 3,
                                                                               "repetition_penalty": 1.2}}),
    ("chat_json_object", "chat", {"response_format": {"type": "json_object"}}),
    ("chat_json_schema", "chat", {"response_format": {"type": "json_schema",
                                                      "json_schema": {"name": "city", "schema": CITY}}}),
    ("chat_structured_choice", "chat", {"extra_body": {"structured_outputs": {"choice": ["Paris", "Lyon"]}}}),
    ("chat_tools", "chat", {"tools": [WEATHER_TOOL], "tool_choice": "auto"}),
    ("chat_logprobs", "chat", {"logprobs": True, "top_logprobs": 2}),
    ("chat_logprobs_no_top", "chat", {"logprobs": True}),
    ("chat_logprobs_stream", "chat", {"logprobs": True, "top_logprobs": 2, "stream": True}),
    ("chat_n_streaming", "chat", {"n": 2, "stream": True, "temperature": 0.8, "seed": 7}),
]


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys, list lengths and value types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return None if value is None else "str"


def stream_shape(events: list[Any]) -> list[Any]:
    """The distinct shapes of a choice's stream events, in order of first appearance, each list in them reduced
    to its distinct element shapes: how many tokens one event carries is timing, not format (vLLM merges the
    outputs a slow reader has not taken yet into one event), so neither the event count nor list lengths count."""
    def loose(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: loose(v) for k, v in value.items()}
        if isinstance(value, list):
            return list({repr(loose(v)): loose(v) for v in value}.values())
        return value

    return list({repr(loose(shape(e))): loose(shape(e)) for e in events}.values())


def reply_shape(reply: Any) -> Any:
    """`shape` of a whole reply; a stream's `stream_shape` per choice (see `per_choice`)."""
    if not isinstance(reply, list):
        return shape(reply)
    return {key: stream_shape(events) for key, events in per_choice(reply).items()}


def call(server: Process, model: str, endpoint: str, arguments: dict[str, Any]) -> tuple[Any, str | None]:
    """The reply (a list of events when streamed) as JSON, and the variant header."""
    client = server.client()
    arguments = {"max_tokens": 8, "temperature": 0.0, **arguments}
    if endpoint == "completions":
        raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, **arguments)
    else:
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, **arguments)
    parsed = raw.parse()
    if arguments.get("stream"):
        return [chunk.to_dict() for chunk in parsed], raw.headers.get("x-recallfix-variant")
    return parsed.to_dict(), raw.headers.get("x-recallfix-variant")


def candidates(reply: Any) -> dict[int, list[list[tuple[str, float]]]]:
    """Per choice index, each generated position's logprob candidates as the reply lists them (a stream's, in
    order): the front asks vLLM for 20 and must hand back exactly what vLLM gives for the client's own count."""
    out: dict[int, list[list[tuple[str, float]]]] = {}
    for event in reply if isinstance(reply, list) else [reply]:
        for choice in event.get("choices", []):
            logprobs = choice.get("logprobs") or {}
            if "content" in logprobs:
                rows = [[(t["token"], t["logprob"]) for t in e["top_logprobs"]] for e in logprobs["content"] or []]
            else:  # an echo's first prompt token has none
                rows = [list((top or {}).items()) for top in logprobs.get("top_logprobs") or []]
            out.setdefault(choice.get("index", 0), []).extend(rows)
    return out


def per_choice(reply: Any) -> Any:
    """A streamed reply as its events per choice, in order ("usage": the events with no choice); a whole
    reply as it is. vLLM interleaves the choices of an n > 1 stream as they come, which no client may rely
    on; each choice's own events, and their order, are what the two servers must agree on."""
    if not isinstance(reply, list):
        return reply
    out: dict[str, list[Any]] = {}
    for event in reply:
        choices = event.get("choices") or []
        if not choices:
            out.setdefault("usage", []).append(event)
        for choice in choices:
            out.setdefault(f"choice {choice.get('index')}", []).append({**event, "choices": [choice]})
    return out


def texts(reply: Any) -> dict[int, list[str]]:
    """Per choice index, its text: a whole reply's, or each of a stream's pieces, in order."""
    events = reply if isinstance(reply, list) else [reply]
    out: dict[int, list[str]] = {}
    for event in events:
        for choice in event.get("choices", []):
            text = choice.get("text") or (choice.get("message") or choice.get("delta") or {}).get("content") or ""
            out.setdefault(choice.get("index", 0), []).append(text)
    return out


@pytest.fixture
def peers(servers: dict[str, Process]) -> dict[str, Process]:
    """`recallfix serve` (merged), and vLLM's own server of each name: started on its own (NAME), the front's own
    upstream (NAME:patched)."""
    return {"serve": servers["serve-merged"], NAME: servers["vllm-base"], f"{NAME}:patched": servers["vllm-merged"]}


@pytest.mark.parametrize("variant", ["base", "patched"])
@pytest.mark.parametrize("case, endpoint, arguments", BATTERY, ids=[c[0] for c in BATTERY])
def test_battery_matches_vllms_own_server(peers: dict[str, Process], case: str, endpoint: str,
                                          arguments: dict[str, Any], variant: str) -> None:
    model = NAME if variant == "base" else f"{NAME}:patched"
    ours, header = call(peers["serve"], model, endpoint, arguments)
    theirs, _ = call(peers[model], model, endpoint, arguments)
    assert header == variant
    assert reply_shape(ours) == reply_shape(theirs), f"{case}: the reply's shape differs from vLLM's"
    if arguments.get("temperature", 0.0) == 0.0:  # whole texts: how a stream splits them into events is timing
        joined = [{i: "".join(t) for i, t in texts(r).items()} for r in (ours, theirs)]
        assert joined[0] == joined[1], f"{case}: the same greedy call gave other text"
        ours_c, theirs_c = candidates(ours), candidates(theirs)
        assert [[[t for t, _ in row] for row in rows] for rows in ours_c.values()] == \
            [[[t for t, _ in row] for row in rows] for rows in theirs_c.values()], f"{case}: other logprob candidates"
        assert [lp for rows in ours_c.values() for row in rows for _, lp in row] == pytest.approx(
            [lp for rows in theirs_c.values() for row in rows for _, lp in row], abs=1e-3)
    else:  # vLLM's seeded sampling is not batch-invariant (seen to differ run to run for n > 1 streams)
        assert texts(ours).keys() == texts(theirs).keys(), f"{case}: other choices than vLLM's"
        assert all("".join(t) for t in texts(ours).values()), f"{case}: a choice without text"
    events = ours if isinstance(ours, list) else [ours]
    assert all(event["model"] == model for event in events)


def test_ab_serves_one_variant_per_user(peers: dict[str, Process]) -> None:
    seen = {}
    for user in ("ann", "bob", "cy", "dee", "eve", "fay"):
        for _ in range(2):
            reply, header = call(peers["serve"], f"{NAME}:ab", "completions", {"user": user, "max_tokens": 2})
            assert reply["model"] == f"{NAME}:ab"
            assert seen.setdefault(user, header) == header  # sticky
    assert set(seen.values()) <= {"base", "patched"}


def test_models_lists_the_three_names_with_vllms_card(peers: dict[str, Process]) -> None:
    ours = peers["serve"].client().models.list().to_dict()
    theirs = peers[NAME].client().models.list().to_dict()
    assert [card["id"] for card in ours["data"]] == [NAME, f"{NAME}:patched", f"{NAME}:ab"]
    assert shape(ours["data"][0]) == shape(theirs["data"][0])
    assert ours["data"][0]["max_model_len"] == theirs["data"][0]["max_model_len"]


def test_other_vllm_endpoints_pass_through(peers: dict[str, Process]) -> None:
    serve, base = peers["serve"], peers[NAME]
    for path, body in (("/tokenize", {"model": NAME, "prompt": PROMPT}),
                       ("/detokenize", {"model": f"{NAME}:patched", "tokens": [504, 3575]}),
                       ("/tokenize", {"prompt": PROMPT})):
        ours, theirs = serve.post(path, body), base.post(path, {**body, "model": NAME} if "model" in body else body)
        assert ours.status_code == theirs.status_code == 200, ours.text
        assert ours.json() == theirs.json()
    assert serve.get("/version").json() == base.get("/version").json()


def test_upstream_client_errors_are_relayed_as_they_are(peers: dict[str, Process]) -> None:
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": -1}
    ours, theirs = peers["serve"].post("/v1/completions", body), peers[NAME].post("/v1/completions", body)
    assert ours.status_code == theirs.status_code == 400
    assert shape(ours.json()) == shape(theirs.json()) and ours.json()["error"]["message"]


def test_openapi_covers_the_fronts_routes_and_the_pass_through_ones(peers: dict[str, Process]) -> None:
    paths = peers["serve"].get("/openapi.json", key=None).json()["paths"]
    assert {"/v1/feedback", "/v1/load_patch", "/ready", "/v1/models"} <= set(paths)  # the front's own
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"} <= set(paths)  # vLLM's
    assert "/v1/load_lora_adapter" not in paths and "post" in paths["/v1/load_patch"]
