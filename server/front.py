"""The front's proxy: a request for NAME, NAME:patched or NAME:ab goes to the vLLM server of its variant
with only the model name rewritten, and the reply comes back as vLLM wrote it, streaming included.

On the way, completions and chats feed the calibration metrics: token confidence and entropy from the
logprobs (the top 20 asked for, and the extra ones taken out, where the client asked for fewer), usage,
time to first token, shadow scoring by the other variant, and the answers that `/v1/feedback` can rate later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .calibration import Answer, FeedbackStore, ShadowScorer
from .confidence import FIELD as CONFIDENCE_FIELD
from .confidence import Calibration, Judge, request_threshold
from .config import FrontConfig
from .errors import bad_request, model_not_found, openai_error, unavailable
from .metrics import Metrics, PatchState
from .middleware import PARSED_BODY
from .observe import (
    GENERATION_PATHS,
    TokenLogprobs,
    ask_logprobs,
    dumps,
    rename_model,
    requested_logprobs,
    sequences,
    tokens_of,
    trim_logprobs,
    unreadable_input_part,
)
from .routing import Route, Router, UnknownModel, Variant
from .upstream import Upstream

log = logging.getLogger(__name__)

VARIANT_HEADER = "x-recallfix-variant"  # on every reply a variant was chosen for
# Not forwarded either way: hop-by-hop headers, and those the proxy recomputes.
HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailers", "transfer-encoding", "upgrade", "content-length", "authorization",
                         "accept-encoding", "content-encoding", "date", "server"})
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None)
# Idle upstream connections are dropped after 2 s, before vLLM's server closes them (5 s,
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE): with httpx's default, also 5 s, a request sent on a connection as vLLM closed it
# failed (httpx.ReadError), which the front took for the upstream being down (503s under load, tests/test_load.py).
UPSTREAM_KEEPALIVE_S = 2.0


@dataclass(eq=False)
class Target:
    """Where a variant is served: an upstream server and the model's name there."""

    upstream: Upstream
    model: str | None  # None until discovered (router: the upstream's first model)
    in_flight: int = 0

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    async def drain(self, timeout: float) -> bool:
        """Wait until no request through the front is in flight here (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.in_flight > 0:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True


def distinct_upstreams(targets: dict[Variant, Target]) -> list[Upstream]:
    """The upstream servers behind these targets, each once (base and a LoRA adapter share one)."""
    seen: dict[int, Upstream] = {}
    for target in targets.values():
        seen.setdefault(id(target.upstream), target.upstream)
    return list(seen.values())


class Backend(Protocol):
    """What runs behind the front: `recallfix serve`'s child servers, or the router's remote ones."""

    targets: dict[Variant, Target]
    patch: PatchState | None

    def upstreams(self) -> list[Upstream]: ...

    async def start(self, client: httpx.AsyncClient) -> None: ...

    async def tick(self, client: httpx.AsyncClient) -> None: ...

    async def stop(self) -> None: ...


class Front:
    def __init__(self, config: FrontConfig, backend: Backend, metrics: Metrics,
                 calibration: Calibration | None = None) -> None:
        self.config, self.backend, self.metrics, self.calibration = config, backend, metrics, calibration
        metrics.initialize(("base", "patched"))
        self.router = Router(config.name, config.ab_split)
        self.shadow = ShadowScorer(self.score_first, self.metrics, config.shadow_rate,
                                   max_pending=config.max_concurrency)
        self.feedback = FeedbackStore(config.feedback_capacity)
        self.client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64, keepalive_expiry=UPSTREAM_KEEPALIVE_S))

    # -- state -----------------------------------------------------------------------------------------
    @property
    def patched(self) -> bool:
        return "patched" in self.backend.targets

    def model_names(self) -> list[str]:
        return self.router.model_names(self.patched)

    @property
    def ready(self) -> bool:
        return all(t.upstream.up and t.model is not None for t in self.backend.targets.values())

    def upstream_status(self) -> dict[str, bool]:
        return {variant: t.upstream.up for variant, t in self.backend.targets.items()}

    def route(self, model: str, user: Any) -> Route:
        try:
            return self.router.route(model, user if isinstance(user, str) else None, self.patched)
        except UnknownModel as err:
            raise model_not_found(str(err)) from None

    def target(self, variant: Variant) -> Target:
        target = self.backend.targets.get(variant)
        if target is None or not target.upstream.up or target.model is None:
            raise unavailable(f"the {variant} model's vLLM server is not ready (starting, or down); retry shortly")
        return target

    async def recheck(self, target: Target) -> None:
        """After a request to `target` broke: its /health decides whether it is down (a dropped connection under
        load is not a dead server, and marking it down would refuse every request until the next probe)."""
        if not await target.upstream.probe(self.client):
            log.warning("the %s vLLM server does not answer /health: down until it does", target.upstream.role)
            self.metrics.set_upstream(target.upstream.role, False)

    def judge(self, variant: Variant, body: dict[str, Any]) -> Judge | None:
        """This request's confidences and abstention (None without --calibration); its own options taken out."""
        threshold = request_threshold(body, self.config.abstain_below)
        if self.calibration is None:
            if threshold is not None:
                raise bad_request("this server has no --calibration, so it cannot abstain on a calibrated "
                                  "confidence", f"{CONFIDENCE_FIELD}.abstain_below")
            return None
        patch = self.backend.patch
        return Judge(variant, self.calibration.of(variant, patch.patch_id if patch else None), threshold,
                     self.config.abstain_text)

    # -- the pass-through ------------------------------------------------------------------------------
    async def forward(self, request: Request, path: str) -> Response:
        raw = await request.body()
        body: Any = getattr(request.state, PARSED_BODY, None)  # parsed by the admission middleware (not forms)
        if isinstance(body, dict) and (asked := sequences(body)) > self.config.max_prompts:
            raise bad_request(f"the request asks for {asked} sequences (prompts times n); this server takes at most "
                              f"{self.config.max_prompts} in one request (--max-prompts): split it", "prompt")
        if isinstance(body, dict) and (where := unreadable_input_part(path, body)):
            raise bad_request("an earlier assistant message must start with an output_text part: vLLM cannot read a "
                              "refusal there", where)
        route = None
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            route = self.route(body["model"], body.get("user"))
        variant: Variant = route.variant if route else "base"
        request.state.variant = variant
        target = self.target(variant)
        watch = None
        if route is not None:
            body["model"] = target.model
            if path in GENERATION_PATHS:
                judge = self.judge(variant, body)
                asked = ask_logprobs(path, body, self.config.metrics_logprobs)
                entropy = requested_logprobs(path, body) >= max(self.config.metrics_logprobs, 1)
                shadow = self.shadow.draw(self.patched)
                watch = Watch(self, variant, path, body, asked, entropy, shadow, judge)
            raw = dumps(body).encode()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        headers.update(target.upstream.headers())
        if raw:
            headers["content-type"] = request.headers.get("content-type", "application/json")
        # The path as the client wrote it (percent-encoded): decoded, a %7F would make no valid URL.
        raw_path = request.scope.get("raw_path", b"").decode("latin-1") or path
        url = target.upstream.url + raw_path + (f"?{request.url.query}" if request.url.query else "")
        target.enter()
        try:
            upstream = await self.client.send(self.client.build_request(request.method, url, headers=headers,
                                                                        content=raw or None), stream=True)
        except httpx.TransportError as err:
            target.leave()
            log.warning("the %s vLLM server is unreachable: %s: %s", variant, type(err).__name__, err)
            await self.recheck(target)
            raise unavailable(f"the {variant} model's vLLM server is unreachable; retry shortly") from None
        except BaseException:
            target.leave()
            raise
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        out_headers[VARIANT_HEADER] = variant
        requested = route.model if route else None
        content_type = upstream.headers.get("content-type", "")
        if upstream.status_code >= 400 or (route is None and "event-stream" not in content_type):
            return await self._relay_whole(upstream, target, out_headers, requested, rewrite=False)
        if "event-stream" in content_type:
            return StreamingResponse(self._relay_events(upstream, target, requested, watch),
                                     status_code=upstream.status_code, headers=out_headers)
        return await self._relay_whole(upstream, target, out_headers, requested, rewrite=True, watch=watch)

    async def _relay_whole(self, upstream: httpx.Response, target: Target, headers: dict[str, str],
                           requested: str | None, *, rewrite: bool, watch: Watch | None = None) -> Response:
        try:
            content = await upstream.aread()
        except httpx.TransportError as err:
            log.warning("the %s vLLM server failed while answering: %s: %s", target.upstream.role,
                        type(err).__name__, err)
            await self.recheck(target)
            raise unavailable("the vLLM server went away while answering; retry shortly") from None
        finally:
            await upstream.aclose()
            target.leave()
        if upstream.status_code >= 400:  # vLLM's framework errors (FastAPI's {"detail": ...}) put in OpenAI's shape
            content, headers["content-type"] = openai_error(upstream.status_code, content), "application/json"
        if rewrite and "json" in upstream.headers.get("content-type", ""):
            try:
                reply = json.loads(content)
            except ValueError:
                reply = None
            if isinstance(reply, dict):
                if watch is not None:
                    watch.whole(reply)
                rename_model(reply, requested)  # type: ignore[arg-type]
                content = dumps(reply).encode()
        return Response(content, status_code=upstream.status_code, headers=headers)

    async def _relay_events(self, upstream: httpx.Response, target: Target, requested: str | None,
                            watch: Watch | None) -> AsyncIterator[bytes]:
        """Server-sent events line by line, each JSON event with its model name put back (and the logprobs
        the front asked for taken out). If the upstream fails mid-stream, the client gets an error event
        in OpenAI's shape and [DONE], never a hang."""
        done = False
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        event = None
                    if isinstance(event, dict):
                        if watch is not None:
                            watch.piece(event)
                        if requested is not None:
                            rename_model(event, requested)
                        line = "data: " + dumps(event)
                if line == "data: [DONE]" and watch is not None and (last := watch.last_chunk()) is not None:
                    yield f"data: {dumps(last)}\n\n".encode()  # the confidences, in the stream's last chunk
                done = done or line == "data: [DONE]"
                yield (line + "\n").encode()
            if watch is not None:
                watch.finish()
        except httpx.TransportError as err:
            log.warning("the %s vLLM server failed mid-stream: %s: %s", target.upstream.role, type(err).__name__, err)
            if not done:
                error = unavailable("the vLLM server failed while streaming; retry the request")
                yield f"\ndata: {dumps(error.body().model_dump())}\n\ndata: [DONE]\n\n".encode()
            await self.recheck(target)  # after the client has its answer: a hung server's probe takes seconds
        finally:
            await upstream.aclose()
            target.leave()

    # -- shadow scoring --------------------------------------------------------------------------------
    async def score_first(self, variant: Variant, path: str, body: dict[str, Any]) -> tuple[str, float] | None:
        """The top-1 (token, logprob) of `variant` at the first generated position of this request."""
        target = self.backend.targets.get(variant)
        if target is None or not target.upstream.up or target.model is None:
            return None
        target.enter()
        try:
            response = await self.client.post(target.upstream.url + path, json={**body, "model": target.model},
                                              headers=target.upstream.headers())
        except httpx.TransportError:
            return None
        finally:
            target.leave()
        if response.status_code != 200:
            log.debug("shadow scoring by %s: %d %s", variant, response.status_code, response.text[:200])
            return None
        tokens = tokens_of(path, (response.json().get("choices") or [{}])[0])
        return tokens[0].top1 if tokens else None

    # -- feedback --------------------------------------------------------------------------------------
    def rate(self, response_id: str, index: int, correct: bool) -> tuple[Variant, float, float | None] | None:
        rated = self.feedback.rate(response_id, index)
        if rated is not None:
            self.metrics.observe_feedback(rated[0], rated[1], correct, rated[2])
        return rated

    async def aclose(self) -> None:
        await self.shadow.cancel()
        await self.client.aclose()


