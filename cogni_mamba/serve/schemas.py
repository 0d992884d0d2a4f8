"""Request bodies of the OpenAI-compatible endpoints, and the errors the server answers with.

Pydantic checks the types and ranges (wrong types, temperature < 0, top_p outside (0, 1], unknown roles,
...); `ApiError` carries everything else a request can get wrong. Both become the same OpenAI-style body:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit, kept so clients written against it behave the same here


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body with an HTTP status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    """One part of a multi-part message content (only text parts are supported)."""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message; content is a string or a list of text parts (joined)."""

    model_config = ConfigDict(extra="ignore")  # e.g. "name" is accepted and ignored

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    """`stream_options`: OpenAI's way to ask for a final usage chunk in a stream."""

    include_usage: bool = False


PositiveInt = Annotated[int, Field(gt=0)]


class SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Unset sampling fields fall back to the checkpoint's generation config."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we don't use (user, metadata, ...)

    model: str | None = None  # accepted for compatibility; the server has one model and names it in replies
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: PositiveInt = 1  # choices: one prefill, n rows of the engine (at most its max_batch)
    # Log probabilities are not computed: asking for them is a 400, not a reply without them.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    # Extensions that many OpenAI-compatible servers accept too.
    top_k: PositiveInt | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        return [s for s in stops if s]

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | int | None) -> bool | int | None:
        if v is None or v is False:
            return v
        raise ValueError("this server does not return log probabilities; leave logprobs and top_logprobs unset")

    def stop_strings(self) -> list[str]:
        """The stop strings as a list (the validator has already normalised them)."""
        return list(self.stop or [])

    def sampling_changes(self) -> dict[str, Any]:
        """GenerationConfig fields this request sets (max_new_tokens is decided against the context later)."""
        fields = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "top_k": self.top_k,
                  "min_p": self.min_p, "repetition_penalty": self.repetition_penalty}
        return {k: v for k, v in fields.items() if v is not None}


class ChatRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None  # OpenAI's newer name for max_tokens

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(the maximum number of new tokens asked for, the name of the field that asked)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (one prompt string; a one-element list is accepted too)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"


def param_name(loc: tuple) -> str | None:
    """Pydantic's error location -> OpenAI's `param` ("messages[0].role"), without the "body" prefix."""
    parts = [p for p in loc if p != "body"]
    # Union members appear in locations as type names ("str", "list[TextPart]"); they are not fields.
    parts = [p for p in parts if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "float", "bool"))]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else p)
    return name or None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's (or FastAPI's) validation errors, as a 400 naming the field."""
    if not errors:
        return ApiError("The request body is invalid.")
    first = errors[0]
    # A union field reports one error per member; the member whose type matched has the useful message.
    same_field = [e for e in errors if param_name(tuple(e.get("loc", ()))) == param_name(tuple(first.get("loc", ())))]
    first = next((e for e in same_field if not str(e.get("type", "")).endswith("_type")), first)
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(f"The request body is not valid JSON ({detail}); send a JSON object.".replace(" ()", ""),
                        code="invalid_json")
    param = param_name(tuple(first.get("loc", ())))
    if kind == "missing":
        return ApiError(f"Missing required parameter {param!r}.", param=param, code="missing_required_parameter")
    if kind in ("model_type", "model_attributes_type") and param is None:
        return ApiError("The request body must be a JSON object.", code="invalid_type")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = f"Invalid value for {param!r}" if param else "Invalid request"
    return ApiError(f"{where}: {message}.", param=param, code="invalid_value")


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a raw JSON body into a request model (strictly: "10" is not a number), or raise ApiError."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
