"""OpenAI-shaped request and response models (fields in the order of OpenAI's API reference)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_serializer

# ----------------------------------------------------------------------------- requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # B1: unknown fields are ignored, not rejected


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class RefusalPart(_Lenient):  # an assistant message's refusal, as clients replay one
    type: Literal["refusal"]
    refusal: str


class OtherPart(_Lenient):
    type: str  # image_url, input_audio, file...: refused with a clear 400 in the service


ContentPart = Annotated[TextPart | RefusalPart | OtherPart, Field(union_mode="left_to_right")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None  # deprecated function calling: an assistant's call
    refusal: str | None = None  # an assistant's refusal (its text, where content is empty)
    # an assistant's earlier thinking (api/reasoning.py), as clients send it back: to the chat template
    reasoning: str | None = None
    reasoning_content: str | None = None


class ToolFunction(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; None: no arguments
    strict: bool | None = None  # the parameters are always enforced, strict or not


class Tool(_Lenient):
    type: Literal["function"]
    function: ToolFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaFormat(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(_Lenient):
    type: str  # "text", "json_object", "json_schema"; others are refused by the service
    json_schema: JSONSchemaFormat | None = None


class VLLMSampling(_Lenient):
    """vLLM's sampling extras, on chat and text completions (Open WebUI, LiteLLM and llama.cpp's
    clients send them, vLLM's benchmarks ignore_eos): honoured, not ignored. top_k -1 or 0 and min_p
    0 keep every token, repetition_penalty 1 is off."""

    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)


class ChatCompletionRequest(VLLMSampling):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # the deprecated function calling (older clients: LangChain's OpenAI-functions agents), served as
    # tools (api/tools.py legacy_functions); its answers come back as function_call
    functions: list[ToolFunction] | None = None
    function_call: str | dict[str, Any] | None = None
    # declared to be refused by name (B2), not silently ignored: audio output
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    # reasoning models: vLLM's extra arguments to the chat template (Qwen3's {"enable_thinking": false}),
    # and OpenAI's effort, of which "none" and "minimal" turn the template's thinking off (api/reasoning.py)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()):  # str.isdigit alone takes "²" and "５"
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v


class CompletionRequest(VLLMSampling):
    """POST /v1/completions (OpenAI's legacy text completions)."""

    model: str
    # token ids are JSON integers: not true, "5" or 5.0 (pydantic's lax mode took them)
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = False
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # how many alternatives per token; 0: the token's own
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    n: int | None = Field(1, ge=1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    user: str | None = None

    _bias_range = field_validator("logit_bias")(ChatCompletionRequest._bias_range.__func__)


def one_or_many(x: Any) -> list:
    """OpenAI's prompt and input unions as a list: one text or one list of token ids is one item; a
    list of texts or of token-id lists is many."""
    return list(x) if isinstance(x, list) and x and isinstance(x[0], (str, list)) else [x]


class EmbeddingRequest(_Lenient):
    """POST /v1/embeddings: one input or a list of them, each text or token ids."""

    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    model: str
    dimensions: int | None = Field(None, ge=1)
    # the openai SDK asks for base64 unless told otherwise (and decodes it itself); null: float (LiteLLM
    # sends null when its caller gave none)
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None


class TokenizeRequest(_Lenient):
    """POST /tokenize (vLLM's): a raw `prompt`, or chat `messages` as /v1/chat/completions renders them."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # a prompt's (the chat template adds its own)
    add_generation_prompt: bool = True  # messages': the assistant turn's opening, as a request's prompt has
    # what decides how a chat request renders its tools (as /v1/chat/completions takes them)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[ToolFunction] | None = None
    function_call: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = (
        None  # and the template's arguments (Qwen3's enable_thinking)
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(_Lenient):
    model: str
    tokens: list[StrictInt]


# ----------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # a reasoning model's thinking, its tags included (api/reasoning.py)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails | None = None  # a reasoning model's only

    @model_serializer(mode="wrap")
    def _details_where_known(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        if out.get("completion_tokens_details") is None:
            out.pop("completion_tokens_details", None)
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # left out when None, as OpenAI does
    function_call: ToolCallFunction | None = None  # the deprecated function calling's answer; left out too
    # a reasoning model's thinking (api/reasoning.py) under both names clients read; left out when None
    reasoning: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _no_null_calls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for key in ("tool_calls", "function_call", "reasoning", "reasoning_content"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


FinishReasonOut = Literal["stop", "length", "tool_calls", "function_call"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonOut | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # {"index", "id", "type", "function": {name, arguments}}
    function_call: dict[str, Any] | None = None  # the deprecated function calling: {name, arguments}
    reasoning: str | None = None  # a reasoning model's thinking (api/reasoning.py), under both names
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        # as OpenAI sends them: {"role": "assistant", "content": ""}, then {"content": "..."}, then {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonOut | None = None  # A4: JSON null until the last chunk


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """A text completion, and (object the same, as OpenAI sends it) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (encoding_format "base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mygpt"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]


def page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page of `items` (in their listed order): the `limit` after the one whose id is
    `after` (none when no item has it)."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(items) > limit}  # fmt: skip


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----------------------------------------------------------------------------- admin and usage


class LoadAdapterRequest(BaseModel):
    """POST /v1/admin/adapters: register (and validate) an adapter of a tenant."""

    model_config = ConfigDict(extra="forbid")

    tenant: str
    name: str
    path: str | None = Field(
        None, description="inside adapters/<tenant>/ (relative or absolute); default: name"
    )
    replace: bool = Field(False, description="load a new version under a taken name")
    pinned: bool = Field(False, description="keep it resident on the device, never evicted")


class VLLMLoadLoRARequest(_Lenient):
    """vLLM's POST /v1/load_lora_adapter body; `lora_name` may be "<tenant>/<name>"."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    tenant: str | None = None


class VLLMUnloadLoRARequest(_Lenient):
    lora_name: str
    lora_int_id: int | None = None
    tenant: str | None = None
