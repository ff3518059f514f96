"""/metrics on a live server, for each engine: valid Prometheus text (promtool, prometheus_client), counts
that match the traffic sent, and the calibration metrics (shadow shift, feedback) moving as they should."""

from __future__ import annotations

import math
import shutil
import subprocess

import openai
import pytest
from server_fixtures import FACT_PROMPTS, NAME, Metrics, Server, shared_server, wait_for

from recallfix.patches import Patch

ENGINES = ["vllm", "transformers"]
PATCHED = f"{NAME}:patched"
REQUIRED = [
    "recallfix_requests_total", "recallfix_request_duration_seconds", "recallfix_time_to_first_token_seconds",
    "recallfix_prompt_tokens_total", "recallfix_generated_tokens_total", "recallfix_token_confidence",
    "recallfix_first_token_confidence", "recallfix_token_entropy", "recallfix_patch_info",
    "recallfix_confidence_shift", "recallfix_shadow_top1_confidence", "recallfix_shadow_agreement_total",
    "recallfix_feedback_confidence",
]


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest) -> Server:
    return shared_server(request.param, *(e for e in ENGINES if e != request.param))


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.client()


def settled(server: Server) -> Metrics:
    """A scrape taken when no shadow scoring is pending (it runs in the background, after the reply)."""
    return wait_for(lambda: (m := server.metrics()).value("recallfix_shadow_pending") == 0 and m, timeout=60)


def test_exposition_passes_promtool_and_parses(server: Server, client: openai.OpenAI) -> None:
    reply = client.completions.create(model=NAME, prompt=FACT_PROMPTS[0], max_tokens=2, temperature=0)
    server.post("/v1/feedback", {"id": reply.id, "correct": True}).raise_for_status()
    settled(server)
    text = server.metrics_text()
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    metrics = Metrics.parse(text)
    names = {name for name, _, _ in metrics.samples}
    for family in REQUIRED:
        assert any(n == family or n.startswith(family + "_") for n in names), family
    for name, labels, _ in metrics.samples:  # every series says which model it is about
        assert labels.get("model") == NAME, (name, labels)


def test_patch_info_names_the_patch_and_how_it_is_applied(server: Server) -> None:
    patch = Patch.load(next(a for a in server.args if a.endswith("demo-patch.json")))
    metrics = server.metrics()
    (sample,) = [labels for name, labels, value in metrics.samples if name == "recallfix_patch_info" and value == 1]
    assert sample["patch_id"] == patch.id and sample["variant"] == "patched"
    assert sample["edits"] == "L1H0=0,L1H1=0,L1MLP=0"
    assert sample["applied"] == ("lora" if "vllm" in server.args else "in-memory")


def test_counts_match_the_traffic(server: Server, client: openai.OpenAI) -> None:
    before = settled(server)
    base = [client.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0, logprobs=0)
            for p in FACT_PROMPTS]
    patched = client.completions.create(model=PATCHED, prompt=FACT_PROMPTS[:2], n=2, max_tokens=3, seed=1,
                                        logprobs=0)
    chat = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, stream=True, stream_options={"include_usage": True}))
    for body, key in (({"model": "nope", "prompt": "x"}, "test-key"), ({"model": NAME, "prompt": "x"}, None),
                      ({"model": NAME, "prompt": "x", "top_p": 7}, "test-key")):
        assert server.post("/v1/completions", body, key=key).status_code in (400, 401, 404)
    after = settled(server)

    def d(name: str, **labels: str) -> float:
        return after.delta(before, name, **labels)

    ok = {"endpoint": "/v1/completions", "status": "200"}
    assert d("recallfix_requests_total", **ok, variant="base") == 3
    assert d("recallfix_requests_total", **ok, variant="patched") == 1
    assert d("recallfix_requests_total", endpoint="/v1/chat/completions", status="200", variant="base") == 1
    for status in ("400", "401", "404"):
        assert d("recallfix_requests_total", endpoint="/v1/completions", status=status, variant="none") == 1
    assert d("recallfix_request_duration_seconds_count", endpoint="/v1/completions", variant="base") == 3

    chat_usage = chat[-1].usage
    base_prompt = sum(r.usage.prompt_tokens for r in base) + chat_usage.prompt_tokens
    base_generated = sum(r.usage.completion_tokens for r in base) + chat_usage.completion_tokens
    assert d("recallfix_prompt_tokens_total", variant="base") == base_prompt
    assert d("recallfix_prompt_tokens_total", variant="patched") == patched.usage.prompt_tokens
    assert d("recallfix_generated_tokens_total", variant="base") == base_generated
    assert d("recallfix_generated_tokens_total", variant="patched") == patched.usage.completion_tokens
    # One confidence and one entropy observation per generated token; the confidence is the token's probability.
    assert d("recallfix_token_confidence_count", variant="patched") == patched.usage.completion_tokens
    assert d("recallfix_token_entropy_count", variant="base") == base_generated
    expected = sum(math.exp(lp) for c in patched.choices for lp in c.logprobs.token_logprobs)
    assert d("recallfix_token_confidence_sum", variant="patched") == pytest.approx(expected, abs=1e-4)
    # First-token metrics: once per sequence (4 patched choices), time to first token once per request.
    assert d("recallfix_first_token_confidence_count", variant="patched") == 4
    first = sum(math.exp(c.logprobs.token_logprobs[0]) for c in patched.choices)
    assert d("recallfix_first_token_confidence_sum", variant="patched") == pytest.approx(first, abs=1e-4)
    assert d("recallfix_time_to_first_token_seconds_count", variant="base") == 4
    assert d("recallfix_time_to_first_token_seconds_count", variant="patched") == 1


