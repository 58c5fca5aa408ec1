"""The HTTP API (FastAPI): OpenAI's /v1/completions and /v1/chat/completions, answered whole or
streamed as Server-Sent Events, plus /v1/models and /health. A request is checked and tokenized
here, then generated on the worker's thread (worker.py) in the batch it shares with the others.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import jinja2
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import LowbitError
from ..sampling import SamplingParams
from .protocol import ApiError, BaseRequest, ChatRequest, CompletionRequest
from .worker import Request, Worker

DEFAULT_MAX_LEN = 4096  # positions per KV-cache slot when --max-len is not given (capped by the model's)
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # lowbit's finish reasons -> OpenAI's


def create_app(model, served_model_name: str | None = None, max_batch: int = 16, max_len: int | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `model`, which it owns from then on: its engine gets
    `max_batch` KV-cache slots of `max_len` positions (prompt plus completion) each."""
    service = Service(model, served_model_name or (model.path.name if model.path else "lowbit"), max_batch,
                      max_len or min(model.config.max_position_embeddings, DEFAULT_MAX_LEN))

    @asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        yield
        service.worker.stop()

    app = FastAPI(title="lowbit", lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "lowbit", "max_model_len": service.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        service.check(body)
        return await service.answer(http, body, service.prompt_ids(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HttpRequest):
        service.check(body)
        return await service.answer(http, body, service.chat_ids(body), chat=True)

    return app


class Service:
    """What the routes do: check a request, turn it into token ids, submit it, shape the answer."""

    def __init__(self, model, name: str, max_batch: int, max_len: int):
        self.model, self.name, self.max_len = model, name, max_len
        self.created = int(time.time())
        self.worker = Worker(model, max_batch, max_len)

    def check(self, body: BaseRequest) -> None:
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")
        for field, asked in body.refusals():
            if asked:
                raise ApiError(400, f"'{field}' is not supported by lowbit serve (one greedy or sampled choice "
                                    f"per request, no logprobs, penalties, tools or response formats)", param=field)
        if body.stop_strings() and not self.worker.has_tokenizer:
            raise ApiError(400, "stop strings need a tokenizer and this model has none", param="stop")

    def prompt_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"a batch of {len(prompt)} prompts: send one prompt per request "
                                    f"(concurrent requests are batched on the server)", param="prompt")
            prompt = prompt[0]
        ids = self.model.encode(prompt)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def chat_ids(self, body: ChatRequest) -> list[int]:
        messages = []
        for m in body.messages:
            msg = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                if any(part.type != "text" for part in m.content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                msg["content"] = "".join(part.text or "" for part in m.content)
            messages.append(msg)
        try:
            return self.model.encode_chat(messages)
        except jinja2.TemplateError as e:  # e.g. a template that wants alternating roles
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None

    async def answer(self, http: HttpRequest, body: BaseRequest, prompt: list[int], chat: bool) -> Response:
        where = "messages" if chat else "prompt"
        if not prompt:
            raise ApiError(400, f"the {where} is empty", param=where)
        room = self.max_len - len(prompt)
        if room < 1:
            raise ApiError(400, f"the {where} has {len(prompt)} tokens; this server's context length is "
                                f"{self.max_len} (lowbit serve --max-len)", param=where)
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens or room
        if limit > room:
            raise ApiError(400, f"this server's context length is {self.max_len} tokens and the request needs "
                                f"{len(prompt) + limit} ({len(prompt)} in the {where}, {limit} for the completion): "
                                f"lower max_tokens or shorten the {where}", param="max_tokens")
        try:
            top_k = 0 if body.top_k in (None, -1) else body.top_k
            params = SamplingParams(1.0 if body.temperature is None else body.temperature, top_k,
                                    1.0 if body.top_p is None else body.top_p, body.seed)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        req = self.worker.submit(prompt, params, limit, body.stop_strings(), body.ignore_eos)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(req, head, chat, usage, body.return_token_ids),
                                     media_type="text/event-stream")
        result = await self._collect(http, req)
        if result is None:
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        text, ids, finish = result
        choice = _choice(chat, text, finish)
        out = head | {"choices": [choice], "usage": _usage(len(prompt), len(ids))}
        if body.return_token_ids:
            choice["token_ids"], out["prompt_token_ids"] = ids, prompt
        return JSONResponse(out)

    async def _collect(self, http: HttpRequest, req: Request):
        """(text, token ids, finish reason), or None when the client disconnects first."""
        result = asyncio.ensure_future(_gather(req))
        gone = asyncio.ensure_future(_disconnected(http))
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if result.done():
            return result.result()
        result.cancel()
        self.worker.cancel(req)
        return None

    async def _stream(self, req: Request, head: dict, chat: bool, usage: bool, token_ids: bool):
        head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}
        finished, n = False, 0
        try:
            if chat:
                yield _sse(head | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for ev in _events(req):
                n += 1
                if ev.text or ev.finish_reason or token_ids:
                    choice = _choice(chat, ev.text, ev.finish_reason, delta=True)
                    if token_ids:
                        choice["token_ids"] = [ev.token_id]
                    yield _sse(head | {"choices": [choice]})
            finished = True
            if usage:
                yield _sse(head | {"choices": [], "usage": _usage(len(req.seq.prompt), n)})
            yield "data: [DONE]\n\n"
        except Exception as e:  # the status line is sent already: report in the stream
            yield _sse(ApiError(500, f"internal error: {type(e).__name__}: {e}").body())
        finally:  # also when the client disconnects (the generator is closed)
            if not finished:
                self.worker.cancel(req)


async def _events(req: Request):
    while True:
        ev = await req.events.get()
        if isinstance(ev, Exception):
            raise ev
        yield ev
        if ev.finish_reason:
            return


async def _gather(req: Request):
    text, ids, finish = [], [], None
    async for ev in _events(req):
        text.append(ev.text)
        ids.append(ev.token_id)
        finish = ev.finish_reason
    return "".join(text), ids, finish


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client goes away (the request body is read already, so that is all that comes)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _choice(chat: bool, text: str, finish: str | None, delta: bool = False) -> dict:
    if not chat:
        body = {"text": text}
    elif delta:
        body = {"delta": {"content": text} if text else {}}
    else:
        body = {"message": {"role": "assistant", "content": text}}
    return {"index": 0} | body | {"logprobs": None, "finish_reason": FINISH.get(finish)}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        errors = e.errors()
        fields = [".".join(str(x) for x in err["loc"] if x != "body") for err in errors]
        message = "; ".join(f"{f}: {err['msg']}" if f else err["msg"] for f, err in zip(fields, errors))
        first = errors[0]["loc"]
        return await api_error(request, ApiError(400, message, param=str(first[1]) if len(first) > 1 else None))

    @app.exception_handler(LowbitError)
    async def lowbit_error(request, e: LowbitError):  # what the model refuses: no tokenizer, no chat template
        return await api_error(request, ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug or a failed step: still an OpenAI error body
        return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method
        return await api_error(request, ApiError(e.status_code, str(e.detail)))
