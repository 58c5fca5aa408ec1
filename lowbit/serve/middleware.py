"""The ASGI layer around every route: the API key, the request body limit (413), request counts for
/metrics, and the last line of defence: an exception no handler took becomes a 500 in OpenAI's
format with no exception text (it goes to the log under an id the answer names). Starlette's own
last handler would re-raise it, which makes uvicorn drop the keep-alive connection.
"""
from __future__ import annotations

import hmac
import json
import logging
import uuid

from .protocol import ApiError

log = logging.getLogger("lowbit.serve")
DRAIN_LIMIT = 256 * 2**20  # refused bodies up to this size are read and dropped rather than cut off
PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # what --api-key guards (not /health, /metrics, /version)


class TooLarge(BaseException):
    """Raised out of `receive` when a body without Content-Length passes the limit (a BaseException:
    FastAPI turns every Exception raised while it reads a body into its own 400)."""


class Guard:
    def __init__(self, app, max_body_bytes: int, api_key: str | None = None, metrics=None):
        self.app, self.max_body_bytes, self.api_key, self.metrics = app, max_body_bytes, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = False, [500]

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started, status[0] = True, message["status"]
            await send(message)

        async def answer(e: ApiError, close: bool = False):
            body = json.dumps(e.body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), str(v).encode()) for k, v in (e.headers or {}).items()]
            if close:  # the rest of the body is not read: the connection cannot carry another request
                headers.append((b"connection", b"close"))
            await send_tracked({"type": "http.response.start", "status": e.status, "headers": headers})
            await send_tracked({"type": "http.response.body", "body": body})

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                close = refusal.status == 413 and not await _drain(receive, _content_length(scope))
                return await answer(refusal, close=close)
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise TooLarge
                return message

            await self.app(scope, receive_limited, send_tracked)
        except TooLarge:
            if started:
                raise
            await answer(self._too_large(), close=True)
        except Exception:
            if started:  # a stream already under way: nothing can be answered any more
                raise
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error %s on %s %s", ref, scope.get("method"), scope.get("path"))
            await answer(ApiError(500, f"internal error (reference {ref} in the server log)"))
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(_route(scope), str(status[0])).inc()

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope["path"].startswith(PROTECTED):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode("latin-1"), f"Bearer {self.api_key}".encode()):
                return ApiError(401, "a missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes "
                             f"(lowbit serve --max-body-bytes)", code="request_too_large")


def _content_length(scope) -> int | None:
    value = dict(scope.get("headers") or []).get(b"content-length", b"")
    return int(value) if value.isdigit() else None


async def _drain(receive, length: int | None) -> bool:
    """Read and drop a refused body (cheap: no parsing), so that the client reads the answer and
    the connection stays usable; False (close it instead) for a body too large to be worth it."""
    if length is None or length > DRAIN_LIMIT:
        return False
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return message["type"] == "http.request"


def _route(scope) -> str:
    path = scope.get("path", "")
    known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version",
             "/tokenize", "/detokenize")
    return next((k for k in known if path == k or path.startswith(k + "/")), "other")
