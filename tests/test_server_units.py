"""The server's pure parts: routing, the request/reply rewriting, metrics helpers, options, memory sizing."""

from __future__ import annotations

import argparse
import asyncio
import math

import httpx
import pytest

from recallfix.patches.calibrator import Calibrator, VariantCalibration
from recallfix.patches.options import from_args
from recallfix.server.calibration import Answer, FeedbackStore, one_greedy_step
from recallfix.server.cli import add_router_arguments, split_serve_args
from recallfix.server.confidence import Judge, request_threshold
from recallfix.server.config import FrontConfig, RouterConfig
from recallfix.server.errors import ApiError
from recallfix.server.metrics import Metrics, describe_edits, relayed_families
from recallfix.server.observe import (
    CHAT,
    COMPLETIONS,
    NONE_ASKED,
    TokenLogprobs,
    ask_logprobs,
    requested_logprobs,
    tokens_of,
    top_k_entropy,
    trim_logprobs,
)
from recallfix.server.patching import PatchRefused, vllm_lora_rank
from recallfix.server.routing import Router, UnknownModel, user_bucket
from recallfix.server.upstream import Upstream
from recallfix.server.vllm_args import DoesNotFit, GiB, cpu_kv_cache_gib


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
    # Two routers (two replicas of `recallfix router`) agree on every user.
    one, two = Router("m", ab_split=0.25), Router("m", ab_split=0.25)
    for user, bucket in zip(users, buckets, strict=True):
        assert one.route("m:ab", user, True).variant == two.route("m:ab", user, True).variant
        assert (one.route("m:ab", user, True).variant == "patched") == (bucket < 0.25)


# -- what the front changes in requests and replies ------------------------------------------------------
def test_logprobs_are_asked_where_the_client_asked_fewer() -> None:
    body = {"prompt": "x"}
    assert ask_logprobs(COMPLETIONS, body, 20) == NONE_ASKED and body["logprobs"] == 20
    assert requested_logprobs(COMPLETIONS, body) == 20
    mine = {"prompt": "x", "logprobs": 3}
    assert ask_logprobs(COMPLETIONS, mine, 20) == 3 and mine["logprobs"] == 20
    many = {"prompt": "x", "logprobs": 20}
    assert ask_logprobs(COMPLETIONS, many, 20) is None and many["logprobs"] == 20
    echo = {"prompt": "x", "echo": True}  # the reply would carry prompt logprobs: left alone
    assert ask_logprobs(COMPLETIONS, echo, 20) is None and "logprobs" not in echo
    chat = {"messages": []}
    assert ask_logprobs(CHAT, chat, 20) == NONE_ASKED and chat == {"messages": [], "logprobs": True,
                                                                   "top_logprobs": 20}
    two = {"messages": [], "logprobs": True, "top_logprobs": 2}
    assert ask_logprobs(CHAT, two, 20) == 2 and two["top_logprobs"] == 20
    bare = {"messages": [], "logprobs": True}  # the generated tokens' logprobs, no alternatives
    assert ask_logprobs(CHAT, bare, 20) == 0 and bare["top_logprobs"] == 20
    assert ask_logprobs(CHAT, {"messages": [], "logprobs": False, "top_logprobs": 2}, 20) is None  # vLLM refuses it
    assert ask_logprobs(COMPLETIONS, {"prompt": "x"}, 0) is None  # --metrics-logprobs 0: never


def test_trimming_gives_what_vllm_gives_for_the_clients_request() -> None:
    # vLLM's candidates at a position: the generated token first, then the rest by rank
    sampled_third = {" c": -1.5, " a": -0.5, " b": -1.0, " d": -2.0}
    greedy = {" a": -0.5, " b": -1.0, " c": -1.5, " d": -2.0}
    completion = {"choices": [{"index": 0, "text": " c a", "logprobs": {
        "tokens": [" c", " a"], "token_logprobs": [-1.5, -0.5], "text_offset": [0, 2],
        "top_logprobs": [dict(sampled_third), dict(greedy)]}}]}
    trim_logprobs(COMPLETIONS, completion, 2)  # the generated token and the top 2: 3 entries, or 2 where it is one
    assert completion["choices"][0]["logprobs"]["top_logprobs"] == [{" c": -1.5, " a": -0.5, " b": -1.0},
                                                                    {" a": -0.5, " b": -1.0}]
    zero = {"choices": [{"index": 0, "logprobs": {"tokens": [" c"], "top_logprobs": [dict(sampled_third)]}}]}
    trim_logprobs(COMPLETIONS, zero, 0)
    assert zero["choices"][0]["logprobs"]["top_logprobs"] == [{" c": -1.5}]
    chat = {"choices": [{"index": 0, "logprobs": {"content": [{"token": "Hi", "logprob": -0.5, "top_logprobs": [
        {"token": "Hi", "logprob": -0.5}, {"token": "Hey", "logprob": -1.0}, {"token": "Yo", "logprob": -2.0}]}]}}]}
    trim_logprobs(CHAT, chat, 1)
    assert chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [{"token": "Hi", "logprob": -0.5}]