@dataclass
class _Choice:
    first: TokenLogprobs | None = None
    tokens: int = 0


class Watch:
    """The calibration side of one completion or chat: what its reply says, recorded once it is whole."""

    def __init__(self, front: Front, variant: Variant, path: str, body: dict[str, Any], asked: int | None,
                 entropy: bool, shadow: bool, judge: Judge | None = None) -> None:
        self.front, self.variant, self.path, self.body = front, variant, path, body
        self.asked = asked  # what the client asked for, where the front asked for more (`ask_logprobs`)
        self.entropy, self.shadow, self.judge = entropy, shadow, judge
        self.event: dict[str, Any] | None = None  # the latest streamed chunk: the last one's shape
        self.arrival = time.perf_counter()
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None
        self.id: str | None = None
        self.first_seen = False

    def _tokens(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        if not isinstance(index, int):
            return
        judged = self.judge.choices.get(index) if self.judge is not None else None
        if judged is not None and judged.abstained:  # a later piece of an abstained choice: nothing of it shows
            self.judge.rewrite(self.path, choice, first_piece=False)  # type: ignore[union-attr]
        tokens = tokens_of(self.path, choice)
        if not tokens:
            return
        state = self.choices.setdefault(index, _Choice())
        metrics = self.front.metrics
        if state.first is None:
            state.first = tokens[0]
            metrics.observe_first_token(self.variant, tokens[0])
            if self.judge is not None:
                scored = self.judge.score(index, tokens[0])
                metrics.observe_calibrated(self.variant, scored.confidence, scored.abstained)
                if scored.abstained:
                    self.judge.rewrite(self.path, choice, first_piece=True)
        state.tokens += len(tokens)
        metrics.observe_tokens(self.variant, tokens, self.entropy)

    def _read(self, reply: dict[str, Any]) -> None:
        if isinstance(reply.get("id"), str):
            self.id = reply["id"]
        if isinstance(reply.get("usage"), dict):
            self.usage = reply["usage"]
        # An echo reply's logprobs are the prompt's tokens too (observe.py): not generated tokens, so they feed
        # neither the confidence metrics nor shadow scoring and feedback.
        for choice in () if self.body.get("echo") else reply.get("choices") or ():
            if isinstance(choice, dict):
                self._tokens(choice)
        if self.asked is not None:
            trim_logprobs(self.path, reply, self.asked)

    def whole(self, reply: dict[str, Any]) -> None:
        self._read(reply)
        if self.judge is not None:
            reply[CONFIDENCE_FIELD] = self.judge.field()
        self.finish()

    def last_chunk(self) -> dict[str, Any] | None:
        """The chunk a stream ends with, before [DONE]: the confidences (None without --calibration)."""
        return self.judge.last_chunk(self.event or {}) if self.judge is not None else None

    def piece(self, event: dict[str, Any]) -> None:
        self.event = event
        if not self.first_seen and any(isinstance(c, dict) and (c.get("text") or (c.get("delta") or {}).get(
                "content") or c.get("logprobs")) for c in event.get("choices") or ()):
            self.first_seen = True
            self.front.metrics.observe_ttft(self.variant, time.perf_counter() - self.arrival)
        self._read(event)

    def finish(self) -> None:
        metrics = self.front.metrics
        usage = self.usage or {}
        prompt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
        generated = usage.get("completion_tokens")
        if not isinstance(generated, int):
            generated = sum(c.tokens for c in self.choices.values())
        metrics.observe_usage(self.variant, prompt, generated)
        if self.id and self.choices:
            count = max(self.choices) + 1
            confidences = tuple((c.first and _prob(c.first)) if (c := self.choices.get(i)) else None
                                for i in range(count))
            judged = self.judge.choices if self.judge is not None else {}
            calibrated = tuple(j.confidence if (j := judged.get(i)) else None for i in range(count))
            self.front.feedback.remember(self.id, Answer(self.variant, confidences, calibrated))
        first = self.choices.get(0)
        if self.shadow and first is not None and first.first is not None:
            self.front.shadow.submit(self.variant, self.path, self.body, first.first.top1)


def _prob(token: TokenLogprobs) -> float:
    return math.exp(token.logprob)
