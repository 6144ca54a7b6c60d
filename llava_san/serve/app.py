"""The HTTP routes: OpenAI's ``GET /v1/models`` and ``POST /v1/chat/completions``, the web page at ``/``.

Every refusal is an OpenAI-style error body (:mod:`.errors`) with a 4xx status: malformed JSON, a bad
field (:mod:`.requests`), an image that cannot be loaded (:mod:`.images`), a conversation too long for
the model (:mod:`.engine`), an unknown route. An unexpected exception is logged and answered with a
500 carrying its message; the server goes on serving.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import responses
from .engine import Engine
from .errors import APIError, error_body
from .images import load_request_image
from .requests import parse_chat_request

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def _page(name: str) -> str:
    return resources.files(__package__).joinpath("page", name).read_text(encoding="utf-8")


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app serving ``engine``'s model (closed with the app)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    # no /docs: the schema pages load their scripts from a CDN, and the API is OpenAI's
    app = FastAPI(title="llava-san", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    index, script = _page("index.html"), _page("app.js")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        # unknown routes and methods: OpenAI's error body instead of Starlette's {"detail": ...}
        message = f"{exc.detail}: {_request.method} {_request.url.path}"
        return JSONResponse(error_body(message, code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", _request.method, _request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(index)

    @app.get("/app.js")
    async def page_script() -> Response:
        return Response(script, media_type="text/javascript")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [responses.model_entry(engine.model_id)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != engine.model_id:
            return _error(APIError(404, f"The model {model_id!r} does not exist on this server; it serves "
                                   f"{engine.model_id!r}", param="model", code="model_not_found"))
        return JSONResponse(responses.model_entry(engine.model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            return await _chat(engine, request)
        except APIError as err:
            return _error(err)
        except Exception as err:  # noqa: BLE001 - one failed request must not look like a dead server
            log.exception("unexpected error answering a chat completion")
            return _error(APIError(500, f"internal error: {type(err).__name__}: {err}"))

    return app


async def _chat(engine: Engine, request: Request) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    req = parse_chat_request(body, model_id=engine.model_id, max_new_tokens_limit=engine.max_new_tokens_limit,
                             system_prompt=engine.system_prompt)
    # decoding an image is the request's own work: in the thread pool, not on the model's worker
    image = await run_in_threadpool(load_request_image, req.image) if req.image is not None else None
    cid = responses.completion_id()
    if not req.stream:
        result = await engine.complete(req.turns, image, req.max_tokens)
        return JSONResponse(responses.completion(cid, engine.model_id, result))
    events = engine.stream(req.turns, image, req.max_tokens)
    await events.__anext__()  # "start": the prompt fits; a refusal raises here, before the 200 is sent
    return StreamingResponse(_sse(engine.model_id, cid, events, req.include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(model_id: str, cid: str, events: AsyncIterator[tuple[str, Any]],
               include_usage: bool) -> AsyncIterator[str]:
    """The chunks of a stream: the role, the text pieces, the finish reason, the usage (if asked) and
    ``[DONE]``, as OpenAI sends them. An error after the 200 was sent is an ``error`` event."""
    created = int(time.time())  # one timestamp for every chunk of the completion, as OpenAI's

    def event(delta: dict, finish_reason: Optional[str] = None, usage: Optional[dict] = None) -> str:
        return responses.sse(responses.chunk(cid, model_id, delta, finish_reason, usage, created))

    try:
        yield event({"role": "assistant", "content": ""})
        async for kind, value in events:
            if kind == "text":
                yield event({"content": value})
            elif kind == "end":
                yield event({}, value.finish_reason)
                if include_usage:
                    yield event({}, usage=responses.usage(value))
        yield responses.SSE_DONE
    except Exception as err:  # noqa: BLE001 - the status line is gone: report it in the stream
        log.exception("error while streaming %s", cid)
        yield responses.sse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))
    finally:
        await events.aclose()
