"""The request and error shapes of the OpenAI-compatible API: pydantic bodies, OpenAI's error
body, and what a client may read of an engine error."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ...errors import MaskstoreError
from ..engine import Event

MAX_STOPS = 4
TOKENIZERS = 4  # prompts tokenized at once, on worker threads (never on the event loop)
MAX_N = 8  # choices a request may ask for (each one a batch row)


def _unicode(s: str) -> str:
    """JSON may escape lone UTF-16 surrogates (``"\\ud800"``), which are no text a tokenizer
    can take: refused as a 400 rather than failing inside the tokenizer."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "holds a lone surrogate (\\ud800-\\udfff): send valid Unicode text"
        ) from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]


def union_tag(part: object) -> bool:
    """A part of a validation error's location that names a union member, not a field
    (``"str"``, ``"list[str]"``, ``"function-after[_unicode(), str]"``)."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


# OpenAI request fields this server does not implement: a request that sets one (to anything
# but its no-op value) is a 400 naming it, never a 200 that silently ignored it
UNSUPPORTED = {"response_format": None, "tools": None, "tool_choice": None, "functions": None,
               "function_call": None, "logit_bias": None, "presence_penalty": 0,
               "frequency_penalty": 0, "best_of": 1, "echo": False, "suffix": None,
               "parallel_tool_calls": None, "audio": None, "modalities": None,
               "prediction": None, "web_search_options": None}  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)

    def unsupported(self) -> str | None:
        """The first OpenAI field set that this server does not implement."""
        extra = self.model_extra or {}
        for name, noop in UNSUPPORTED.items():
            if name in extra and extra[name] is not None and extra[name] != noop:
                return name
        return None


class CompletionBody(SamplingBody):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # each token's, and the k likeliest


class TextPart(BaseModel):
    """A content part of a chat message; only text parts are served (no images or audio)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart]

    def text(self) -> str:
        """The message's text: its parts joined (as OpenAI reads a list of text parts)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    persona: Text | None = None
    source: Text | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
          500: "internal_error"}  # fmt: skip


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param,
            "code": status}  # fmt: skip
    return JSONResponse({"error": body}, status_code=status)


def public(ev: Event) -> str:
    """An engine error as a client may read it: a 500's cause stays in the server log (its
    text can name paths and every served persona)."""
    if ev.status >= 500 and ev.status != 503:
        return "generation failed (internal error); see the server log"
    return ev.text


def printable(name: str) -> str:
    """A persona id as JSON can carry it: a source path that is no UTF-8 keeps its bytes as
    escapes (it was a 500 for /v1/models)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def check_api_key(key: str | None) -> None:
    """Refuse an API key that is empty (a ``--api-key "$KEY"`` whose variable is unset) or
    that holds whitespace or control characters (a header cannot carry it reliably); None
    means no key."""
    if key is not None and (not key or not all(0x21 <= ord(c) <= 0x7E for c in key)):
        raise MaskstoreError(
            "the API key is empty or holds spaces or control characters: give one of visible "
            "ASCII characters, or none to serve without a key"
        )
