"""Schemathesis against `recallfix serve`'s own /openapi.json (the front's routes and every vLLM route it passes
through, with vLLM's request schemas), on SmolLM2-135M with the patch as a LoRA adapter: valid and invalid
requests for every route, and then the server still gives the greedy replies it gave before.

Each reply: no 5xx, in time, and every error in OpenAI's shape (the Anthropic Messages API's in Anthropic's)
with no stack trace in it. All the problems found are reported together, one example per route and status.
A generated `model` is one of the served names half of the time, so that requests reach vLLM rather than
stopping at the front's 404; token counts are capped (`max_tokens` 8, `n` 2, see `bounded`) so that a valid
request costs little.
"""

from __future__ import annotations

import collections
import time

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis import GenerationMode
from server_fixtures import NAME, Process, greedy_replies, shared

pytestmark = [pytest.mark.fuzz, pytest.mark.servers("serve-lora")]

CASES = 1200  # generated requests, over all routes
REQUEST_TIMEOUT_S = 120  # a reply later than this is a hang (the machine is shared: a valid request may queue)
MODELS = [NAME, f"{NAME}:patched", f"{NAME}:ab"]
ERROR_KEYS = {"message", "type", "param", "code"}
ANTHROPIC_ERROR_KEYS = {"type", "message"}
# The most tokens a generated request may ask for: a random valid max_tokens (up to the context) times n would
# make a single case take minutes on CPU, and the fuzzing is about the shape of the requests, not their length.
BOUNDS = {"max_tokens": 8, "max_completion_tokens": 8, "max_output_tokens": 8, "n": 2, "best_of": 2}


@pytest.fixture(scope="module")
def front() -> Process:
    return shared("serve-lora")[0]




def bounded(case: schemathesis.Case, model: str | None) -> None:
    """Cap what a generated body asks vLLM to generate, and name a served model (or leave the generated one)."""
    body = case.body
    if not isinstance(body, dict):
        return
    if model is not None and "model" in body:
        body["model"] = model
    for field, cap in BOUNDS.items():
        if isinstance(body.get(field), int) and not isinstance(body[field], bool) and body[field] > cap:
            body[field] = cap
    # Where no limit is given, chats and responses generate up to the end of the context (512 tokens, a minute here).
    unbounded = {"/v1/chat/completions": "max_tokens", "/v1/chat/completions/batch": "max_tokens",
                 "/v1/responses": "max_output_tokens"}.get(case.path)
    if unbounded and not any(body.get(field) is not None for field in BOUNDS if field != "n"):
        body[unbounded] = BOUNDS[unbounded]


def problem(case: schemathesis.Case, response, elapsed: float) -> str | None:  # noqa: ANN001 (requests')
    """What is wrong with this reply, if anything."""
    # 501: vLLM says a route is not implemented for this model (/v1/systemone without its decision model): an
    # answer, not a failure.
    if response.status_code >= 500 and response.status_code != 501:
        return f"{response.status_code}: {response.text[:500]}"
    if elapsed > REQUEST_TIMEOUT_S:
        return f"answered after {elapsed:.0f} s"
    if "Traceback" in response.text:
        return f"a stack trace in the reply: {response.text[:500]}"
    if response.status_code >= 400:
        try:
            reply = response.json()
        except ValueError:
            reply = None
        reply = reply if isinstance(reply, dict) else {}
        error = reply.get("error")
        # The Anthropic Messages API that vLLM serves answers in its own shape, which its clients read.
        anthropic = case.path.startswith("/v1/messages") and reply.get("type") == "error"
        keys = ANTHROPIC_ERROR_KEYS if anthropic else ERROR_KEYS
        if not (isinstance(error, dict) and set(error) == keys and isinstance(error["message"], str)):
            return f"{response.status_code} not in OpenAI's shape: {response.text[:500]}"
    return None


def fuzz(front: Process, cases: int) -> tuple[collections.Counter[str], collections.Counter[int], dict[str, str]]:
    """Send `cases` generated requests; (requests per route, replies per status, a problem and its request per
    route and kind). A request that gets no reply in REQUEST_TIMEOUT_S is a problem too."""
    schema = schemathesis.openapi.from_url(front.url + "/openapi.json")
    routes: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    problems: dict[str, str] = {}
    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE, headers=front.headers()),
                         schema.as_strategy(GenerationMode.NEGATIVE, headers=front.headers()))

    @hypothesis.settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @hypothesis.given(case=strategy, model=st.one_of(st.none(), st.sampled_from(MODELS)))
    def run(case: schemathesis.Case, model: str | None) -> None:
        bounded(case, model)
        route = f"{case.method} {case.path}"
        routes[route] += 1
        started = time.monotonic()
        try:
            response = case.call(base_url=front.url, timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            problems.setdefault(f"{route} hang", f"no reply in {REQUEST_TIMEOUT_S} s to {case.body!r:.300}")
            return
        statuses[response.status_code] += 1
        if (found := problem(case, response, time.monotonic() - started)) is not None:
            problems.setdefault(f"{route} {response.status_code}", f"{found}\n    request: {case.body!r:.300}")

    run()
    return routes, statuses, problems


def test_fuzz_every_route_then_the_same_greedy_replies(front: Process) -> None:
    before = greedy_replies(front)
    routes, statuses, problems = fuzz(front, CASES)
    print(f"{sum(routes.values())} cases over {len(routes)} routes; statuses {dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(f"{where}: {what}" for where, what in problems.items())
    assert sum(routes.values()) >= 1000
    operations = schemathesis.openapi.from_url(front.url + "/openapi.json").get_all_operations()
    assert set(routes) == {f"{op.ok().method.upper()} {op.ok().path}" for op in operations}  # every route
    assert greedy_replies(front) == before
