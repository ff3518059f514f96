"""A load driver for the recallfix front: many concurrent clients, streaming and not, completions and chats,
over NAME, NAME:patched and NAME:ab, every reply checked and timed. tests/test_load.py asserts on what it
returns; bench/bench_load.py writes its numbers into docs/benchmarks.md.

A round is a fixed plan of calls (the model names x paths x stream or not, in turn) taken by `clients`
workers. A call refused with 429 is tried again by its worker after `backoff_s` (0.5 s, shorter than the front's
Retry-After, to keep it at its limit), so every round does the same work however often the front refuses; each
refusal is kept as an outcome of its own. After each round the driver waits until the front has nothing in
flight (no request, no shadow scoring; from /metrics) and reads the front process's resident memory.

Every 200 must be a whole reply in OpenAI's shape: the model name the client asked for, the variant header of
that name (NAME:ab sticky per user), exactly `max_tokens` generated tokens (ignore_eos; usage), and for a
stream JSON events that end with `data: [DONE]`. A 429 must carry OpenAI's error and Retry-After, and is
justified only if at least `--max-concurrency` admitted requests were in flight at some moment of its life.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import httpx

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPTS = ("The capital of France is", "The chemical symbol of gold is", "The currency of Japan is the",
           "Tokyo is the capital of", "The largest planet of the solar system is", "Water boils at a temperature of")
USERS = 10  # distinct `user`s of a plan: NAME:ab must send each to one variant
VARIANT_HEADER = "x-recallfix-variant"
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


@dataclass(frozen=True)
class Call:
    """One request of a plan."""

    model: str
    path: str
    stream: bool
    user: str
    prompt: str

    @property
    def mode(self) -> str:
        return "stream" if self.stream else "whole"

    def body(self, max_tokens: int) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "user": self.user, "stream": self.stream}
        if self.stream:
            body["stream_options"] = {"include_usage": True}  # the last event counts the tokens
        if self.path == CHAT:
            return {**body, "messages": [{"role": "user", "content": self.prompt}]}
        return {**body, "prompt": self.prompt}


def plan(name: str, requests: int) -> list[Call]:
    """`requests` calls cycling over the three names, both paths, streamed and not (12 kinds)."""
    kinds = [(model, path, stream) for model in (name, f"{name}:patched", f"{name}:ab") for path in (COMPLETIONS, CHAT)
             for stream in (False, True)]
    return [Call(*kinds[i % len(kinds)], user=f"user-{i % USERS}", prompt=PROMPTS[i % len(PROMPTS)])
            for i in range(requests)]


@dataclass
class Outcome:
    """What one attempt got: its status (0: no reply at all), times (perf_counter: sent, last byte read), the
    variant that served it, its reply id, and what is wrong with the reply (None: nothing)."""

    call: Call
    status: int
    start: float
    end: float
    variant: str | None = None
    response_id: str | None = None
    problem: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


# -- checking a reply (pure) ----------------------------------------------------------------------------------
def expected_variants(call: Call) -> set[str]:
    suffix = call.model.rpartition(":")[2] if ":" in call.model else ""
    return {"": {"base"}, "patched": {"patched"}}.get(suffix, {"base", "patched"})


def check_whole(call: Call, variant: str | None, text: str, max_tokens: int) -> tuple[str | None, str | None]:
    """(reply id, problem) of a 200 that is not streamed."""
    try:
        reply = json.loads(text)
    except ValueError:
        return None, f"not JSON: {text[:200]!r}"
    if not isinstance(reply, dict) or not reply.get("choices"):
        return None, f"no choices: {text[:200]!r}"
    problem = _check_common(call, variant, reply.get("model"), reply.get("usage"), max_tokens)
    return reply.get("id"), problem


def check_stream(call: Call, variant: str | None, lines: Sequence[str], max_tokens: int) -> tuple[str | None,
                                                                                                  str | None]:
    """(reply id, problem) of a streamed 200, from its lines."""
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    if not data or data[-1] != "[DONE]":
        return None, f"the stream does not end with [DONE]: {data[-2:]!r}"
    if data.count("[DONE]") != 1:
        return None, "[DONE] more than once"
    events = []
    for item in data[:-1]:
        try:
            event = json.loads(item)
        except ValueError:
            return None, f"an event is not JSON: {item[:200]!r}"
        if not isinstance(event, dict) or "error" in event:
            return None, f"an error event: {item[:200]!r}"
        events.append(event)
    if not events:
        return None, "no event before [DONE]"
    names = {e.get("model") for e in events}
    ids = {e.get("id") for e in events}
    if len(names) != 1 or len(ids) != 1:
        return None, f"events disagree on the model {names} or the id {ids}"
    usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
    return ids.pop(), _check_common(call, variant, names.pop(), usage, max_tokens)


def _check_common(call: Call, variant: str | None, model: object, usage: object, max_tokens: int) -> str | None:
    if model != call.model:
        return f"model {model!r} in the reply to {call.model!r}"
    if variant not in expected_variants(call):
        return f"variant header {variant!r} for {call.model!r}"
    generated = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if generated != max_tokens:
        return f"{generated} tokens generated, {max_tokens} asked with ignore_eos"
    return None


def check_refusal(headers: httpx.Headers, text: str) -> str | None:
    try:
        error = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        return f"a 429 that is not JSON: {text[:200]!r}"
    if error.get("type") != "rate_limit_error" or not headers.get("retry-after"):
        return f"a 429 without OpenAI's rate_limit_error or Retry-After: {text[:200]!r}"
    return None


# -- driving --------------------------------------------------------------------------------------------------
async def attempt(client: httpx.AsyncClient, url: str, call: Call, max_tokens: int,
                  headers: dict[str, str]) -> Outcome:
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + call.path, json=call.body(max_tokens), headers=headers) as response:
            variant = response.headers.get(VARIANT_HEADER)
            if response.status_code == 200 and call.stream:
                lines = [line async for line in response.aiter_lines()]
                end = time.perf_counter()
                reply_id, problem = check_stream(call, variant, lines, max_tokens)
                return Outcome(call, 200, start, end, variant, reply_id, problem)
            text = (await response.aread()).decode(errors="replace")
    except httpx.HTTPError as err:  # timeouts included: the front must answer within the client's time
        return Outcome(call, 0, start, time.perf_counter(), problem=f"no reply: {type(err).__name__}: {err}")
    end = time.perf_counter()
    if response.status_code == 200:
        reply_id, problem = check_whole(call, variant, text, max_tokens)
        return Outcome(call, 200, start, end, variant, reply_id, problem)
    if response.status_code == 429:
        return Outcome(call, 429, start, end, variant, problem=check_refusal(response.headers, text))
    return Outcome(call, response.status_code, start, end, variant,
                   problem=f"status {response.status_code}: {text[:300]!r}")


@dataclass
class Round:
    outcomes: list[Outcome]
    wall_s: float
    rss_bytes: int | None  # the front process's, once it had nothing in flight
    settled: bool  # whether it had nothing in flight before `rss_bytes` was read


@dataclass
class Load:
    """A run: `rounds[0]` warms up (connections, caches, the metric series), the rest are measured."""

    name: str
    clients: int
    max_tokens: int
    rounds: list[Round] = field(default_factory=list)

    def outcomes(self, warm_up: bool = False) -> list[Outcome]:
        return [o for r in self.rounds[0 if warm_up else 1:] for o in r.outcomes]


async def run_round(client: httpx.AsyncClient, url: str, calls: Sequence[Call], *, clients: int, max_tokens: int,
                    headers: dict[str, str], backoff_s: float, max_refusals: int) -> tuple[list[Outcome], float]:
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in calls:
        queue.put_nowait(call)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while not queue.empty():
            call = queue.get_nowait()
            for _ in range(max_refusals + 1):
                outcome = await attempt(client, url, call, max_tokens, headers)
                outcomes.append(outcome)
                if outcome.status != 429:
                    break
                await asyncio.sleep(backoff_s)
            else:
                outcome.problem = f"refused {max_refusals + 1} times in a row"

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes, time.perf_counter() - start


async def settle(client: httpx.AsyncClient, url: str, timeout_s: float) -> bool:
    """Wait until the front has no request in flight and no shadow scoring pending (True), or `timeout_s`."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        text = (await client.get(url + "/metrics")).text
        busy = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name in ("recallfix_requests_in_flight", "recallfix_shadow_pending"))
        if busy == 0:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)