def test_trimming_none_asked_restores_vllms_null_and_token_reading() -> None:
    completion = {"choices": [{"index": 0, "text": " Paris", "logprobs": {
        "tokens": [" Paris", "."], "token_logprobs": [-0.25, -1.0], "text_offset": [0, 6],
        "top_logprobs": [{" Paris": -0.25, " the": -2.8}, {".": -1.0, ",": -1.2}]}}]}
    tokens = tokens_of(COMPLETIONS, completion["choices"][0])
    assert [t.token for t in tokens] == [" Paris", "."] and tokens[0].top1 == (" Paris", -0.25)
    assert tokens[1].top == ((".", -1.0), (",", -1.2))
    trim_logprobs(COMPLETIONS, completion, NONE_ASKED)
    assert completion["choices"][0]["logprobs"] is None
    chat = {"choices": [{"index": 0, "logprobs": {"content": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}]}}]}
    assert tokens_of(CHAT, chat["choices"][0])[0].top == (("Hi", -0.5),)
    # echo's first prompt token has no logprob: skipped, never a crash
    assert tokens_of(COMPLETIONS, {"logprobs": {"tokens": ["A"], "token_logprobs": [None],
                                                "top_logprobs": [None]}}) == []


def test_shadow_step_scores_the_same_prompt_greedily_for_one_token() -> None:
    step = one_greedy_step({"model": "m", "prompt": ["a", "b"], "max_tokens": 50, "temperature": 0.9, "n": 3,
                            "stream": True, "logprobs": 20, "user": "u"})
    assert step == {"model": "m", "prompt": "a", "max_tokens": 1, "temperature": 0.0, "n": 1, "stream": False,
                    "logprobs": 1}
    chat = one_greedy_step({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []})
    assert chat["logprobs"] is True and chat["top_logprobs"] == 1 and "tools" in chat


# -- metrics helpers -------------------------------------------------------------------------------------
def test_top_k_entropy_counts_the_tail_as_one_outcome() -> None:
    assert top_k_entropy([(str(i), math.log(0.25)) for i in range(4)]) == pytest.approx(math.log(4))
    assert top_k_entropy([("a", 0.0)]) == pytest.approx(0.0)
    assert top_k_entropy([("a", math.log(0.5))]) == pytest.approx(math.log(2))


def test_edit_labels_stay_short() -> None:
    assert describe_edits([("L1H0", 0.0), ("L1H3", 1.5)]) == "L1H0=0,L1H3=1.5"
    long = describe_edits([(f"L1N{i}", 0.5) for i in range(20)])
    assert long.endswith(",+12 more") and long.count("=") == 8


def test_relayed_families_merge_by_name_with_a_variant_label() -> None:
    exposition = ('# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n'
                  'vllm:num_requests_running{model_name="m"} 2.0\n'
                  '# HELP python_gc_objects_collected_total GC.\n# TYPE python_gc_objects_collected_total counter\n'
                  'python_gc_objects_collected_total{generation="0"} 5.0\n')
    families = relayed_families({"base": exposition, "patched": exposition.replace("2.0", "3.0")})
    assert [f.name for f in families] == ["vllm:num_requests_running"]  # vllm:* only
    assert {(s.labels["variant"], s.value) for s in families[0].samples} == {("base", 2.0), ("patched", 3.0)}
    text = Metrics("m").render(families).decode()
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


