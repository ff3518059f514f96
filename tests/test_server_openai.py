"""The official `openai` client against a live server, for each engine: completions, chat, streaming,
logprobs, echo, the tokenizer endpoints, and errors in OpenAI's shape."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from server_fixtures import API_KEY, FACT_PROMPTS, NAME, Server, shared_server, sse_events

ENGINES = ["vllm", "transformers"]


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest) -> Server:
    return shared_server(request.param, *(e for e in ENGINES if e != request.param))


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


def tokenize(server: Server, text: str) -> list[int]:
    return server.post("/tokenize", {"prompt": text}).json()["tokens"]


def greedy(client: openai.OpenAI, prompt, **kwargs):  # noqa: ANN001, ANN201
    return client.completions.create(model=NAME, prompt=prompt, temperature=0, **kwargs)


# -- models and completions ------------------------------------------------------------------------------
def test_models_lists_base_patched_and_ab(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME, f"{NAME}:patched", f"{NAME}:ab"]


def test_completion_text_usage_and_variant_header(server: Server, client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=NAME, prompt=FACT_PROMPTS[0], max_tokens=5,
                                                       temperature=0)
    assert raw.headers["x-recallfix-variant"] == "base"
    reply = raw.parse()
    assert reply.object == "text_completion" and reply.model == NAME and reply.id.startswith("cmpl-")
    (choice,) = reply.choices
    assert isinstance(choice.text, str) and choice.logprobs is None
    # The demo model may end its answer (EOS) before max_tokens.
    assert 0 < reply.usage.completion_tokens <= 5 and choice.finish_reason in ("stop", "length")
    if reply.usage.completion_tokens < 5:
        assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(tokenize(server, FACT_PROMPTS[0]))
    patched = client.completions.with_raw_response.create(model=f"{NAME}:patched", prompt=FACT_PROMPTS[0],
                                                          max_tokens=1, temperature=0)
    assert patched.headers["x-recallfix-variant"] == "patched"


def test_prompt_as_text_token_ids_and_lists_agree(server: Server, client: openai.OpenAI) -> None:
    ids = [tokenize(server, p) for p in FACT_PROMPTS[:2]]
    by_text = greedy(client, FACT_PROMPTS[:2], max_tokens=4)
    by_ids = greedy(client, ids, max_tokens=4)
    one = greedy(client, ids[1], max_tokens=4)
    assert [c.index for c in by_text.choices] == [0, 1]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    assert one.choices[0].text == by_text.choices[1].text
    assert by_text.usage.prompt_tokens == sum(map(len, ids))


def test_logprobs_are_a_distribution_and_greedy_picks_the_top(client: openai.OpenAI) -> None:
    reply = greedy(client, FACT_PROMPTS[1], max_tokens=4, logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == reply.usage.completion_tokens > 0
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 4  # the token itself plus the 3 most likely
        assert top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-5


def test_echo_scores_the_prompt_as_vllm_does(server: Server, client: openai.OpenAI) -> None:
    prompt = FACT_PROMPTS[2]
    n_prompt = len(tokenize(server, prompt))
    scored = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt
    assert len(choice.logprobs.tokens) == n_prompt and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in choice.logprobs.token_logprobs[1:])
    both = greedy(client, prompt, max_tokens=3, echo=True, logprobs=1)
    alone = greedy(client, prompt, max_tokens=3, logprobs=1)
    assert both.choices[0].text == prompt + alone.choices[0].text
    lp = both.choices[0].logprobs
    assert lp.token_logprobs[:n_prompt] == pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
    assert lp.token_logprobs[n_prompt:] == pytest.approx(alone.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_seeded_sampling_repeats_and_n_gives_distinct_samples(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        reply = client.completions.create(model=NAME, prompt=FACT_PROMPTS[0], max_tokens=8, n=3, seed=7,
                                          temperature=1.0, top_p=0.95)
        return [c.text for c in reply.choices]

    first = sample()
    assert len(first) == 3 and sample() == first
    assert len(set(first)) > 1  # sample j is seeded seed + j


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = greedy(client, FACT_PROMPTS[0], max_tokens=12).choices[0].text
    assert len(full) >= 4, full
    stop = full[2:4]
    stopped = greedy(client, FACT_PROMPTS[0], max_tokens=12, stop=[stop]).choices[0]
    assert stopped.text == full[: full.index(stop)]
    assert stopped.finish_reason == "stop"


def test_streaming_completion_matches_the_whole_reply(server: Server, client: openai.OpenAI) -> None:
    whole = greedy(client, FACT_PROMPTS[1], max_tokens=6, logprobs=2).choices[0]
    chunks = list(greedy(client, FACT_PROMPTS[1], max_tokens=6, logprobs=2, stream=True,
                         stream_options={"include_usage": True}))
    pieces = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in pieces) == whole.text
    assert [t for c in pieces if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == whole.logprobs.tokens
    assert pieces[-1].choices[0].finish_reason == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == len(whole.logprobs.tokens)
    # On the wire: server-sent events ending in [DONE], and the variant header.
    body = {"model": f"{NAME}:patched", "prompt": FACT_PROMPTS[1], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-recallfix-variant"] == "patched"
        events = sse_events(response)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])


# -- chat ------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}]


def test_chat_completion_with_logprobs(server: Server, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    (choice,) = reply.choices
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens > 0
    for item in content:
        assert len(item.top_logprobs) == 2 and item.bytes == list(item.token.encode())
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy
    templated = server.post("/tokenize", {"messages": MESSAGES}).json()
    assert reply.usage.prompt_tokens == templated["count"]


def test_chat_streaming_matches_the_whole_reply(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


# -- tokenizer endpoints ---------------------------------------------------------------------------------
def test_tokenize_detokenize_and_tokenizer_info_in_vllm_shapes(server: Server) -> None:
    text = FACT_PROMPTS[0]
    tok = server.post("/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert set(tok) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 128
    with_bos = server.post("/tokenize", {"prompt": text}).json()["tokens"]
    assert len(with_bos) == tok["count"] + 1  # the demo tokenizer prepends <s>
    assert server.post("/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": text}
    info = server.get("/tokenizer_info").json()
    assert info["tokenizer_class"] and info["bos_token"] == "<s>" and "chat_template" in info
    assert not {"vocab_file", "tokenizer_file", "name_or_path"} & set(info)


# -- errors ----------------------------------------------------------------------------------------------
def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def test_errors_through_the_openai_client(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt="x", max_tokens=1, logprobs=21)
    assert bad.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt="x", max_tokens=1, extra_body={"frobnicate": 1})
    assert bad.value.body["param"] == "frobnicate"


def test_error_statuses_and_shape(server: Server) -> None:
    ok = {"model": NAME, "prompt": FACT_PROMPTS[0], "max_tokens": 1}
    assert_openai_error(server.post("/v1/completions", ok, key=None), 401)
    assert_openai_error(server.post("/v1/completions", ok, key="nope"), 401)
    assert_openai_error(server.post("/v1/completions", {**ok, "model": "demo:other"}), 404, "model")
    long_prompt = list(range(10, 10 + 200))  # 200 token ids > max_model_len 128
    error = assert_openai_error(server.post("/v1/completions", {**ok, "prompt": long_prompt}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert_openai_error(server.post("/v1/completions", {**ok, "max_tokens": 500}), 400, "max_tokens")
    assert_openai_error(server.post("/v1/completions", {**ok, "prompt": [10**6]}), 400, "prompt")
    assert_openai_error(server.post("/v1/completions", {**ok, "n": 0}), 400, "n")
    assert_openai_error(server.post("/v1/completions", {**ok, "max_tokens": 0}), 400)  # scoring needs echo
    assert_openai_error(server.post("/v1/chat/completions", {"model": NAME, "messages": []}), 400, "messages")
    assert_openai_error(server.post("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot"}]}),
                        400, "messages.0.role")
    raw = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert_openai_error(raw, 400)
    assert_openai_error(server.get("/v1/nothing-here"), 404)
    # An error after the variant was chosen still says which variant refused it.
    routed = server.post("/v1/completions", {**ok, "model": f"{NAME}:patched", "max_tokens": 500})
    assert routed.headers["x-recallfix-variant"] == "patched"