async def drive(url: str, name: str, *, rounds: int, requests: int, clients: int, max_tokens: int,
                api_key: str | None = None, pid: int | None = None, timeout_s: float = 300.0,
                backoff_s: float = 0.5, max_refusals: int = 1000) -> Load:
    """A warm-up round and `rounds` measured ones of `requests` calls each. `pid`: the front's process, whose
    resident memory is read after each round (psutil). `timeout_s`: the most one attempt may take."""
    import psutil

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    calls = plan(name, requests)
    load = Load(name, clients, max_tokens)
    front = psutil.Process(pid) if pid else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        for _ in range(rounds + 1):
            outcomes, wall = await run_round(client, url, calls, clients=clients, max_tokens=max_tokens,
                                             headers=headers, backoff_s=backoff_s, max_refusals=max_refusals)
            settled = await settle(client, url, timeout_s)
            load.rounds.append(Round(outcomes, wall, front.memory_info().rss if front else None, settled))
    return load


# -- what a run shows (pure) ----------------------------------------------------------------------------------
def unjustified_refusals(outcomes: Sequence[Outcome], limit: int) -> list[tuple[Outcome, int]]:
    """The 429s with fewer than `limit` admitted requests in flight at any moment of their life, each with the
    most there could have been. An admitted request holds its slot at the front within its own life at the
    client (from before it is sent to after its last byte is read), so a 429 the front gave rightly overlaps
    at least `limit` of them."""
    admitted = sorted((o for o in outcomes if o.status != 429), key=lambda o: o.start)
    wrong = []
    for refused in (o for o in outcomes if o.status == 429):
        overlapping = sum(1 for o in admitted if o.start < refused.end and o.end > refused.start)
        if overlapping < limit:
            wrong.append((refused, overlapping))
    return wrong


