"""``POST /v1/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .generate import generate, state, tokenize
from .protocol import ApiError, CompletionBody

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request):
    st = state(request)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "give one prompt per request", "prompt")
        prompt = prompt[0]
    ids = await tokenize(st, lambda: st.engine.tok(prompt, add_special_tokens=True)["input_ids"])
    return await generate(st, body, ids, "text_completion", request)
