"""/metrics of `recallfix serve`: it passes promtool (finding nothing vLLM's own /metrics does not), its
counts match the traffic sent, shadow scoring measures the confidence shift that vLLM's own servers of
base and merged-patched give for the same prompts (asked directly: vLLM's server of the base checkpoint, and the
one the front runs for its patched variant), feedback fills the reliability series, and the vLLM servers' own
`vllm:*` series come along with a `variant` label.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import httpx
import pytest
from server_fixtures import FACT_PROMPTS, NAME, Metrics, Process, wait_for

pytestmark = pytest.mark.servers("serve-merged", "vllm-base", "vllm-merged")


@pytest.fixture
def trio(servers: dict[str, Process]) -> tuple[Process, Process, Process]:
    """`recallfix serve` (merged), and vLLM's own servers of its base and merged-patched checkpoints (the latter
    the front's own upstream, asked directly)."""
    return servers["serve-merged"], servers["vllm-base"], servers["vllm-merged"]


def promtool_findings(text: str) -> set[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: apt-get install prometheus (make install does)"
    done = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=120)
    assert "error" not in done.stderr.lower() or "error while linting" not in done.stderr, done.stderr
    return {line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()}


def settled(server: Process) -> Metrics:
    """A scrape once no shadow scoring is pending (so counts do not move under the test)."""
    return wait_for(lambda: (m := server.metrics()).value("recallfix_shadow_pending") == 0 and m, timeout=300)


def test_metrics_pass_promtool_and_relay_vllms_series(trio) -> None:  # noqa: ANN001
    serve, base, _ = trio
    serve.client().completions.create(model=f"{NAME}:patched", prompt="Hello", max_tokens=2)
    text = serve.metrics_text()
    ours, vllms = promtool_findings(text), promtool_findings(base.metrics_text())
    assert not [f for f in ours if "recallfix" in f], ours
    assert ours <= vllms, f"the relay added problems vLLM's own /metrics does not have: {ours - vllms}"
    metrics = Metrics.parse(text)
    variants = {labels.get("variant") for name, labels, _ in metrics.samples if name.startswith("vllm:")}
    assert variants == {"base", "patched"}
    assert metrics.value("vllm:generation_tokens_total", variant="patched") >= 2
    assert metrics.value("recallfix_upstream_up", variant="patched") == 1
    info = [labels for name, labels, v in metrics.samples if name == "recallfix_patch_info" and v == 1]
    assert len(info) == 1 and info[0]["edits"] == "L29H0=0.4,L29H4=1.28,L29H5=1.07,L29H7=1.31,L29MLP+bias"
    # --patch-mode auto: merged, and why (LoRA cannot carry the bias), in the series and in the log
    assert info[0]["applied"] == "merged" and "LoRA cannot" in info[0]["reason"] and "bias" in info[0]["reason"]
    assert f"served merged ({info[0]['reason']})" in serve.log()


def test_counts_match_the_traffic(trio) -> None:  # noqa: ANN001
    serve = trio[0]
    client = serve.client()
    before = settled(serve)
    usage = {"base": [0, 0, 0], "patched": [0, 0, 0]}  # prompt tokens, generated tokens, choices
    for model, variant in ((NAME, "base"), (f"{NAME}:patched", "patched")):
        reply = client.completions.create(model=model, prompt=FACT_PROMPTS, max_tokens=3, temperature=0.0)
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3, n=2, temperature=0.7, seed=1)
        for r in (reply, chat):
            usage[variant][0] += r.usage.prompt_tokens
            usage[variant][1] += r.usage.completion_tokens
            usage[variant][2] += len(r.choices)
    after = settled(serve)
    for variant, (prompt, generated, choices) in usage.items():
        for endpoint in ("/v1/completions", "/v1/chat/completions"):
            assert after.delta(before, "recallfix_requests_total", variant=variant, endpoint=endpoint,
                               status="200") == 1
        assert after.delta(before, "recallfix_prompt_tokens_total", variant=variant) == prompt
        assert after.delta(before, "recallfix_generated_tokens_total", variant=variant) == generated
        # logprobs were asked for the metrics (and stripped from the replies): every token counted
        assert after.delta(before, "recallfix_token_confidence_count", variant=variant) == generated
        assert after.delta(before, "recallfix_token_entropy_count", variant=variant) == generated
        assert after.delta(before, "recallfix_first_token_confidence_count", variant=variant) == choices
    assert reply.choices[0].logprobs is None and chat.choices[0].logprobs is None


def first_top1(server: Process, model: str, prompt: str) -> tuple[str, float]:
    reply = server.client().completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=1)
    top = reply.choices[0].logprobs.top_logprobs[0]
    return max(top.items(), key=lambda kv: kv[1])


def test_shadow_scoring_measures_the_shift_vllm_gives(trio) -> None:  # noqa: ANN001
    serve, base, merged = trio
    before = settled(serve)
    for prompt in FACT_PROMPTS:
        serve.client().completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0.0)
    after = wait_for(lambda: (m := settled(serve)).delta(before, "recallfix_shadow_agreement_total", variant="base")
                     == len(FACT_PROMPTS) and m, timeout=300)
    assert after, "every request was to be shadowed (--shadow-rate 1)"
    expected_shift, agree = 0.0, 0
    for prompt in FACT_PROMPTS:
        (b_token, b_lp), (p_token, p_lp) = first_top1(base, NAME, prompt), first_top1(merged, f"{NAME}:patched", prompt)
        expected_shift += math.exp(p_lp) - math.exp(b_lp)
        agree += b_token == p_token
    shift = (after.delta(before, "recallfix_shadow_top1_confidence_sum", variant="base", scored="patched")
             - after.delta(before, "recallfix_shadow_top1_confidence_sum", variant="base", scored="base"))
    assert shift == pytest.approx(expected_shift, abs=1e-3)
    assert abs(shift) > 1e-3, "the learned patch moves these probabilities"
    assert after.delta(before, "recallfix_shadow_agreement_total", variant="base", agree="true") == agree
    assert after.delta(before, "recallfix_confidence_shift_count", variant="base") == len(FACT_PROMPTS)


def test_feedback_fills_the_reliability_series_once(trio) -> None:  # noqa: ANN001
    serve, _, merged = trio
    reply = serve.client().completions.create(model=f"{NAME}:patched", prompt=FACT_PROMPTS[0], max_tokens=2,
                                              temperature=0.0)
    before = settled(serve)
    rated = serve.post("/v1/feedback", {"id": reply.id, "correct": True})
    assert rated.status_code == 200, rated.text
    expected = math.exp(first_top1(merged, f"{NAME}:patched", FACT_PROMPTS[0])[1])  # greedy: the top-1
    assert rated.json()["variant"] == "patched" and rated.json()["confidence"] == pytest.approx(expected, abs=1e-3)
    after = serve.metrics()
    assert after.delta(before, "recallfix_feedback_confidence_count", variant="patched", correct="true") == 1
    again = serve.post("/v1/feedback", {"id": reply.id, "correct": False})
    assert again.status_code == 404 and again.json()["error"]["param"] == "id"


def test_probes_and_metrics_need_no_key_and_the_rest_does(trio) -> None:  # noqa: ANN001
    serve = trio[0]
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(serve.url + path, timeout=30).status_code == 200
    for path in ("/v1/models", "/tokenize"):
        refused = httpx.post(serve.url + path, json={"prompt": "x"}, timeout=30) if path == "/tokenize" else \
            httpx.get(serve.url + path, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    unknown = serve.post("/v1/completions", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
