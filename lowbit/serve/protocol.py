"""OpenAI's request bodies as lowbit serves them (plus vLLM's usual extensions), and the error format.

Every field is checked: a field lowbit does not know is a 400 naming it (nothing is silently
ignored), except the short allow-list `IGNORED` of OpenAI fields that cannot change an answer.
Fields that would change the answer but are not implemented (tools, logit_bias, best_of != n, ...)
are declared and refused unless given their neutral value. Numbers must be finite and in range,
and every string anywhere in a body must be valid Unicode (no lone UTF-16 surrogates).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from ..sampling import MAX_LOGPROBS, SEED_RANGE

IGNORED = ("user", "metadata")  # accepted and ignored: they label a request, they do not change it
MAX_CHOICES = 128  # prompts x n of one request
MAX_STOP = 16  # stop strings / stop token ids of one request


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error lowbit serve answers (status 400, 401, 404, 413, 429, 500, 503 or 504)."""
    error: ErrorDetail


def check_unicode(data):
    """Raise the validation error of a body holding a string that is not valid Unicode."""
    bad = lone_surrogate(data)
    if bad:
        raise PydanticCustomError("invalid_unicode", "'{field}' is not valid UTF-8 text (it holds a lone UTF-16 "
                                  "surrogate)", {"field": bad})


def lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string in `value` (a parsed JSON body) that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            bad = lone_surrogate(k, path) or lone_surrogate(v, f"{path}.{k}" if path else str(k))
            if bad:
                return bad
    elif isinstance(value, list):
        for i, v in enumerate(value):
            bad = lone_surrogate(v, f"{path}[{i}]")
            if bad:
                return bad
    return None


Float = Annotated[float, Field(allow_inf_nan=False)]
TokenIds = list[StrictInt]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class BaseRequest(Strict):
    """The fields both endpoints share."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode_and_ignored(cls, data):
        check_unicode(data)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in IGNORED}
        return data

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # OpenAI's default: 1.0
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False  # extension: run to max_tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False  # extension: the prompt's and the completion's token ids
    logit_bias: dict[str, Float] | None = None  # refused unless empty

    def refusals(self) -> list[tuple[str, bool, str]]:
        """(field, whether this request asks for something lowbit does not do, what it does not do)."""
        return [("logit_bias", bool(self.logit_bias), "logit_bias is not supported"),
                ("stream_options", self.stream_options is not None and not self.stream,
                 "stream_options needs stream: true")]

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stops if s]

    def limit(self) -> int | None:
        """max_completion_tokens, else max_tokens (None: as many as fit)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(BaseRequest):
    prompt: Union[str, TokenIds, list[str], list[TokenIds]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def refusals(self):
        return super().refusals() + [
            ("best_of", self.best_of not in (None, self.n), "best_of other than n is not supported"),
            ("suffix", bool(self.suffix), "suffix (insertion) is not supported")]

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the chat template may use them
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None  # refused unless empty
    tool_choice: str | dict | None = None  # refused unless "none"
    response_format: dict | None = None  # refused unless {"type": "text"}
    add_generation_prompt: bool = True  # extensions of vLLM's: how the chat template is applied
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None

    def refusals(self):
        return super().refusals() + [
            ("tools", bool(self.tools), "tools are not supported"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool_choice other than 'none' is not supported"),
            ("response_format", (self.response_format or {}).get("type", "text") != "text",
             "response_format other than {'type': 'text'} is not supported"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs, "top_logprobs needs logprobs: true"),
            ("continue_final_message", self.continue_final_message and self.add_generation_prompt,
             "continue_final_message needs add_generation_prompt: false")]


class TokenizeRequest(Strict):
    """POST /tokenize: a prompt, or chat messages through the chat template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        check_unicode(data)
        return data


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[StrictInt]
