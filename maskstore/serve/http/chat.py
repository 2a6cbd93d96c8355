"""``POST /v1/chat/completions``: messages through the tokenizer's chat template."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .generate import generate, state, tokenize
from .protocol import ApiError, ChatBody

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(body: ChatBody, request: Request):
    st = state(request)
    tok = st.engine.tok
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "the model's tokenizer has no chat template: use /v1/completions")
    msgs = [{"role": m.role, "content": m.text()} for m in body.messages]

    def chat_ids() -> list[int]:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    try:
        ids = await tokenize(st, chat_ids)
    except Exception as e:  # noqa: BLE001 - the template's own error, said in one line
        raise ApiError(400, f"chat template: {' '.join(str(e).split())[:300]}") from None
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    return await generate(st, body, ids, "chat.completion", request)