def test_feedback_is_taken_once_per_choice_and_old_answers_expire() -> None:
    store = FeedbackStore(capacity=2)
    store.remember("a", Answer("base", (0.4, None)))
    store.remember("b", Answer("patched", (0.9,), (0.7,)))  # with --calibration: the calibrated one too
    store.remember("empty", Answer("base", (None,)))  # nothing generated: nothing to rate, not stored
    assert store.rate("a", 1) is None
    assert store.rate("a", 0) == ("base", 0.4, None)
    assert store.rate("a", 0) is None  # rated already
    store.remember("c", Answer("base", (0.1,)))  # evicts "a", the oldest
    assert store.rate("b", 0) == ("patched", 0.9, 0.7) and store.rate("c", 0) == ("base", 0.1, None)
    assert store.rate("empty", 0) is None and store.rate("nope", 0) is None


def test_vllm_lora_rank_is_the_smallest_allowed_that_fits() -> None:
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 33, 64, 300, 512)] == [1, 8, 8, 64, 64, 320, 512]
    with pytest.raises(PatchRefused):
        vllm_lora_rank(513)


# -- options ---------------------------------------------------------------------------------------------
def test_options_are_checked_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="--max-concurrency"):
        FrontConfig(served_model_name="m", max_concurrency=0)
    with pytest.raises(ValueError, match="reserved"):
        FrontConfig(served_model_name="m:x")
    with pytest.raises(ValueError, match="--base-url"):
        RouterConfig()
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    args = parser.parse_args(["--served-model-name", "m", "--base-url", "http://b", "--ab-split", "0.2"])
    assert from_args(FrontConfig, args).ab_split == 0.2
    assert from_args(RouterConfig, args).base_url == "http://b"
    with pytest.raises(SystemExit):
        parser.parse_args(["--base-url", "http://b", "--ab-split", "1.5"])


def test_serve_options_after_model_are_recallfixs_and_the_rest_vllms() -> None:
    from recallfix.server.cli import add_serve_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    args = parser.parse_args(["M", "--tensor-parallel-size", "2", "--patch", "p.json", "--dtype=float32",
                              "--port", "9000", "--max-num-seqs", "8"])
    args, vllm_argv = split_serve_args(args)
    assert str(args.patch) == "p.json" and args.port == 9000 and args.model == "M"
    assert vllm_argv == ["--tensor-parallel-size", "2", "--dtype=float32", "--max-num-seqs", "8"]


# -- memory on CPU ---------------------------------------------------------------------------------------
def test_cpu_kv_cache_is_sized_from_free_memory_and_refuses_what_cannot_fit() -> None:
    weights = GiB // 2
    assert cpu_kv_cache_gib(20 * GiB, weights, engines=1) == 4  # capped
    three = cpu_kv_cache_gib(20 * GiB, weights, engines=3)
    assert 1 <= three < cpu_kv_cache_gib(20 * GiB, weights, engines=2)
    with pytest.raises(DoesNotFit, match=r"free memory.*--patch-mode lora"):
        cpu_kv_cache_gib(6 * GiB, weights, engines=3)


# -- hostile bodies --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "why"), [
    (b'{"t": NaN}', "expected value"), (b'{"t": -Infinity}', "invalid number"), (b'{"t": 1e400}', "out of range"),
    (b'{"p": "\\ud800"}', "hex escape"), (b'{"p": "\xff"}', "unicode"), (b"[" * 100_000, "recursion limit"),
    (b'{"a": 1} x', "trailing"),
])
def test_parse_json_refuses_what_vllm_would_misread(body: bytes, why: str) -> None:
    from recallfix.server.protocol import parse_json

    with pytest.raises(ValueError, match=why):
        parse_json(body)
    assert parse_json(b'{"p": "\\ud83d\\ude00", "t": 1e308, "n": 100000000000000000000}') == {
        "p": "\U0001f600", "t": 1e308, "n": 10**20}


def test_sequences_counts_prompts_times_n() -> None:
    from recallfix.server.observe import sequences

    assert sequences({"prompt": "x"}) == sequences({"prompt": [1, 2, 3]}) == 1
    assert sequences({"prompt": ["a", "b"], "n": 3}) == sequences({"prompt": [[1], [2]], "n": 3}) == 6
    assert sequences({"messages": [{"role": "user", "content": "x"}], "n": 10**9}) == 10**9
    assert sequences({"messages": [[{"role": "user", "content": "x"}]] * 4}) == 4  # a batch chat
    assert sequences({"prompt": "x", "n": "many"}) == 1  # vLLM refuses it


