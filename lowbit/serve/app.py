"""The HTTP API (FastAPI): OpenAI's /v1/completions and /v1/chat/completions, answered whole or
streamed as Server-Sent Events; /v1/models, /tokenize, /detokenize, /health, /version, /metrics.
A request is checked here, tokenized on the tokenizer threads, then generated on the worker's
thread (worker.py) in the batch it shares with the others; answers are shaped in respond.py.
"""
from __future__ import annotations

import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import LowbitError
from .metrics import Metrics
from .middleware import Guard
from .protocol import ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest
from .respond import Responder
from .worker import Worker

log = logging.getLogger("lowbit.serve")
DEFAULT_MAX_LEN = 4096  # positions per KV-cache slot when --max-model-len is not given (capped by the model's)
DEFAULT_MAX_BODY = 4 * 2**20  # bytes of one request body
ERRORS = {status: {"model": ErrorResponse, "description": what} for status, what in [
    (400, "An invalid request: a field that is unknown, out of range or unsupported, a prompt that does not fit"),
    (401, "A missing or wrong API key (--api-key)"), (404, "An unknown model or route"),
    (413, "A request body over --max-body-bytes"), (429, "The queue is full (--max-queue): retry later"),
    (500, "An internal error"), (503, "The model worker is not running"),
    (504, "The request ran past --request-timeout")]}


def create_app(model, served_model_name: str | None = None, max_batch: int = 16, max_len: int | None = None, *,
               max_queue: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               request_timeout: float | None = None, api_key: str | None = None, chat_template: str | None = None,
               tokenizer_threads: int = 2, on_fatal=None) -> FastAPI:
    """An OpenAI-compatible app serving `model`, which it owns from then on: its engine gets
    `max_batch` KV-cache slots of `max_len` positions (prompt plus completion) each; at most
    `max_queue` more sequences wait for a slot (default 4 x max_batch) before requests get a 429.
    `on_fatal(error)` is called on the event loop if the model worker dies (the CLI stops the server)."""
    name = served_model_name or (model.path.name if model.path else "lowbit")
    max_len = max_len or min(model.config.max_position_embeddings, DEFAULT_MAX_LEN)
    metrics = Metrics(name)
    worker = Worker(model, max_batch, max_len, metrics)
    worker.on_fatal = on_fatal
    pool = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="lowbit-tokenizer")
    service = Responder(model, worker, name, max_len, max_batch + (4 * max_batch if max_queue is None else max_queue),
                        pool, metrics, request_timeout, chat_template)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        # Everything alive now (model, tokenizer, libraries: ~300k objects) lives as long as the
        # server: keep it out of the cyclic garbage collector, whose full passes over it stall every
        # thread, the worker's decode loop included (175-213 ms each for a server process with a tiny
        # model, measured on a 2-core CPU), which a stream sees as an inter-token-latency spike.
        gc.collect()
        gc.freeze()
        yield
        # Thawed objects go back to the oldest generation, whose size the collector last measured with
        # them frozen: its next automatic pass would come soon and walk them all, at a random moment
        # of whatever this process does next (tests: a stall of seconds inside the next test). Pay for
        # that pass here instead.
        gc.unfreeze()
        gc.collect()
        worker.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lowbit", version=__version__, lifespan=lifespan, responses=ERRORS)
    app.state.service = service
    _add_error_handlers(app, service)
    app.add_middleware(Guard, max_body_bytes=max_body_bytes, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        if not worker.alive:
            raise ApiError(503, f"the model worker is not running ({worker.error or 'not started'})",
                           code="worker_not_running")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        service.check_model(model_id)
        return service.card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await service.completion(body, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        return await service.chat(body, http)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await service.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await service.detokenize(body)

    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema with its 422 (which this server never sends) replaced by the 400 it sends."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _add_error_handlers(app: FastAPI, service) -> None:
    """Every error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        errors, by_field = [], {}
        for err in e.errors():  # a union's members each report: one message per field
            top = next((str(x) for x in err["loc"] if x != "body"), "")
            if top in by_field and err["type"] not in ("extra_forbidden", "invalid_unicode"):
                by_field[top]["msg"] = "none of the accepted types"
                continue
            by_field[top] = dict(err)
            errors.append(by_field[top])
        parts, params = [], []
        for err in errors:
            loc = [str(x) for x in err["loc"] if x != "body"]
            if err["type"] == "extra_forbidden":
                field = ".".join(loc)
                parts.append(f"'{field}' is not a field lowbit serve knows (unsupported or misspelled)")
            elif err["type"] == "invalid_unicode":
                field = err["ctx"]["field"]
                parts.append(err["msg"])
            else:
                field = ".".join(x for x in loc if not x.startswith(("function-", "list[", "str", "int")))
                if err["msg"] == "none of the accepted types":
                    field = loc[0] if loc else field
                parts.append(f"{field}: {err['msg']}" if field else err["msg"])
            params.append(field or None)
        return await api_error(request, ApiError(400, "; ".join(dict.fromkeys(parts)), param=params[0]))

    @app.exception_handler(LowbitError)
    async def lowbit_error(request, e: LowbitError):  # what the model refuses; no server paths in the answer
        return await api_error(request, ApiError(400, service.redact(str(e))))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method, unparsable body
        return await api_error(request, ApiError(e.status_code, str(e.detail)))
