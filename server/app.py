"""The front as one ASGI app, used by `recallfix serve` and `recallfix router`: its own routes (probes,
metrics, models, feedback, load_patch, the OpenAPI document) and every other route of vLLM's API server
passed through (`front.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from recallfix.patches import Patch

from .errors import ApiError, bad_request, not_found, unavailable
from .front import Front
from .metrics import CONTENT_TYPE, PatchState, relayed_families
from .middleware import Admission
from .patching import PatchRefused, read_patch
from .protocol import FeedbackRequest, FeedbackResponse, LoadPatchRequest, LoadPatchResponse, PatchInfo, Status

log = logging.getLogger(__name__)

PASS_THROUGH_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
LoadPatch = Callable[[Patch, httpx.AsyncClient], Awaitable[PatchState]]
# vLLM routes the front keeps to itself, and the routes under them: recallfix manages the adapters and servers
# behind it (SageMaker's /adapters, in vLLM's server too: DELETE /adapters/NAME would unload the patch's adapter).
BLOCKED = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/scale_elastic_ep", "/adapters"})


def blocked(path: str) -> bool:
    return any(path == route or path.startswith(route + "/") for route in BLOCKED)


def validation_error(err: RequestValidationError) -> ApiError:
    errors = err.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return bad_request("the request body is not valid JSON")
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    messages = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        messages.append(f"{where}: {str(e.get('msg', '')).removeprefix('Value error, ')}")
    return bad_request("; ".join(messages), param)


def create_app(front: Front, *, load_patch: LoadPatch | None = None, patch_dir: Path | None = None,
               relay_metrics: bool = False, probe_interval: float = 2.0,
               on_start_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """`load_patch`: how this backend swaps the patch (None: not here, as in the router). `patch_dir`:
    where `/v1/load_patch` may read patch files. `relay_metrics`: add the upstreams' `vllm:*` series."""
    backend = front.backend
    started = asyncio.Event()
    upstream_openapi: dict[str, Any] = {}

    async def supervise() -> None:
        try:
            await backend.start(front.client)
        except Exception as err:
            log.error("the vLLM servers did not start: %s", err)
            if on_start_failure:
                on_start_failure(err)
            return
        started.set()
        front.metrics.set_patch(backend.patch)
        log.info("ready: %s", ", ".join(f"{name}" for name in front.model_names()))
        if backend.patch is not None:
            p = backend.patch
            log.info("patch %s (%s) served as %s: %s", p.patch_id, p.describe(), p.applied, p.detail)
        while True:
            await asyncio.sleep(probe_interval)
            try:
                await backend.tick(front.client)
            except Exception:  # probing must go on
                log.exception("probing the upstreams failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(supervise())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await backend.stop()
        await front.aclose()

    app = FastAPI(title="recallfix", summary="base, patched and A/B variants in front of vLLM's OpenAI server",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Admission, api_key=front.config.api_key, max_concurrency=front.config.max_concurrency,
                       max_body_bytes=front.config.max_body_bytes, metrics=front.metrics)

    # -- errors ----------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        variant = getattr(request.state, "variant", None)
        return err.response({"x-recallfix-variant": variant} if variant else None)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return ApiError(err.status_code, message, type=kind).response()

    # -- probes and metrics ----------------------------------------------------------------------------
    @app.get("/health", response_model=Status, tags=["recallfix"])
    async def health() -> JSONResponse:
        """The front is up (its vLLM servers may still be starting: see /ready)."""
        if getattr(backend, "dead", False):
            return unavailable("a vLLM server died and could not be restarted; replace this process").response()
        return JSONResponse(Status(status="ok", upstreams=front.upstream_status()).model_dump())

    @app.get("/ready", response_model=Status, tags=["recallfix"])
    async def ready() -> JSONResponse:
        """Every variant's vLLM server answers."""
        if not (started.is_set() and front.ready):
            return unavailable(f"not ready: vLLM servers up: {front.upstream_status()}").response()
        return JSONResponse(Status(status="ready", upstreams=front.upstream_status(),
                                   models=front.model_names()).model_dump())

    @app.get("/metrics", tags=["recallfix"])
    async def metrics() -> Response:
        """recallfix_* series (and, from recallfix serve, the vLLM servers' own vllm:* with a variant label)."""
        relayed = []
        if relay_metrics:
            texts = await asyncio.gather(*(_scrape(front.client, u) for u in backend.upstreams()))
            relayed = relayed_families({u.role: t for u, t in zip(backend.upstreams(), texts, strict=True) if t})
        return Response(front.metrics.render(relayed), media_type=CONTENT_TYPE)

    # -- models ----------------------------------------------------------------------------------------
    @app.get("/v1/models", tags=["OpenAI"])
    async def models() -> JSONResponse:
        """vLLM's model card of the base model, once per name: NAME, NAME:patched, NAME:ab."""
        base = front.target("base")
        response = await front.client.get(base.upstream.url + "/v1/models", headers=base.upstream.headers())
        if response.status_code != 200:
            return Response(response.content, status_code=response.status_code,  # type: ignore[return-value]
                            media_type=response.headers.get("content-type"))
        listing = response.json()
        cards = listing.get("data") or []
        card = next((c for c in cards if c.get("id") == base.model), cards[0] if cards else {"object": "model"})
        names = front.model_names()
        listing["data"] = [{**card, "id": name, "parent": None if name == names[0] else names[0]} for name in names]
        return JSONResponse(listing)

    # -- recallfix -------------------------------------------------------------------------------------
    @app.post("/v1/feedback", response_model=FeedbackResponse, tags=["recallfix"])
    async def feedback(body: FeedbackRequest) -> FeedbackResponse:
        """Rate an answer (the `id` of a completion or chat reply, and its choice `index`) once."""
        rated = front.rate(body.id, body.index, body.correct)
        if rated is None:
            raise not_found(f"no unrated answer {body.id!r} (choice {body.index}): unknown, already rated, or "
                            "too old", "id")
        return FeedbackResponse(variant=rated[0], confidence=rated[1], calibrated_confidence=rated[2])

    @app.post("/v1/load_patch", response_model=LoadPatchResponse, tags=["recallfix"])
    async def load_patch_route(body: LoadPatchRequest) -> LoadPatchResponse:
        """Serve another patch as NAME:patched without a restart. A refused patch changes nothing."""
        if load_patch is None:
            raise bad_request("the router serves the patched deployment it is pointed at; roll the new patch out "
                              "there (load_patch is for recallfix serve)", code="not_supported")
        param = "path" if body.path is not None else "patch"
        previous = backend.patch
        try:
            if body.path is not None:
                _check_allowed(Path(body.path), patch_dir)
            patch = read_patch(path=body.path, document=body.patch)
            state = await load_patch(patch, front.client)
        except PatchRefused as err:
            kept = f"patch {previous.patch_id} keeps serving" if previous else "no patch is loaded"
            log.warning("load_patch refused (%s): %s", kept, err)
            raise bad_request(f"patch refused ({kept}): {err}", param, "patch_refused") from None
        front.metrics.set_patch(state)
        log.info("now serving patch %s as %s", state.patch_id, state.applied)
        return LoadPatchResponse(
            patch=PatchInfo(patch_id=state.patch_id, edits=dict(state.edits), biases=list(state.biases),
                            applied=state.applied, detail=state.detail),
            previous_patch_id=previous.patch_id if previous else None, models=front.model_names())

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        """The front's own routes, and the vLLM routes it passes through."""
        doc = dict(app.openapi())
        if not upstream_openapi and front.backend.targets["base"].upstream.up:
            base = front.backend.targets["base"].upstream
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await front.client.get(base.url + "/openapi.json", headers=base.headers(), timeout=30)
                if response.status_code == 200:
                    upstream_openapi.update(response.json())
        own = {path: item for path, item in doc.get("paths", {}).items() if path != "/{path}"}
        passed = {path: item for path, item in upstream_openapi.get("paths", {}).items()
                  if path not in own and not blocked(path)}
        doc["paths"] = {**passed, **own}
        schemas = {**upstream_openapi.get("components", {}).get("schemas", {}),
                   **doc.get("components", {}).get("schemas", {})}
        doc["components"] = {**doc.get("components", {}), "schemas": schemas}
        return JSONResponse(doc)

    @app.api_route("/{path:path}", methods=PASS_THROUGH_METHODS, include_in_schema=False)
    async def pass_through(request: Request, path: str) -> Response:
        full = "/" + path
        if blocked(full):
            raise not_found(f"{full} is not served through recallfix, which manages its vLLM servers itself")
        return await front.forward(request, full)

    return app


def _check_allowed(path: Path, patch_dir: Path | None) -> None:
    if patch_dir is None:
        raise PatchRefused("this server reads no patch files (start it with --patch-dir DIR); send the patch "
                           "document as `patch` instead")
    try:
        resolved, allowed = path.resolve(), patch_dir.resolve()
    except (OSError, ValueError) as err:  # a NUL byte, a symlink loop
        raise PatchRefused(f"{str(path)!r} is not a usable path: {err}") from None
    if not resolved.is_relative_to(allowed):
        raise PatchRefused(f"{path} is outside the patch directory {allowed}")


async def _scrape(client: httpx.AsyncClient, upstream: Any) -> str:
    try:
        response = await client.get(upstream.url + "/metrics", headers=upstream.headers(), timeout=10)
    except httpx.HTTPError:
        return ""
    return response.text if response.status_code == 200 else ""
