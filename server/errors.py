"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, and nothing else.

No reply ever carries a stack trace: unexpected exceptions become a generic 500 that names the
request id, and the trace goes to the server log under that id.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .protocol import ErrorBody, ErrorResponse


class ApiError(Exception):
    """An error reply; raise it anywhere in a request handler."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**self.headers, **(extra_headers or {})}
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=headers)

    def sse(self) -> str:
        """The error as a server-sent event, for failures after a stream has started."""
        return f"data: {self.body().model_dump_json()}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-bytes)",
                    type="invalid_request_error", code="request_too_large")


def unauthorized() -> ApiError:
    return ApiError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                    type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def model_not_found(message: str) -> ApiError:
    return ApiError(404, message, type="invalid_request_error", param="model", code="model_not_found")


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(404, message, type="invalid_request_error", param=param, code="not_found")


def too_many_requests(limit: int) -> ApiError:
    return ApiError(429, f"the server is at its limit of {limit} concurrent requests; retry shortly",
                    type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code="engine_unavailable", headers={"Retry-After": "5"})


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, f"internal server error (request id {request_id}); the details are in the server log",
                    type="server_error", code="internal_error")


def openai_error(status: int, content: bytes) -> bytes:
    """An upstream's error reply (status >= 400) in OpenAI's shape: unchanged where it is already, else its
    message (FastAPI's `detail`, or the text) in an error of that status."""
    try:
        reply = json.loads(content)
    except ValueError:
        reply = None
    try:
        ErrorResponse.model_validate(reply)
        return content
    except ValidationError:
        pass
    detail = reply.get("detail") if isinstance(reply, dict) else None
    if detail is None:
        message = content.decode(errors="replace")[:1000]
    else:
        message = detail if isinstance(detail, str) else json.dumps(detail)[:1000]
    kind = "invalid_request_error" if status < 500 else "server_error"
    return ApiError(status, message or _phrase(status), type=kind).body().model_dump_json().encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"error {status}"