def test_upstream_errors_are_put_in_openais_shape() -> None:
    import json

    from recallfix.server.errors import openai_error

    vllm = b'{"error":{"message":"m","type":"BadRequestError","param":null,"code":400}}'
    assert openai_error(400, vllm) == vllm
    fastapi = json.loads(openai_error(400, b'{"detail":"There was an error parsing the body"}'))
    assert fastapi == {"error": {"message": "There was an error parsing the body", "type": "invalid_request_error",
                                 "param": None, "code": None}}
    assert json.loads(openai_error(502, b""))["error"]["message"] == "Bad Gateway"
    assert json.loads(openai_error(404, b"Not Found"))["error"]["message"] == "Not Found"


def test_a_refusal_first_in_an_earlier_assistant_message_is_found_before_vllm_fails_on_it() -> None:
    from recallfix.server.observe import unreadable_input_part

    refusal = {"type": "message", "role": "assistant", "id": "m1", "status": "completed",
               "content": [{"type": "refusal", "refusal": "no"}]}
    text = {**refusal, "content": [{"type": "output_text", "text": "Paris", "annotations": []}]}
    user = {"type": "message", "role": "user", "content": "The capital of France is"}
    assert unreadable_input_part("/v1/responses", {"input": [user, refusal]}) == "input[1].content[0]"
    assert unreadable_input_part("/v1/responses", {"input": [user, text]}) is None
    assert unreadable_input_part("/v1/responses", {"input": "a prompt"}) is None
    assert unreadable_input_part("/v1/chat/completions", {"input": [refusal]}) is None


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), ConnectionResetError("reset"),
                                     AttributeError("'NoneType' object has no attribute 'getpeername'")])
def test_a_probe_that_breaks_in_any_way_reads_as_down(failure: Exception) -> None:
    """The last one is how httpcore fails when the server dies as the connection is made (seen under load): a
    probe must say "down", not raise into the stream it follows."""
    def broken(request: httpx.Request) -> httpx.Response:
        raise failure

    async def probe() -> tuple[bool, bool]:
        upstream = Upstream(role="base", url="http://127.0.0.1:9", up=True)
        async with httpx.AsyncClient(transport=httpx.MockTransport(broken)) as client:
            return await upstream.probe(client), upstream.up

    assert asyncio.run(probe()) == (False, False)


def test_a_requests_abstention_threshold_is_taken_out_and_checked() -> None:
    body = {"model": "m", "recallfix": {"abstain_below": 0.4}}
    assert request_threshold(body, None) == 0.4 and "recallfix" not in body  # vLLM never sees it
    assert request_threshold({"model": "m"}, 0.3) == 0.3  # the server's --abstain-below
    assert request_threshold({"recallfix": {"abstain_below": 0}}, 0.3) is None  # 0 turns it off
    for bad, param in (({"abstain_below": 1.5}, "recallfix.abstain_below"), ({"abstain_below": True},
                       "recallfix.abstain_below"), ({"other": 1}, "recallfix"), ("0.5", "recallfix")):
        with pytest.raises(ApiError) as refused:
            request_threshold({"recallfix": bad}, None)
        assert refused.value.status == 400 and refused.value.param == param


def test_an_abstained_choice_says_the_abstention_text_once_in_openais_shape() -> None:
    judge = Judge("base", VariantCalibration(patch_id=None, calibrator=Calibrator(family="identity")), 0.5,
                  "I don't know.")
    scored = judge.score(0, TokenLogprobs(" Paris", math.log(0.3), ((" Paris", math.log(0.3)), (" Lyon", -2.0))))
    assert scored.abstained and scored.confidence == pytest.approx(0.3) and "below the threshold 0.5" in scored.reason
    completion = {"index": 0, "text": " Paris is", "logprobs": {"tokens": [" Paris"]}, "finish_reason": "length"}
    judge.rewrite("/v1/completions", completion, first_piece=True)
    assert completion == {"index": 0, "text": "I don't know.", "logprobs": None, "finish_reason": "length"}
    later = {"index": 0, "delta": {"content": " is"}, "logprobs": None}
    judge.rewrite("/v1/chat/completions", later, first_piece=False)
    assert later["delta"]["content"] == ""
    last = judge.last_chunk({"id": "c1", "object": "text_completion", "created": 1, "model": "m", "choices": [{}]})
    assert last == {"id": "c1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                    "recallfix": {"variant": "base", "calibrator": judge.calibration.id, "choices": [
                        {"index": 0, "confidence": pytest.approx(0.3), "raw_confidence": pytest.approx(0.3),
                         "abstained": True, "reason": scored.reason}]}}
