"""Admission, before any route runs: request id, API key, the concurrency limit, the body (at most
`max_body_bytes`, and a JSON body must be JSON by `protocol.parse_json`), the request metrics of whatever
comes out, and the catch-all for unexpected errors.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware) so it sees a streamed reply to its end:
a streaming request holds its concurrency slot, and is timed, until its last byte. The catch-all lives
here rather than in an app exception handler so that a 500 also carries the request id, is counted,
and is logged once (Starlette's own handler re-raises, and the server logs the trace a second time).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, bad_request, internal_error, too_large, too_many_requests, unauthorized
from .metrics import NO_VARIANT, Metrics
from .protocol import parse_json

PARSED_BODY = "parsed_body"  # request.state's name of the body `_checked_body` parsed

log = logging.getLogger(__name__)

VARIANT_HEADER = "x-recallfix-variant"  # on every reply a variant was chosen for
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})  # probes, scrapes, the API's doc
OWN_PATHS = frozenset({"/v1/models", "/v1/load_patch", "/v1/feedback", "/openapi.json"})  # not limited
# Endpoint label values of the request metrics; any other path counts as "other" (bounded cardinality).
ENDPOINTS = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/models", "/tokenize",
    "/detokenize", "/tokenizer_info", "/v1/load_patch", "/v1/feedback", "/openapi.json", "/pooling", "/score",
    "/v1/score", "/rerank", "/v1/rerank", "/v1/messages", "/version", "/ping",
})
FORMS = frozenset({b"multipart/form-data", b"application/x-www-form-urlencoded"})  # bodies that are not JSON
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def variant_of(scope: Scope) -> str:
    """The variant a route recorded for this request (`request.state.variant`), if it chose one."""
    return scope.get("state", {}).get("variant", NO_VARIANT)


class Admission:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_concurrency: int, max_body_bytes: int,
                 metrics: Metrics) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._limit = max_concurrency
        self._max_body = max_body_bytes
        self._metrics = metrics
        self._in_flight = 0
        self._gauge = metrics.in_flight.labels(metrics.model)

    def _authorized(self, scope: Scope) -> bool:
        if self._key is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # compare_digest: the time taken does not reveal how much of the key matched.
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        request_id = next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), "")
        if not REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status, status_sent = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, status_sent
            if message["type"] == "http.response.start":
                status, status_sent = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self._admit(path, scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            if status_sent:  # mid-stream: too late for an error reply; the connection just ends
                raise
            variant = variant_of(scope)
            headers = {VARIANT_HEADER: variant} if variant != NO_VARIANT else {}
            await internal_error(request_id).response(headers)(scope, receive, send_with_id)
        finally:
            if path not in OPEN_PATHS:
                endpoint = path if path in ENDPOINTS else "other"
                self._metrics.observe_request(variant_of(scope), endpoint, status, time.perf_counter() - started)

    async def _admit(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            await self._refuse(unauthorized(), scope, receive, send)
            return
        try:
            receive = await self._checked_body(scope, receive)
        except ApiError as err:
            await self._refuse(err, scope, receive, send)
            return
        if path in OWN_PATHS:
            await self.app(scope, receive, send)
            return
        # No await between the check and the increment: the event loop cannot interleave another request.
        if self._in_flight >= self._limit:
            await self._refuse(too_many_requests(self._limit), scope, receive, send)
            return
        self._in_flight += 1
        self._gauge.inc()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._in_flight -= 1
                self._gauge.dec()

        async def send_releasing(message: Message) -> None:
            # Free the slot as the last byte is handed over, before the client can see the reply end: a client
            # that then sends its next request must not be refused for the one it has just been answered.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_releasing)
        finally:
            release()

    async def _checked_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read the whole body (413 past the limit) and check that it is JSON unless it is a form (vLLM reads
        any other body as JSON, whatever its content type); the routes then read it from the returned `receive`."""
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self._max_body:
            raise too_large(self._max_body)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the route sees the disconnect
                return _replay(b"", message, receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self._max_body:
                raise too_large(self._max_body)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"").split(b";")[0].strip()
        if body and content_type.lower() not in FORMS:
            try:
                parsed = parse_json(body)
            except ValueError as err:
                raise bad_request(f"the request body is not valid JSON: {err}", code="invalid_json") from None
            scope.setdefault("state", {})[PARSED_BODY] = parsed  # the pass-through reads it, not the bytes again
        return _replay(body, None, receive)

    @staticmethod
    async def _refuse(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        await error.response()(scope, receive, send)


def _replay(body: bytes, last: Message | None, receive: Receive) -> Receive:
    """A `receive` that gives the body already read (or the message that ended the reading), then whatever
    comes next from the client (its disconnect, which a streaming reply watches for)."""
    first: Message | None = last or {"type": "http.request", "body": body, "more_body": False}

    async def replayed() -> Message:
        nonlocal first
        if first is not None:
            message, first = first, None
            return message
        return await receive()

    return replayed
