"""Request bodies of the OpenAI API (plus the vLLM extras benchmark clients send), as strict
pydantic models: a field of the wrong type is a 400, never a silent coercion.

Fields the OpenAI spec marks nullable accept ``null`` and mean "the default". Unknown fields are
ignored (new SDK versions add fields; refusing them would break clients for nothing). Turning a
request into ``SamplingParams`` (whose own validation names bad values) lives here too.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from loom.sampling import SamplingParams
from loom.server.errors import APIError
from loom.structured import StructuredOutputs

COMPLETION_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
MAX_N = 128  # OpenAI's limit on choices per request; bounds the work one request can ask for
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2 (SamplingParams itself allows more, for LLM.generate)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _integral(value: object) -> object:
    """JSON Schema's "integer" includes 1.0: take it as 1 (but not 1.5, "1" or true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]


def _valid_unicode(value: str) -> str:
    """JSON may spell a lone UTF-16 surrogate (``"\\ud800"``); no tokenizer or UTF-8 response can
    carry one, so the request is refused (400 naming the field) rather than guessed at."""
    if _LONE_SURROGATE.search(value):
        raise ValueError("contains a lone UTF-16 surrogate (not valid Unicode text)")
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM extra: usage so far in every chunk (with include_usage)


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` extra: exactly one of the fields."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None


class _SamplingFields(_Body):
    """What completions and chat share: the model, sampling, stopping, streaming and the extras."""

    model: Text | None = None
    n: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int | None = None
    stop: Text | list[Text] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Int = 0
    stop_token_ids: list[Int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: Int = 0
    slo_class: Text | None = Field(default=None, max_length=64)  # loom: the slo policy's class
    session_id: Text | None = Field(default=None, max_length=256)  # loom: turns of one conversation (KV pins)
    # structured output: OpenAI's response_format, or vLLM's extras
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every streamed chunk carries the usage so far."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        best_of: int | None = None, constraint: StructuredOutputs | None = None) -> SamplingParams:
        """``constraint``: one the server puts on the output (a chat request's ``tool_choice``),
        in place of the request's own; the caller makes sure the request sets none."""
        for name, value in (("n", self.n), ("best_of", best_of)):
            if value is not None and value > MAX_N:
                raise APIError(400, f"{name} must be <= {MAX_N}, got {value}", param=name)
        if self.temperature is not None and self.temperature > MAX_TEMPERATURE:
            raise APIError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}", param="temperature")
        top_p, top_k = self.top_p, self.top_k
        if top_p == 0:  # OpenAI accepts 0: keep only the most likely token
            top_p, top_k = 1.0, 1
        given = dict(
            n=self.n,
            temperature=self.temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=self._logit_bias(),
            structured_outputs=constraint or self._structured_outputs(),
            best_of=best_of,
        )
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, **kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e), (*given, "max_tokens"))) from None

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys, so as strings."""
        if not self.logit_bias:
            return None
        try:
            return {int(token): value for token, value in self.logit_bias.items()}
        except ValueError:
            bad = next(t for t in self.logit_bias if not t.strip().lstrip("-").isdigit())
            raise APIError(400, f"logit_bias keys must be token ids, got {bad!r}", param="logit_bias") from None

    def _structured_outputs(self) -> StructuredOutputs | None:
        """The one output constraint of the request, from whichever field carries it."""
        given = self._constraints()
        if not given:
            return None
        if len(given) > 1:
            raise APIError(400, f"send one output constraint, not several ({', '.join(given)})", param=next(iter(given)))
        (param, fields), = given.items()
        try:
            return StructuredOutputs(**fields)
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    def _constraints(self) -> dict[str, dict[str, Any]]:
        """The output constraints the request sets, by field: ``StructuredOutputs`` keyword arguments."""
        given: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given["response_format"] = {"json_object": True}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "response_format of type 'json_schema' needs json_schema.schema", param="response_format")
            given["response_format"] = {"json": fmt.json_schema.schema_}
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(exclude_none=True)
            given["structured_outputs"] = {("json" if k == "json_" else k): v for k, v in fields.items()}
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                given[name] = {name.removeprefix("guided_"): getattr(self, name)}
        return given


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[Int] | list[list[Int]] | None = None
    max_tokens: Int | None = None
    echo: bool | None = None
    logprobs: Int | None = None
    suffix: Text | None = None
    best_of: Int | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix and self.echo:
            raise APIError(400, "echo cannot be combined with suffix", param="echo")
        max_tokens = COMPLETION_MAX_TOKENS_DEFAULT if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        params = self.sampling_params(max_tokens, self.logprobs, prompt_logprobs, self.best_of)
        if self.stream and params.ranks_samples:  # OpenAI's rule: the best can only be known at the end
            raise APIError(400, f"best_of > n cannot be streamed (best_of={params.best_of}, n={params.n})",
                           param="best_of")
        return params


class ContentPart(_Body):
    type: str
    text: Text | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text of an object


class MessageToolCall(_Body):
    """A call the assistant made, in an earlier turn of the conversation."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        """Only an assistant message may go without content (as in OpenAI's API)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it: text content; "developer" is the new "system";
        tool call arguments as objects (templates write them with ``tojson``)."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text":
                    raise APIError(400, f"message content parts of type {part.type!r} are not supported (text only)",
                                   param="messages")
                if part.text is None:
                    raise APIError(400, "a text content part needs a 'text' field", param="messages")
            text = "".join(part.text or "" for part in self.content)
        else:
            text = self.content or ""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            if self.role != "assistant":
                raise APIError(400, f"only assistant messages carry tool_calls, not {self.role!r} ones", param="messages")
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _arguments(c)}}
                for c in self.tool_calls
            ]
        if self.role == "tool":
            if self.tool_call_id is None:
                raise APIError(400, "a tool message needs the 'tool_call_id' of the call it answers", param="messages")
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(call: MessageToolCall) -> dict[str, Any]:
    try:
        args = json.loads(call.function.arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise APIError(400, f"the arguments of tool call {call.id!r} are not a JSON object: {call.function.arguments!r}",
                       param="messages")
    return args


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no parameters
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Any = None  # the legacy forms of tools and tool_choice: refused
    function_call: Any = None
    modalities: list[str] | None = None
    add_generation_prompt: bool = True  # vLLM extra
    # Parse special tokens spelled out in message content as control tokens (off: they are text).
    allow_special_tokens_in_content: bool = False

    def to_sampling_params(self, tool_constraint: StructuredOutputs | None = None) -> SamplingParams:
        """``tool_constraint``: the constraint the request's ``tool_choice`` puts on the output,
        which excludes one of the request's own (a 400 naming both)."""
        for legacy in ("functions", "function_call"):
            if getattr(self, legacy) is not None:
                raise APIError(400, f"{legacy} is deprecated and not supported: send tools and tool_choice", param=legacy)
        if tool_constraint is not None and (own := self._constraints()):
            choice = repr(self.tool_choice) if isinstance(self.tool_choice, str) else "naming a function"
            raise APIError(400, f"tool_choice {choice} constrains the output to tool calls, so it cannot be combined "
                                f"with the request's own output constraint ({', '.join(own)})", param="tool_choice")
        if self.modalities and set(self.modalities) != {"text"}:
            raise APIError(400, "only the 'text' modality is supported", param="modalities")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        given = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(self, given)
        if max_tokens == 0:  # completions take 0 (score the prompt); a chat answer needs a token
            raise APIError(400, f"{given} must be >= 1 for chat completions, got 0", param=given)
        return self.sampling_params(max_tokens, logprobs, None, constraint=tool_constraint)

    def check_tools(self) -> None:
        """400 for tool fields that contradict each other: a tool_choice without tools, or naming
        a tool that is not there; duplicate names; parameters that do not describe an object."""
        tools = self.tools or []
        if self.tool_choice is not None and not tools:
            raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
        names = [t.function.name for t in tools]
        for name in names:
            if names.count(name) > 1:
                raise APIError(400, f"tool names must be unique: {name!r} appears {names.count(name)} times", param="tools")
        for t in tools:
            kind = (t.function.parameters or {}).get("type", "object")
            if kind != "object":
                raise APIError(400, f"the parameters of tool {t.function.name!r} must be a JSON schema of type "
                                    f"'object', not {kind!r}", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {self.tool_choice.function.name!r}, "
                                f"which is not among the tools ({', '.join(map(repr, names))})", param="tool_choice")


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Text | list[Text] | list[Int] | list[list[Int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.input, "input")


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or messages rendered with the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    allow_special_tokens_in_content: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[Int]


def prompt_list(value: str | list[str] | list[int] | list[list[int]], param: str) -> list[str | list[int]]:
    """One prompt (text or token ids) or a list of them, as a list of engine prompts; an empty
    list is a 400."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise APIError(400, f"{param} must not be an empty list", param=param)
    if isinstance(value[0], int):
        return [value]  # type: ignore[list-item]
    return list(value)  # type: ignore[arg-type]


def _param_of(message: str, names: tuple[str, ...]) -> str | None:
    """SamplingParams errors start with the offending field's name ("top_p must be ...")."""
    first = message.split(" ", 1)[0]
    return first if first in names else None
