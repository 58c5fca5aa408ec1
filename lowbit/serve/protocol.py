"""OpenAI's request bodies (the fields lowbit serves, plus vLLM's usual extensions) and error format.

Fields that would change the answer but are not implemented (n > 1, logprobs, penalties, ...) are
declared so that a request using them is refused with a 400 naming the field, not silently
answered as if they were absent. Fields not declared at all are ignored, as OpenAI's SDKs send some.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class BaseRequest(BaseModel):
    """The fields both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None  # OpenAI's default: 1.0
    top_p: float | None = None
    top_k: int | None = None  # extension; 0 or -1: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: run to max_tokens
    return_token_ids: bool = False  # extension: the prompt's and the completion's token ids
    n: int = 1
    logprobs: object = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def refusals(self) -> list[tuple[str, bool]]:
        """(field, whether this request asks for something lowbit does not do)."""
        return [("n", self.n != 1), ("logprobs", self.logprobs not in (None, False)),
                ("presence_penalty", self.presence_penalty != 0), ("frequency_penalty", self.frequency_penalty != 0),
                ("logit_bias", bool(self.logit_bias))]

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]


class CompletionRequest(BaseRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refusals(self):
        return super().refusals() + [("echo", self.echo), ("best_of", self.best_of not in (None, 1)),
                                     ("suffix", bool(self.suffix))]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the chat template may use them
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def refusals(self):
        return super().refusals() + [("top_logprobs", bool(self.top_logprobs)), ("tools", bool(self.tools)),
                                     ("response_format", (self.response_format or {}).get("type", "text") != "text")]
