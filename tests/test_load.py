"""The front under load (bench/load_driver.py): many concurrent clients, streaming and not, completions and
chats, over NAME, NAME:patched and NAME:ab, through `recallfix router` over the session's two vLLM servers,
with a small --max-concurrency so that the front refuses some. Bounded: a warm-up round and three measured
rounds of 24 calls, 4 tokens each, on loopback.

Asserted: no 5xx and no reply missing; every reply whole and in OpenAI's shape (streams end with [DONE]); a 429
only when at least --max-concurrency admitted requests were in flight; /metrics counts what the clients got;
nothing left in flight; the front's RSS steady after the warm-up; the feedback records bounded by
--feedback-capacity. The latency quantiles are printed, not asserted (speed is `make bench`'s).
"""

from __future__ import annotations

import asyncio

import psutil
import pytest
from load_driver import drive, report_lines, sticky_violations, unjustified_refusals
from server_fixtures import NAME, Metrics, Process, shared
from test_server_router import router

pytestmark = [pytest.mark.load, pytest.mark.servers("vllm-base", "vllm-merged")]

LIMIT = 4  # --max-concurrency of the front under test
CLIENTS = 6  # more than LIMIT: the front must refuse some, and only those
FEEDBACK_CAPACITY = 16  # below one round's replies: the warm-up's are all dropped by the end
ROUNDS, REQUESTS, MAX_TOKENS = 3, 24, 4
# The front's RSS may grow by this much over the measured rounds. After the warm-up round the connection pools,
# metric series, allocator arenas and the feedback records (already at capacity) exist; what is left is allocator
# noise: +0.1 and +0.9 MiB in two runs here (glibc takes and returns memory in steps of 128 KiB-1 MiB). A leak of
# 57 KiB or more per request (a kept reply with its 20 injected logprobs per token, its events parsed, or its
# upstream response and buffers) fails it over the 72 measured calls.
RSS_GROWTH_BOUND = 4 * 2**20


@pytest.fixture(scope="module")
def front() -> Process:
    base, merged = shared("vllm-base", "vllm-merged")
    process = router(base, patched_url=merged.url, upstream_key=merged.key, extra=(
        "--max-concurrency", str(LIMIT), "--feedback-capacity", str(FEEDBACK_CAPACITY), "--shadow-rate", "1.0",
        "--ab-split", "0.5", "--probe-interval", "2")).wait()
    yield process
    process.stop()


def test_the_front_under_load_answers_every_request_and_holds_steady(front: Process) -> None:
    load = asyncio.run(drive(front.url, NAME, rounds=ROUNDS, requests=REQUESTS, clients=CLIENTS,
                             max_tokens=MAX_TOKENS, api_key=front.key, pid=front.proc.pid, timeout_s=300))
    print("\n".join(report_lines(load, LIMIT)))
    outcomes = load.outcomes(warm_up=True)

    assert [o.problem for o in outcomes if o.problem] == []  # nothing missing, 5xx, malformed or unterminated
    statuses = [o.status for o in outcomes]
    assert set(statuses) == {200, 429}, "over its limit, the front refuses some"
    assert statuses.count(200) == (ROUNDS + 1) * REQUESTS  # every call answered in the end
    assert unjustified_refusals(outcomes, LIMIT) == []
    assert sticky_violations(outcomes) == {}
    assert all(r.settled for r in load.rounds), "requests or shadow scorings left in flight"

    counted = Metrics.parse(front.metrics_text())
    for status in (200, 429):
        assert sum(counted.value("recallfix_requests_total", endpoint=path, status=str(status))
                   for path in ("/v1/completions", "/v1/chat/completions")) == statuses.count(status)

    rss = [r.rss_bytes for r in load.rounds]
    assert max(rss[1:]) - rss[0] < RSS_GROWTH_BOUND, f"the front's RSS grew: {rss}"
    assert psutil.Process(front.proc.pid).children() == []  # the router runs nothing of its own

    # Feedback records: the warm-up's replies were dropped (over 16 answers ago), the latest can be rated.
    answered = sorted((o for o in outcomes if o.status == 200), key=lambda o: o.end)
    for old in (o for o in load.rounds[0].outcomes if o.status == 200):
        assert front.post("/v1/feedback", {"id": old.response_id, "correct": True}).status_code == 404
    for recent in answered[-LIMIT:]:  # among the last 2 * LIMIT remembered (remembered before their last byte)
        rated = front.post("/v1/feedback", {"id": recent.response_id, "correct": True})
        assert rated.status_code == 200 and rated.json()["variant"] == recent.variant