def test_shadow_scoring_measures_the_confidence_shift(server: Server, client: openai.OpenAI) -> None:
    """--shadow-rate 1: every request is also scored by the other variant at its first position."""

    def top1(model: str, prompt: str) -> tuple[str, float]:
        choice = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                           logprobs=1).choices[0]
        return choice.logprobs.tokens[0], math.exp(choice.logprobs.token_logprobs[0])  # greedy: the top-1

    def shift_of(prompt: str) -> float:
        return top1(PATCHED, prompt)[1] - top1(NAME, prompt)[1]

    prompt = max(FACT_PROMPTS, key=lambda p: abs(shift_of(p)))  # where the patch moves confidence most
    before = settled(server)
    served = [top1(NAME, prompt) for _ in range(3)] + [top1(PATCHED, prompt) for _ in range(2)]
    after = settled(server)
    (base_token, p_base), (patched_token, p_patched) = served[0], served[-1]
    shift = p_patched - p_base
    assert abs(shift) > 0.01  # the patch moves the confidence: the expectations below can fail
    agree = "true" if base_token == patched_token else "false"
    for variant, count in (("base", 3), ("patched", 2)):
        assert after.delta(before, "recallfix_confidence_shift_count", variant=variant) == count
        for le in ("0.01", "0.05", "0.1", "0.2", "+Inf"):
            assert after.delta(before, "recallfix_confidence_shift_bucket", variant=variant, le=le) == (
                count * (shift <= float(le)))
        # The mean shift, as PromQL computes it: sum(patched top-1) - sum(base top-1), over the count.
        top1 = "recallfix_shadow_top1_confidence_sum"
        mean = (after.delta(before, top1, variant=variant, scored="patched")
                - after.delta(before, top1, variant=variant, scored="base")) / count
        assert mean == pytest.approx(shift, abs=1e-4)
        assert after.delta(before, "recallfix_shadow_agreement_total", variant=variant, agree=agree) == count
    # Shadow work is not traffic: no tokens or requests are counted for it.
    assert after.delta(before, "recallfix_generated_tokens_total") == 5


def test_feedback_feeds_the_reliability_histogram(server: Server, client: openai.OpenAI) -> None:
    before = settled(server)
    rated = []  # (variant, confidence, correct)
    cases = [(NAME, "base", True), (PATCHED, "patched", True), (NAME, "base", False), (PATCHED, "patched", False)]
    for i, (model, variant, correct) in enumerate(cases):  # one rating per (variant, correct) series
        reply = client.completions.create(model=model, prompt=FACT_PROMPTS[i % 3], max_tokens=2, logprobs=0, seed=i)
        confidence = math.exp(reply.choices[0].logprobs.token_logprobs[0])
        answer = server.post("/v1/feedback", {"id": reply.id, "correct": correct})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"status": "recorded", "variant": variant,
                                 "confidence": pytest.approx(confidence, abs=1e-5)}
        rated.append((variant, confidence, "true" if correct else "false"))
        again = server.post("/v1/feedback", {"id": reply.id, "correct": correct})
        assert again.status_code == 404 and again.json()["error"]["param"] == "id"  # each answer rated once
    after = server.metrics()
    for variant, confidence, correct in rated:
        labels = {"variant": variant, "correct": correct}
        assert after.delta(before, "recallfix_feedback_confidence_count", **labels) == 1
        assert after.delta(before, "recallfix_feedback_confidence_sum", **labels) == pytest.approx(confidence, abs=1e-5)
        for le in ("0.1", "0.5", "1.0"):  # the reliability diagram's bins
            assert after.delta(before, "recallfix_feedback_confidence_bucket", le=le, **labels) == (
                confidence <= float(le))
    assert server.post("/v1/feedback", {"id": "cmpl-unknown", "correct": True}).status_code == 404
    assert server.post("/v1/feedback", {"id": "x", "correct": True}, key=None).status_code == 401
