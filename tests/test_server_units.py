"""The server's parts that need no running server: detokenization with stop strings, A/B routing, the
entropy estimate, the feedback store, request validation, and the transformers engine's weight sharing."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from server_fixtures import tiny_model_dir

from recallfix.patches import make_patch
from recallfix.patches.io import load_causal_lm
from recallfix.server.calibration import Answer, FeedbackStore
from recallfix.server.config import ServerConfig
from recallfix.server.engine import PatchRefused, SamplingSpec
from recallfix.server.engines.transformers import TransformersEngine, patched_copy
from recallfix.server.metrics import describe_edits, top_k_entropy
from recallfix.server.patching import vllm_lora_rank
from recallfix.server.protocol import ChatCompletionRequest, CompletionRequest
from recallfix.server.routing import Router, UnknownModel, user_bucket
from recallfix.server.textstream import TextStream


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, object]:
    return load_causal_lm(tiny_model_dir("llama"))


# -- detokenization --------------------------------------------------------------------------------------
def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], str | None]:  # noqa: ANN001
    text = TextStream(tokenizer, stop)
    pieces = []
    for token in ids:
        piece, hit = text.push(token)
        pieces.append(piece)
        if hit is not None:
            return pieces, hit
    pieces.append(text.flush())
    return pieces, None


def test_streamed_text_adds_up_to_the_decoded_text(llama) -> None:  # noqa: ANN001
    _, tokenizer = llama
    ids = tokenizer("The capital of France is Paris. Gold has the chemical symbol Au.").input_ids
    pieces, hit = stream(tokenizer, ids)
    assert hit is None and "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_an_incomplete_character_is_held_back_and_dropped_at_the_end(llama) -> None:  # noqa: ANN001
    _, tokenizer = llama
    ids = tokenizer("café").input_ids
    euro = tokenizer("€").input_ids
    assert len(euro) == 3  # byte-level BPE with a tiny vocabulary: one token per byte of €
    pieces, _ = stream(tokenizer, ids + euro[:1])
    assert "".join(pieces) == "café"  # the lone first byte of € never completes: not emitted
    assert all("\ufffd" not in p for p in pieces)


def test_a_stop_string_across_tokens_ends_the_text_before_it(llama) -> None:  # noqa: ANN001
    _, tokenizer = llama
    ids = tokenizer("The weather today is mild and the sky is clear.").input_ids
    pieces, hit = stream(tokenizer, ids, stop=("mild and", "zzz"))
    assert hit == "mild and"
    assert "".join(pieces) == "The weather today is "


# -- routing ---------------------------------------------------------------------------------------------
def test_model_names_and_routing() -> None:
    router = Router("m", ab_split=0.25)
    assert router.model_names(patched=False) == ["m"]
    assert router.model_names(patched=True) == ["m", "m:patched", "m:ab"]
    assert router.route("m", None, patched=True).variant == "base"
    assert router.route("m:patched", None, patched=True).variant == "patched"
    with pytest.raises(UnknownModel, match="no patch is loaded"):
        router.route("m:patched", None, patched=False)
    with pytest.raises(UnknownModel, match="serves: m, m:patched, m:ab"):
        router.route("other", None, patched=True)


def test_ab_routing_is_a_fixed_function_of_the_user() -> None:
    users = [f"u{i}" for i in range(2000)]
    buckets = [user_bucket(u) for u in users]
    assert all(0 <= b < 1 for b in buckets)
    assert abs(sum(b < 0.25 for b in buckets) / len(users) - 0.25) < 0.04  # uniform enough
    for split, expected in ((0.0, {"base"}), (1.0, {"patched"})):
        router = Router("m", ab_split=split)
        assert {router.route("m:ab", u, patched=True).variant for u in users[:200]} == expected
    router = Router("m", ab_split=0.25)
    for user, bucket in zip(users, buckets, strict=True):
        assert (router.route("m:ab", user, True).variant == "patched") == (bucket < 0.25)


# -- metrics helpers -------------------------------------------------------------------------------------
def test_top_k_entropy_counts_the_tail_as_one_outcome() -> None:
    assert top_k_entropy([(i, math.log(0.25)) for i in range(4)]) == pytest.approx(math.log(4))
    assert top_k_entropy([(0, 0.0)]) == pytest.approx(0.0)
    # 0.5 known, 0.5 unknown tail: the tail counts as one outcome, a lower bound of the true entropy.
    assert top_k_entropy([(0, math.log(0.5))]) == pytest.approx(math.log(2))


def test_edit_labels_stay_short() -> None:
    assert describe_edits([("L1H0", 0.0), ("L1H3", 1.5)]) == "L1H0=0,L1H3=1.5"
    long = describe_edits([(f"L1N{i}", 0.5) for i in range(20)])
    assert long.endswith(",+12 more") and long.count("=") == 8


def test_feedback_is_taken_once_per_choice_and_old_answers_expire() -> None:
    store = FeedbackStore(capacity=2)
    store.remember("a", Answer("base", (0.4, None)))
    store.remember("b", Answer("patched", (0.9,)))
    store.remember("empty", Answer("base", (None,)))  # nothing generated: nothing to rate, not stored
    assert store.rate("a", 1) is None  # choice without a generated token
    assert store.rate("a", 0) == ("base", 0.4)
    assert store.rate("a", 0) is None  # rated already
    store.remember("c", Answer("base", (0.1,)))  # evicts "a", the oldest
    assert store.rate("b", 0) == ("patched", 0.9) and store.rate("c", 0) == ("base", 0.1)
    assert store.rate("empty", 0) is None and store.rate("nope", 0) is None


def test_vllm_lora_rank_is_the_smallest_allowed_that_fits() -> None:
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 33, 64, 300, 512)] == [1, 8, 8, 64, 64, 320, 512]
    with pytest.raises(PatchRefused):
        vllm_lora_rank(513)


# -- requests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, problem", [
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "echo"),
    ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "penalties"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream"),
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
])
def test_completion_requests_are_checked(body: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        CompletionRequest.model_validate(body)


def test_prompt_forms() -> None:
    assert CompletionRequest(model="m", prompt="a").prompts() == ["a"]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]


def test_chat_requests_are_checked() -> None:
    message = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ChatCompletionRequest(model="m", messages=message).messages[0].text() == "ab"
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest(model="m", messages=message, top_logprobs=2)
    with pytest.raises(ValueError, match="tool"):
        ChatCompletionRequest(model="m", messages=message, tools=[{"type": "function"}])


def test_server_options_are_checked() -> None:
    with pytest.raises(ValueError, match="ab-split"):
        ServerConfig(model="m", ab_split=1.5)
    with pytest.raises(ValueError, match="reserved"):
        ServerConfig(model="m", served_model_name="a:b")
    assert ServerConfig(model="/no/such/dir/my-model").name == "/no/such/dir/my-model"
    assert ServerConfig(model=str(Path(__file__).parent)).name == "tests"


# -- the transformers engine -----------------------------------------------------------------------------
def test_patched_copy_shares_every_tensor_but_the_edited_ones(llama) -> None:  # noqa: ANN001
    base, _ = llama
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    patched, edited = patched_copy(base, make_patch(base, {"L1H0": 0.5, "L0N3": 2.0}))
    assert edited == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    base_params, patched_params = dict(base.named_parameters()), dict(patched.named_parameters())
    for name, param in patched_params.items():
        assert (param.data_ptr() == base_params[name].data_ptr()) == (name not in edited), name
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # base untouched
    o_proj = patched_params["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(o_proj[:, :32], before["model.layers.1.self_attn.o_proj.weight"][:, :32] * 0.5)
    assert torch.equal(o_proj[:, 32:], before["model.layers.1.self_attn.o_proj.weight"][:, 32:])


def test_patched_copy_refuses_a_foreign_or_overflowing_patch(llama) -> None:  # noqa: ANN001
    base, _ = llama
    gpt2, _ = load_causal_lm(tiny_model_dir("gpt2"))
    with pytest.raises(PatchRefused, match="made for"):
        patched_copy(base, make_patch(gpt2, {"L1H0": 0.5}))
    with pytest.raises(PatchRefused, match="non-finite"):
        patched_copy(base, make_patch(base, {"L1H0": 1e39}))


def test_transformers_engine_generates_and_scores(llama) -> None:  # noqa: ANN001
    """The engine on its own (no HTTP): greedy equals argmax of the model, logprobs are the model's."""
    base, tokenizer = llama
    engine = TransformersEngine(ServerConfig(model=str(tiny_model_dir("llama")), dtype="float32"))
    prompt = tokenizer("The capital of France is").input_ids

    async def run(spec: SamplingSpec) -> list:
        await engine.start(None)
        try:
            return [c async for c in engine.generate("base", prompt, spec, "t")]
        finally:
            await engine.stop()

    chunks = asyncio.run(run(SamplingSpec(max_tokens=3, temperature=0.0, top_logprobs=2, prompt_logprobs=1)))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        expected = []
        for _ in range(3):
            logprobs = torch.log_softmax(base(ids).logits[0, -1], -1)
            expected.append((int(logprobs.argmax()), float(logprobs.max())))
            ids = torch.cat([ids, logprobs.argmax().view(1, 1)], dim=1)
    got = [(t.token_id, t.logprob) for c in chunks for t in c.logprobs]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in expected], abs=1e-5)
    assert chunks[0].prompt_logprobs[0] is None and len(chunks[0].prompt_logprobs) == len(prompt)
    assert chunks[-1].finish_reason == "length" and all(len(t.top) == 2 for c in chunks for t in c.logprobs)


def test_unexpected_errors_reach_clients_as_a_generic_500() -> None:
    """The catch-all: whatever breaks inside a route, the client gets OpenAI's shape and a request id,
    never the exception's text or a trace (those go to the log)."""
    import time

    from fastapi.testclient import TestClient

    from recallfix.server.app import create_app

    config = ServerConfig(model=str(tiny_model_dir("llama")), engine="transformers", dtype="float32")
    app = create_app(TransformersEngine(config), config)

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        response = client.get("/v1/boom", headers={"x-request-id": "req-42"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "req-42" in error["message"]
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.headers["x-request-id"] == "req-42"
