"""The HTTP layer: FastAPI routes over the `Service`, which speaks to an `Engine`. Knows no engine.

The app answers `/health` from the first moment; the engine starts in the background (a vLLM engine
takes a while), and until it is ready the API answers 503 and `/ready` says so.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .config import ServerConfig
from .engine import Engine, PatchRefused
from .errors import ApiError, bad_request, unavailable
from .metrics import CONTENT_TYPE, Metrics, describe_edits
from .middleware import VARIANT_HEADER, Admission
from .patching import read_patch
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    FeedbackRequest,
    FeedbackResponse,
    LoadPatchRequest,
    LoadPatchResponse,
    ModelCard,
    ModelList,
    PatchInfo,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from .service import Service

log = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the reply: what metrics record
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic's names for union members


def _param(loc: tuple[Any, ...]) -> str | None:
    """`messages.0.content` from pydantic's ('body', 'messages', 0, 'content', 'str')."""
    parts = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int) or (isinstance(part, str) and _FIELD.match(part) and part not in _TYPE_TAGS):
            parts.append(str(part))
        else:
            break
    return ".".join(parts) or None


def validation_error(err: RequestValidationError) -> ApiError:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("the request body is not valid JSON")
    if len(errors) == 1 and tuple(errors[0].get("loc", ())) == ("body",):
        return bad_request("the request body is missing or not a JSON object")
    param = _param(tuple(errors[0].get("loc", ())))
    messages = []
    for e in errors:
        where = _param(tuple(e.get("loc", ()))) or "body"
        message = f"{where}: {str(e.get('msg', '')).removeprefix('Value error, ')}"
        if message not in messages:
            messages.append(message)
    return bad_request("; ".join(messages[:3]), param)


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it, and so the engine's work, if the client disconnects first (a streamed
    reply gets this from Starlette; a whole reply would otherwise be computed for nobody)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled: take the work down with it
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnect()
    return task.result()


