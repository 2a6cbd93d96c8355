"""What the HTTP layer needs of an engine: :class:`EngineClient`, which the in-process
:class:`~maskstore.serve.engine.Engine` and Ray Serve's ``RemoteEngine`` both implement (as
vLLM's ``EngineClient`` lets one set of routes drive either engine)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from .engine import Request
from .metrics import Metrics


@runtime_checkable
class EngineClient(Protocol):
    tok: Any  # the tokenizer: prompts in, token ids out (and their text back)
    context: int  # tokens a request may span, prompt and generation together
    metrics: Metrics

    def submit(self, req: Request) -> None:
        """Queue ``req``; its events arrive through ``req.sink``, from any thread."""

    def context_error(self, prompt: int, max_tokens: int) -> str:
        """The one-line refusal of a prompt that leaves no room for ``max_tokens``."""

    def load(self, persona: str) -> None:
        """Read ``persona``'s masks now (blocking; raises MaskstoreError on failure)."""

    def unload(self, persona: str) -> bool:
        """Drop ``persona``'s masks; requests still waiting for them end (404)."""
