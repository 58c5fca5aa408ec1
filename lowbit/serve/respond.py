"""What the routes do: check a request, turn it into token ids (on the tokenizer threads), submit
one sequence per choice (each prompt x n) to the worker, and shape the answer, whole or streamed.

Limits: a prompt's length is checked in characters before tokenizing and in tokens after; at most
`capacity` sequences are admitted (running plus waiting, else 429); a request running past
`timeout` seconds is cancelled (504, or an error event when streaming).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from ..sampling import SamplingParams, TokenLogprobs
from . import text
from .protocol import ApiError, BaseRequest, ChatRequest, CompletionRequest
from .worker import Choice, PromptLogprobs, StreamEvent, WorkerDied

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # lowbit's finish reasons -> OpenAI's
SEED_MOD = 2**64
FINGERPRINT = f"lowbit-{__version__}"
MAX_COALESCED = 64  # stream events written at once at most


class Timeout(Exception):
    pass


class Responder:
    def __init__(self, model, worker, name: str, max_len: int, capacity: int, pool, metrics,
                 timeout: float | None, chat_template: str | None):
        self.model, self.worker, self.name, self.max_len = model, worker, name, max_len
        self.capacity, self.pool, self.metrics, self.timeout = capacity, pool, metrics, timeout
        self.chat_template = chat_template
        self.created = int(time.time())
        self.vocab = model.config.vocab_size
        # characters a prompt may have before it is even tokenized (generous: every token its longest)
        self.max_chars = 2 * max_len * text.max_token_chars(model.tokenizer) if worker.has_tokenizer else 0

    # ------------------------------------------------------------------ checks
    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "lowbit",
                "max_model_len": self.max_len}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def check(self, body: BaseRequest) -> None:
        self.check_model(body.model)
        for field, asked, why in body.refusals():
            if asked:
                raise ApiError(400, f"{why} by lowbit serve", param=field)
        if (body.stop_strings() or body.include_stop_str_in_output or not body.skip_special_tokens) \
                and not self.worker.has_tokenizer:
            raise ApiError(400, "stop strings need a tokenizer and this model has none", param="stop")
        for t in body.stop_token_ids or []:
            self._check_id(t, "stop_token_ids")

    def _check_id(self, t: int, param: str) -> None:
        if not 0 <= t < self.vocab:
            raise ApiError(400, f"token ids must be in [0, {self.vocab})", param=param)

    def _need_tokenizer(self, param: str) -> None:
        if not self.worker.has_tokenizer:
            raise ApiError(400, "this model has no tokenizer (a synthetic model): send token ids", param=param)

    def redact(self, message: str) -> str:
        """A message without the server's paths (the model directory becomes the model's name)."""
        if self.model.path is not None:
            message = message.replace(str(self.model.path.resolve()), self.name).replace(str(self.model.path),
                                                                                           self.name)
        return message

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ------------------------------------------------------------------ routes
    async def completion(self, body: CompletionRequest, http):
        self.check(body)
        prompts = body.prompts()
        if len(prompts) * body.n > self.capacity or not prompts:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} choices: between 1 and this server's "
                                f"capacity of {self.capacity} sequences", param="prompt")
        for p in prompts:
            if isinstance(p, str):
                self._need_tokenizer("prompt")
                text.check_chars(len(p), self.max_chars, self.max_len, "prompt")
            elif len(p) > self.max_len:
                raise ApiError(400, f"the prompt has {len(p)} tokens; this server's context length is "
                                    f"{self.max_len}", param="prompt")
        ids, echoed = await self._off_loop(self._encode_prompts, prompts, body.echo)
        for p in ids:
            for t in p:
                self._check_id(t, "prompt")
        k = body.logprobs
        return await self._answer(http, body, ids, chat=False, logprobs=k, echo=echoed if body.echo else None)

    def _encode_prompts(self, prompts, echo: bool):
        ids = [text.encode(self.model, p) if isinstance(p, str) else list(p) for p in prompts]
        echoed = [p if isinstance(p, str) else (self.model.decode(p) if self.worker.has_tokenizer else "")
                  for p in prompts] if echo else None
        return ids, echoed

    async def chat(self, body: ChatRequest, http):
        self.check(body)
        if body.n > self.capacity:
            raise ApiError(400, f"n={body.n} is over this server's capacity of {self.capacity} sequences", param="n")
        self._need_tokenizer("messages")
        messages = text.chat_messages(body.messages)
        text.check_chars(text.message_chars(messages), self.max_chars, self.max_len, "messages")
        ids = await self._off_loop(text.render_chat, self.model, messages, self.chat_template,
                                   body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs)
        k = (body.top_logprobs or 0) if body.logprobs else None
        return await self._answer(http, body, [ids], chat=True, logprobs=k, echo=None)

    async def tokenize(self, body):
        self.check_model(body.model)
        self._need_tokenizer("prompt")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give a prompt or messages (one of them)", param="prompt")
        if body.prompt is not None:
            text.check_chars(len(body.prompt), self.max_chars, self.max_len, "prompt")
            ids = await self._off_loop(text.encode, self.model, body.prompt, body.add_special_tokens)
        else:
            messages = text.chat_messages(body.messages)
            text.check_chars(text.message_chars(messages), self.max_chars, self.max_len, "messages")
            ids = await self._off_loop(text.render_chat, self.model, messages, self.chat_template,
                                       body.add_generation_prompt)
        return {"count": len(ids), "max_model_len": self.max_len, "tokens": ids}

    async def detokenize(self, body):
        self.check_model(body.model)
        self._need_tokenizer("tokens")
        if len(body.tokens) > self.max_len:
            raise ApiError(400, f"at most {self.max_len} tokens", param="tokens")
        for t in body.tokens:
            self._check_id(t, "tokens")
        return {"prompt": await self._off_loop(self.model.decode, body.tokens)}

    # ------------------------------------------------------------------ generation
    async def _answer(self, http, body, prompts: list[list[int]], chat: bool, logprobs: int | None, echo):
        where = "messages" if chat else "prompt"
        limit = body.limit()
        if limit == 0 and echo is None:
            raise ApiError(400, "max_tokens 0 is only meaningful with echo", param="max_tokens")
        for prompt in prompts:
            if not prompt:
                raise ApiError(400, f"the {where} is empty", param=where)
            room = self.max_len - len(prompt)
            if room < 1:
                raise ApiError(400, f"the {where} has {len(prompt)} tokens; this server's context length is "
                                    f"{self.max_len} (lowbit serve --max-model-len)", param=where)
            if limit is not None and limit > room:
                raise ApiError(400, f"this server's context length is {self.max_len} tokens and the request needs "
                                    f"{len(prompt) + limit} ({len(prompt)} in the {where}, {limit} for the "
                                    f"completion): lower max_tokens or shorten the {where}", param="max_tokens")
        if limit is not None and body.min_tokens > limit:
            raise ApiError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({limit})", param="min_tokens")
        choices = []
        for p in prompts:
            for j in range(body.n):
                seed = body.seed if body.seed is None or j == 0 else (body.seed + j) % SEED_MOD
                try:
                    params = SamplingParams(1.0 if body.temperature is None else body.temperature,
                                            0 if body.top_k in (None, -1) else body.top_k,
                                            1.0 if body.top_p is None else body.top_p, seed, body.min_p,
                                            body.repetition_penalty, body.presence_penalty, body.frequency_penalty,
                                            body.min_tokens, logprobs)
                except ValueError as e:
                    raise ApiError(400, str(e)) from None
                choices.append(Choice(p, params, self.max_len - len(p) if limit is None else limit,
                                      body.stop_strings(), body.stop_token_ids or [], body.ignore_eos,
                                      body.include_stop_str_in_output, body.skip_special_tokens,
                                      logprobs if echo is not None and logprobs is not None else None))
        worker = self.worker
        if not worker.alive:
            raise ApiError(503, "the model worker is not running", code="worker_not_running")
        if worker.outstanding + len(choices) > self.capacity:
            raise ApiError(429, f"the server is at capacity ({self.capacity} sequences running or waiting): retry "
                                f"later", code="queue_full", headers={"Retry-After": "1"})
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        arrival = time.monotonic()
        sink: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i, c in enumerate(choices):
                reqs.append(worker.submit(c, sink, i, arrival))
        except WorkerDied:
            for r in reqs:
                worker.cancel(r)
            raise ApiError(503, "the model worker is not running", code="worker_not_running") from None
        shape = Shape(self, chat, body, prompts, echo, logprobs)
        if body.stream:
            return StreamingResponse(self._stream(reqs, sink, shape, arrival), media_type="text/event-stream")
        collect = asyncio.ensure_future(self._collect(reqs, sink, arrival))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client went away (or this task was cancelled)
                collect.cancel()
                for r in reqs:
                    worker.cancel(r)
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)  # nobody reads this
        if collect.exception() is not None:
            for r in reqs:
                worker.cancel(r)
        return JSONResponse(shape.whole(collect.result()))

    def _deadline(self, arrival: float) -> float | None:
        return None if self.timeout is None else arrival + self.timeout

    async def _next(self, sink: asyncio.Queue, deadline: float | None):
        if deadline is None:
            return await sink.get()
        try:
            return await asyncio.wait_for(sink.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise Timeout from None

    async def _collect(self, reqs, sink, arrival) -> list["Result"]:
        """Every choice's result. A client that goes away cancels this coroutine (and so the
        sequences, in _answer's except)."""
        results = [Result() for _ in reqs]
        left = len(reqs)
        deadline = self._deadline(arrival)
        while left:
            try:
                i, ev = await self._next(sink, deadline)
            except Timeout:
                raise ApiError(504, f"the request ran past this server's timeout of {self.timeout} s",
                               code="timeout") from None
            if isinstance(ev, Exception):
                raise self._failure(ev)
            results[i].add(ev)
            if isinstance(ev, StreamEvent) and ev.finish_reason:
                left -= 1
        self.metrics.latency.observe(time.monotonic() - arrival)
        return results

    def _failure(self, ev: Exception) -> ApiError:
        if isinstance(ev, WorkerDied):
            return ApiError(503, "the model worker stopped while generating", code="worker_not_running")
        return ApiError(500, "internal error: the decode step failed (the server log has the details)")

    async def _stream(self, reqs, sink, shape: "Shape", arrival: float):
        left, finished = len(reqs), False
        deadline = self._deadline(arrival)
        try:
            for chunk in shape.opening(len(reqs)):
                yield _sse(chunk)
            while left:
                # every event already queued goes out in one write: a stream that fell behind (a busy
                # event loop, a stall) catches up with one send instead of one per token
                events = [await self._next(sink, deadline)]
                while not sink.empty() and len(events) < MAX_COALESCED:
                    events.append(sink.get_nowait())
                out = []
                for i, ev in events:
                    if isinstance(ev, Exception):
                        if out:
                            yield "".join(out)
                        raise self._failure(ev)
                    chunk = shape.chunk(i, ev)
                    if chunk is not None:
                        out.append(_sse(chunk))
                    if isinstance(ev, StreamEvent) and ev.finish_reason:
                        left -= 1
                if out:
                    yield "".join(out)
            finished = True
            self.metrics.latency.observe(time.monotonic() - arrival)
            if shape.body.stream_options is not None and shape.body.stream_options.include_usage:
                yield _sse(shape.head | {"choices": [], "usage": shape.usage()})
            yield "data: [DONE]\n\n"
        except Timeout:  # the status line is sent already: report in the stream
            yield _sse(ApiError(504, f"the request ran past this server's timeout of {self.timeout} s",
                                code="timeout").body())
        except ApiError as e:
            yield _sse(e.body())
        finally:  # also when the client disconnects (the generator is closed)
            if not finished:
                for r in reqs:
                    self.worker.cancel(r)


