"""Wire models of the OpenAI-compatible edge: the Responses API, Chat Completions and Models, as the official
``openai`` SDK sends and reads them, plus keel's extension fields (``keel`` on an object, the ``keel.event``
stream event). Pydantic at the edge; what they mean for keel is :mod:`keel.interaction.openai_compat`'s."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from keel.interaction.schemas import Envelope, Links, RequestBody
from keel.memory.types import TaskStatus
from keel.orchestration.workflows.endpoints import check_output_schema

ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
MODEL_SPEC = Field(
    None,
    max_length=500,
    description="A model spec (`test`, `openai:gpt-4o-mini-2024-07-18`, `local:…`; KEEL_DEFAULT_MODEL when "
    "omitted), or `keel:<workflow>` to run a keel workflow (e.g. `keel:document_analysis`).",
)

# -- Responses: the request --------------------------------------------------------------------------------------


class InputText(RequestBody):
    """A text part of a message (`input_text`; `output_text` on an earlier assistant message)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"]
    text: str = Field(max_length=200_000)


class InputMessage(RequestBody):
    """A message item of `input` (the SDK's `EasyInputMessage` or `ResponseInputItem.Message`). `developer` is
    taken as `system`. Other item types (function call outputs, files, images) are refused with a 422."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText] = Field(max_length=200_000)
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionToolRef(RequestBody):
    """A tool as the SDK describes one (`{"type": "function", "name": …}`): only `name` counts, and it must be a
    keel tool (`GET /v1/tools`); keel's own definition is the one the model sees."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class FormatText(RequestBody):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class FormatJsonObject(RequestBody):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class FormatJsonSchema(RequestBody):
    """Structured output: the answer is JSON valid against `schema` (checked by keel; the task fails with
    `schema_violation` or `invalid_json` otherwise)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_output_schema(v)


TextFormat = Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]


class TextConfig(RequestBody):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat = Field(default_factory=lambda: FormatText(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = None


class CreateResponse(RequestBody):
    """Body of `POST /v1/responses` (OpenAI Responses API). Fields keel does not serve are refused (422), never
    silently ignored."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = MODEL_SPEC
    input: str | list[InputMessage] | dict[str, Any] = Field(
        description="A string, message items, or (for `keel:<workflow>`) the workflow's input as a JSON object."
    )
    instructions: str | None = Field(None, max_length=20_000, description="The system prompt.")
    background: bool = Field(False, description="Answer at once with the queued response; poll or stream it.")
    stream: bool = Field(False, description="Answer with the response's events (SSE), resumable by sequence number.")
    metadata: dict[str, str] | None = Field(
        None,
        max_length=16,
        description="Up to 16 string pairs, returned as given. `input` (a JSON object as a "
        "string) is a `keel:<workflow>`'s input when `input` is not one.",
    )
    tools: list[str | FunctionToolRef] | None = Field(
        None, max_length=200, description="keel tool names (see `GET /v1/tools`) the model may call."
    )
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = Field(
        None, max_length=200, description="Continue that response's conversation (keel session memory)."
    )
    max_output_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2)
    store: bool | None = Field(None, description="Accepted for compatibility: keel always stores a response.")
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return v


# -- Responses: the object ---------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class TokensIn(BaseModel):
    cached_tokens: int = 0


class TokensOut(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: TokensIn = Field(default_factory=TokensIn)
    output_tokens_details: TokensOut = Field(default_factory=TokensOut)


class ResponseError(BaseModel):
    code: str = Field(description="keel's envelope error type (e.g. `timeout`, `schema_violation`).")
    message: str


class IncompleteDetails(BaseModel):
    reason: str = Field(
        description="`partial_success` (usable but incomplete: see `keel.envelope.errors`), `needs_clarification`, "
        "`waiting_for_approval` or `max_output_tokens`."
    )


class KeelExtension(BaseModel):
    """keel's own view of the response: nothing of the task is lost in translation."""

    task_id: str
    workflow: str
    status: TaskStatus = Field(description="The task's status (finer than the response's).")
    progress: float
    links: Links
    envelope: Envelope | None = Field(None, description="The semantic envelope, once the task is terminal.")


class ResponseObject(BaseModel):
    """An OpenAI Response: a keel task seen through the Responses API. Its id is the task id with `resp_` for
    `tsk_`."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    background: bool
    model: str
    instructions: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    output: list[OutputMessage] = Field(default_factory=list)
    output_text: str = Field("", description="Every output text joined (the SDK computes the same property).")
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    store: bool = True
    keel: KeelExtension


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# -- Chat Completions --------------------------------------------------------------------------------------------


class ChatPart(RequestBody):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=200_000)


class ChatMessageIn(RequestBody):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatPart] = Field(max_length=200_000)
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(RequestBody):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaSpec(RequestBody):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_output_schema(v)


class ChatResponseFormat(RequestBody):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatCompletionRequest(RequestBody):
    """Body of `POST /v1/chat/completions`. Run as a `respond` task; `session` (a keel extension: pass it in the
    SDK's `extra_body`) puts the session's earlier turns before `messages` and keeps this turn."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = MODEL_SPEC
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=500)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2)
    n: Literal[1] | None = Field(None, description="Only one choice is served.")
    response_format: ChatResponseFormat | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool | None = None
    session: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:-]{1,200}$", description="keel extension: a session id (see `POST /v1/chat`)."
    )


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] = "stop"
    logprobs: None = None


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatKeel(BaseModel):
    task_id: str
    session: str | None
    envelope: Envelope | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage | None = None
    keel: ChatKeel


# -- Models ------------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "keel"
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