def create_app(engine: Engine, config: ServerConfig, *,
               on_engine_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    metrics = Metrics(config.name)
    service = Service(engine, config, metrics)
    created = int(time.time())

    async def start_engine() -> None:
        try:
            await engine.start(read_patch(config.patch) if config.patch else None)
        except Exception as err:
            expected = isinstance(err, PatchRefused | ValueError | OSError)  # bad model/patch: the message says it
            log.error("the %s engine did not start: %s", engine.name, err, exc_info=not expected)
            if on_engine_failure:
                on_engine_failure(err)
            return
        metrics.set_patch(engine.patch_state)
        service.started = True
        state = engine.patch_state
        log.info("ready: engine %s serves %s; max_model_len %d", engine.name,
                 ", ".join(service.model_names()), engine.max_model_len)
        if state is not None:
            log.info("patch %s (%s) served as %s: %s", state.patch_id,
                     describe_edits(state.edits, limit=64, biases=state.biases), state.applied, state.detail)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(start_engine())
        yield
        task.cancel()
        await service.shadow.cancel()
        await engine.stop()

    app = FastAPI(title="recallfix", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Admission, api_key=config.api_key, max_concurrency=config.max_concurrency,
                       metrics=metrics, ready=lambda: service.ready)

    # -- errors ----------------------------------------------------------------------------------------
    def variant_headers(request: Request) -> dict[str, str]:
        variant = getattr(request.state, "variant", None)
        return {VARIANT_HEADER: variant} if variant else {}

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response(variant_headers(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return ApiError(err.status_code, message, type=kind).response()

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, err: ClientDisconnect) -> JSONResponse:
        # The client left while sending its request: nobody to answer, nothing broke.
        log.info("request %s: the client disconnected", getattr(request.state, "request_id", "?"))
        return JSONResponse({}, status_code=CLIENT_CLOSED_REQUEST)

    # Unexpected exceptions: the catch-all is in Admission (a generic 500 with the request id).

    # -- probes and metrics ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        """Process up (and the engine not dead: a dead engine needs a new process)."""
        if engine.dead:
            return unavailable("the engine has died; this process should be replaced").response()
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not service.ready:
            return unavailable("the engine is not ready").response()
        return JSONResponse({"status": "ready", "engine": engine.name, "models": service.model_names()})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.set_ready(engine.name, service.ready)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # -- OpenAI API ------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> ModelList:
        base = config.name
        return ModelList(data=[ModelCard(id=name, created=created, root=base, parent=None if name == base else base,
                                         max_model_len=engine.max_model_len) for name in service.model_names()])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        call = service.start_call(body.model, body.user, "cmpl")
        request.state.variant = call.route.variant
        prompts = service.completion_prompts(body)
        spec = service.completion_spec(body, prompts)
        headers = {VARIANT_HEADER: call.route.variant}
        if body.stream:
            return StreamingResponse(service.complete_stream(body, call, prompts, spec),
                                     media_type="text/event-stream", headers=headers)
        reply = await unless_client_leaves(request, service.complete(body, call, prompts, spec))
        return JSONResponse(reply.model_dump(exclude_none=True), headers=headers)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        call = service.start_call(body.model, body.user, "chatcmpl")
        request.state.variant = call.route.variant
        prompt = service.chat_prompt(body)
        spec = service.chat_spec(body, prompt)
        headers = {VARIANT_HEADER: call.route.variant}
        if body.stream:
            return StreamingResponse(service.chat_stream(body, call, prompt, spec),
                                     media_type="text/event-stream", headers=headers)
        reply = await unless_client_leaves(request, service.chat(body, call, prompt, spec))
        return JSONResponse(reply.model_dump(exclude_none=True), headers=headers)

    # -- vLLM's tokenizer endpoints --------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        service.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            text = service.render_chat(body.messages, body.add_generation_prompt)
            ids = service.tokenize(text, body.add_special_tokens)
        else:
            ids = service.tokenize(body.prompt, body.add_special_tokens)
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        service.check_model(body.model)
        vocab = len(engine.tokenizer)
        if body.tokens and max(body.tokens) >= vocab:
            raise bad_request(f"token id {max(body.tokens)} is outside the vocabulary ({vocab} tokens)", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(tokenizer_config(engine.tokenizer, config.chat_template))

    # -- recallfix -------------------------------------------------------------------------------------
    @app.post("/v1/load_patch")
    async def load_patch(body: LoadPatchRequest) -> LoadPatchResponse:
        param = "path" if body.path is not None else "patch"
        previous = engine.patch_state
        try:
            patch = read_patch(path=body.path, document=body.patch)
            state = await engine.load_patch(patch)
        except PatchRefused as err:
            kept = f"patch {previous.patch_id} keeps serving" if previous else "no patch is loaded"
            log.warning("load_patch refused (%s): %s", kept, err)
            raise bad_request(f"patch refused ({kept}): {err}", param, "patch_refused") from None
        metrics.set_patch(state)
        return LoadPatchResponse(
            patch=PatchInfo(patch_id=state.patch_id, edits=dict(state.edits), biases=list(state.biases),
                            applied=state.applied, detail=state.detail),
            previous_patch_id=previous.patch_id if previous else None, models=service.model_names())

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> FeedbackResponse:
        return service.rate(body)

    return app


def tokenizer_config(tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    """The tokenizer's configuration as vLLM's /tokenizer_info gives it (tokenizer_config.json's fields)."""

    def plain(value: Any) -> Any:
        if hasattr(value, "content"):  # AddedToken
            return value.content
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value if isinstance(value, str | int | float | bool | type(None)) else str(value)

    # File paths say nothing useful to a client and reveal the server's layout.
    hidden = {"vocab_file", "merges_file", "tokenizer_file", "name_or_path"}
    info = {k: plain(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items() if k not in hidden}
    info["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None) or chat_template
    if template:
        info["chat_template"] = template
    return info