class Result:
    """One choice's events, gathered."""

    def __init__(self):
        self.text, self.ids, self.logprobs = [], [], []
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        self.finish: str | None = None

    def add(self, ev) -> None:
        if isinstance(ev, PromptLogprobs):
            self.prompt_logprobs = ev.entries
            return
        if ev.token_id >= 0:
            self.text.append(ev.text)
            self.ids.append(ev.token_id)
            if ev.logprobs is not None:
                self.logprobs.append(ev.logprobs)
        self.finish = ev.finish_reason


class Shape:
    """The JSON of one request's answer: whole, or chunk by chunk."""

    def __init__(self, service: Responder, chat: bool, body, prompts: list[list[int]], echo, logprobs: int | None):
        self.service, self.chat, self.body, self.prompts, self.echo = service, chat, body, prompts, echo
        self.want_logprobs = logprobs is not None
        self.n = body.n
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                     "model": service.name, "system_fingerprint": FINGERPRINT}
        self.generated = [0] * (len(prompts) * self.n)
        self.offsets = [0] * (len(prompts) * self.n)  # text_offset of the next token (completions)

    def prompt_of(self, i: int) -> list[int]:
        return self.prompts[i // self.n]

    def usage(self) -> dict:
        p, c = sum(len(x) for x in self.prompts), sum(self.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # ---------------------------------------------------------------- whole
    def whole(self, results: list[Result]) -> dict:
        choices = []
        for i, r in enumerate(results):
            self.generated[i] = len(r.ids)
            body = "".join(r.text)
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": body},
                          "logprobs": {"content": self._chat_logprobs(r.logprobs)} if self.want_logprobs else None}
            else:
                lps, prefix = None, ""
                if self.echo is not None:
                    prefix = self.echo[i // self.n]
                if self.want_logprobs:
                    entries = self._echo_entries(i, r.prompt_logprobs) + r.logprobs
                    lps = self._completion_logprobs(i, entries)
                choice = {"index": i, "text": prefix + body, "logprobs": lps}
            choice["finish_reason"] = FINISH.get(r.finish)
            if self.body.return_token_ids:
                choice["token_ids"], choice["prompt_token_ids"] = r.ids, self.prompt_of(i)
            choices.append(choice)
        out = self.head | {"choices": choices, "usage": self.usage()}
        if self.body.return_token_ids and len(self.prompts) == 1:
            out["prompt_token_ids"] = self.prompts[0]
        return out

    # ---------------------------------------------------------------- streamed
    def opening(self, count: int) -> list[dict]:
        head = self.head | {"object": "chat.completion.chunk" if self.chat else "text_completion"}
        self.head = head
        if self.chat:
            return [head | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]} for i in range(count)]
        if self.echo is None or self.want_logprobs:  # with logprobs the prompt goes out with its PromptLogprobs
            return []
        return [head | {"choices": [{"index": i, "text": self.echo[i // self.n], "logprobs": None,
                                     "finish_reason": None}]} for i in range(count)]

    def chunk(self, i: int, ev) -> dict | None:
        if isinstance(ev, PromptLogprobs):
            return self.head | {"choices": [{"index": i, "text": self.echo[i // self.n], "finish_reason": None,
                                             "logprobs": self._completion_logprobs(i, self._echo_entries(i, ev.entries))}]}
        has_token = ev.token_id >= 0
        if has_token:
            self.generated[i] += 1
        lp = [ev.logprobs] if ev.logprobs is not None else []
        if not (ev.text or ev.finish_reason or lp or self.body.return_token_ids):
            return None
        if self.chat:
            choice = {"index": i, "delta": {"content": ev.text} if ev.text else {},
                      "logprobs": {"content": self._chat_logprobs(lp)} if lp else None}
        else:
            choice = {"index": i, "text": ev.text, "logprobs": self._completion_logprobs(i, lp) if lp else None}
        choice["finish_reason"] = FINISH.get(ev.finish_reason)
        if self.body.return_token_ids:
            choice["token_ids"] = [ev.token_id] if has_token else []
        return self.head | {"choices": [choice]}

    # ---------------------------------------------------------------- logprobs
    def _echo_entries(self, i: int, entries) -> list:
        """The prompt's logprob entries, the first (no logprob) as its bare token id."""
        if entries is None:
            return []
        prompt = self.prompt_of(i)
        return [prompt[0]] + list(entries[1:])

    def _completion_logprobs(self, i: int, entries: list) -> dict:
        """OpenAI's legacy format; an int entry is a token without a logprob (the prompt's first)."""
        s = self.service.worker.token_string
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            tid = e if isinstance(e, int) else e.token_id
            tok = s(tid)
            tokens.append(tok)
            offsets.append(self.offsets[i])
            self.offsets[i] += len(tok)
            if isinstance(e, int):
                lps.append(None)
                tops.append(None)
            else:
                lps.append(e.logprob)
                top = {s(t): lp for t, lp in e.top}
                top.setdefault(tok, e.logprob)
                tops.append(top)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, entries: list[TokenLogprobs]) -> list[dict]:
        s = self.service.worker.token_string

        def item(t: int, lp: float) -> dict:
            tok = s(t)
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

        return [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]


async def _disconnected(http) -> None:
    """Returns when the client goes away (the request body is read already, so that is all that comes)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