def sticky_violations(outcomes: Iterable[Outcome]) -> dict[str, set[str]]:
    """NAME:ab users served by more than one variant."""
    seen: dict[str, set[str]] = defaultdict(set)
    for o in outcomes:
        if o.status == 200 and o.call.model.endswith(":ab") and o.variant:
            seen[o.call.user].add(o.variant)
    return {user: variants for user, variants in seen.items() if len(variants) > 1}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, linear between the closest ranks (numpy's default)."""
    if len(values) < 2:
        return {key: values[0] if values else float("nan") for key in QUANTILES}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {key: cuts[round(q * 100) - 1] for key, q in QUANTILES.items()}


def latency_rows(outcomes: Sequence[Outcome]) -> list[dict]:
    """Per model name and mode (and all together): answered, refused, 5xx, latency quantiles of the 200s."""
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[(o.call.model, o.call.mode)].append(o)
    groups[("all", "both")] = list(outcomes)
    rows = []
    for (model, mode), group in groups.items():
        answered = [o.latency for o in group if o.status == 200]
        rows.append({"model": model, "mode": mode, "answered": len(answered),
                     "refused": sum(o.status == 429 for o in group), "5xx": sum(o.status >= 500 for o in group),
                     **quantiles(answered)})
    return rows


def report_lines(load: Load, limit: int) -> list[str]:
    """Markdown: latency per model name and mode, then per round throughput, refusals and the front's RSS."""
    lines = ["| model | mode | answered | 429 | 5xx | p50 (s) | p90 (s) | p99 (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in latency_rows(load.outcomes()):
        lines.append(f"| {r['model']} | {r['mode']} | {r['answered']} | {r['refused']} | {r['5xx']} | {r['p50']:.2f} | "
                     f"{r['p90']:.2f} | {r['p99']:.2f} |")
    lines += ["", "| round | wall (s) | answered/s | generated tokens/s | 429 | 5xx | front RSS (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for i, rnd in enumerate(load.rounds):
        answered = sum(o.status == 200 for o in rnd.outcomes)
        rss = f"{rnd.rss_bytes / 2**20:.1f}" if rnd.rss_bytes is not None else "-"
        lines.append(f"| {'warm-up' if i == 0 else i} | {rnd.wall_s:.1f} | {answered / rnd.wall_s:.2f} | "
                     f"{answered * load.max_tokens / rnd.wall_s:.1f} | {sum(o.status == 429 for o in rnd.outcomes)} | "
                     f"{sum(o.status >= 500 for o in rnd.outcomes)} | {rss} |")
    lines += ["", f"{load.clients} clients against --max-concurrency {limit}; {load.max_tokens} tokens per request "
              "(ignore_eos, greedy); latency: from sending to the last byte read, of the 200s of the measured rounds"]
    return lines
