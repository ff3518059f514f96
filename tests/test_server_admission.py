"""Who gets served, and by which variant: the NAME:ab split (share and stickiness per user), the
concurrency limit (429 with Retry-After), and the API key. Engine-independent: run on transformers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from server_fixtures import API_KEY, NAME, Server, shared_server, wait_for

from recallfix.server.routing import user_bucket

AB = f"{NAME}:ab"
SPLIT = 0.3  # the shared servers' --ab-split
LIMIT = 4  # and --max-concurrency


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server("transformers")


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        yield client


def ab_request(http: httpx.Client, user: str | None) -> httpx.Response:
    body = {"model": AB, "prompt": "People in Brazil speak", "max_tokens": 1, **({"user": user} if user else {})}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == AB  # the client sees the name it asked for; the header tells the variant
    return response


def test_ab_split_is_sticky_per_user_and_near_the_share(server: Server, http: httpx.Client) -> None:
    before = server.metrics()
    users = [f"user-{i}" for i in range(200)]
    seen = {user: ab_request(http, user).headers["x-recallfix-variant"] for user in users}
    share = sum(v == "patched" for v in seen.values()) / len(seen)
    assert abs(share - SPLIT) < 0.13, share  # 4 standard deviations of a 200-user binomial
    # The documented rule exactly: patched when the user's hash bucket falls below the split.
    assert all((variant == "patched") == (user_bucket(user) < SPLIT) for user, variant in seen.items())
    for user in users[:10]:  # sticky: a user keeps their variant
        assert {ab_request(http, user).headers["x-recallfix-variant"] for _ in range(3)} == {seen[user]}
    after = server.metrics()
    routed = {v: after.delta(before, "recallfix_requests_total", endpoint="/v1/completions", variant=v)
              for v in ("base", "patched")}
    n_patched = sum(v == "patched" for v in seen.values()) + sum(seen[u] == "patched" for u in users[:10]) * 3
    assert routed == {"base": 230 - n_patched, "patched": n_patched}


def test_ab_without_a_user_is_random_at_the_share(http: httpx.Client) -> None:
    variants = [ab_request(http, None).headers["x-recallfix-variant"] for _ in range(150)]
    share = variants.count("patched") / len(variants)
    assert abs(share - SPLIT) < 0.15, share  # 4 standard deviations of a 150-request binomial
    assert set(variants) == {"base", "patched"}


def hold_slot(server: Server) -> socket.socket:
    """A generation request that stays in flight: its headers promise a body that never finishes."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": "
    )
    return sock


def in_flight(server: Server) -> float:
    return server.metrics().value("recallfix_requests_in_flight")


def test_over_max_concurrency_is_429_with_retry_after(server: Server, http: httpx.Client) -> None:
    body = {"model": NAME, "prompt": "Gold", "max_tokens": 1}
    held = [hold_slot(server) for _ in range(LIMIT)]
    try:
        assert wait_for(lambda: in_flight(server) == LIMIT, timeout=30)
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "Traceback" not in refused.text
        chat = http.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 429
        # Only generation counts against the limit: the rest of the API still answers.
        assert http.post("/tokenize", json={"prompt": "Gold"}).status_code == 200
        assert http.get("/v1/models").status_code == 200
    finally:
        for sock in held:
            sock.close()
    assert wait_for(lambda: in_flight(server) == 0, timeout=30)
    assert http.post("/v1/completions", json=body).status_code == 200


def test_api_key_is_required_except_for_probes_and_metrics(server: Server) -> None:
    for path in ("/v1/models", "/tokenizer_info"):
        assert httpx.get(server.url + path, timeout=30).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer " + API_KEY + "x"},
                         timeout=30).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": API_KEY}, timeout=30).status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    unauthorized = httpx.post(server.url + "/v1/load_patch", json={"path": "x"}, timeout=30)
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
