"""vLLM's /tokenize and /detokenize: a prompt's token ids (and how many of the context they take) as
the server counts them, a raw prompt or chat messages rendered exactly as /v1/chat/completions renders
them; and token ids back to text. For the caller's models only (the base model and its adapters share
one tokenizer)."""

from __future__ import annotations

import asyncio

from mygpt.api.chat import ChatService
from mygpt.api.errors import invalid, model_not_found
from mygpt.api.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from mygpt.tenancy.auth import Principal


async def tokenize(chat: ChatService, principal: Principal, req: TokenizeRequest) -> TokenizeResponse:
    _check_model(chat, principal, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise invalid("Give either prompt or messages.", param="prompt" if req.prompt is None else "messages")
    if req.messages is not None:
        if not req.messages:
            raise invalid("messages is empty.", param="messages")
        chat_req = ChatCompletionRequest.model_validate(
            req.model_dump(
                include={
                    "model",
                    "messages",
                    "tools",
                    "tool_choice",
                    "functions",
                    "function_call",
                    "chat_template_kwargs",
                    "reasoning_effort",
                }  # fmt: skip
            )
        )
        render = chat.renderer(chat_req, generation_prompt=req.add_generation_prompt)
    else:

        def render() -> list[int]:
            try:
                return list(
                    chat.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
                )
            except Exception as exc:  # e.g. a lone surrogate, which is no UTF-8
                raise invalid(f"The prompt could not be tokenized: {exc}", param="prompt") from exc

    ids = await asyncio.to_thread(render)
    strs = [chat.token_text(t) for t in ids] if req.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=chat.limits.context_len, tokens=ids, token_strs=strs
    )


async def detokenize(chat: ChatService, principal: Principal, req: DetokenizeRequest) -> DetokenizeResponse:
    _check_model(chat, principal, req.model)
    bad = next((t for t in req.tokens if not 0 <= t < chat.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is out of the vocabulary.", param="tokens")
    text = await asyncio.to_thread(chat.tokenizer.decode, req.tokens)
    return DetokenizeResponse(prompt=text)


def _check_model(chat: ChatService, principal: Principal, model: str) -> None:
    """404 for a model the caller may not use (the tokenizer is the base model's: an adapter's files
    are not read)."""
    if model != chat.model_name and chat.adapter_of(principal, model) is None:
        raise model_not_found(model)
