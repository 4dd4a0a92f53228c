"""Request bodies of the OpenAI API (plus the vLLM extras benchmark clients send), as strict
pydantic models: a field of the wrong type is a 400, never a silent coercion.

Fields the OpenAI spec marks nullable accept ``null`` and mean "the default". Unknown fields are
ignored (new SDK versions add fields; refusing them would break clients for nothing). Turning a
request into ``SamplingParams`` (whose own validation names bad values) lives here too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from loom.sampling import SamplingParams
from loom.server.errors import APIError

COMPLETION_MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
MAX_N = 128  # OpenAI's limit on choices per request; bounds the work one request can ask for


def _integral(value: object) -> object:
    """JSON Schema's "integer" includes 1.0: take it as 1 (but not 1.5, "1" or true)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM extra: usage so far in every chunk (with include_usage)


class _SamplingFields(_Body):
    """What completions and chat share: the model, sampling, stopping, streaming and the extras."""

    model: str | None = None
    n: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every streamed chunk carries the usage so far."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        best_of: int | None = None) -> SamplingParams:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        for name, value in (("n", self.n), ("best_of", best_of)):
            if value is not None and value > MAX_N:
                raise APIError(400, f"{name} must be <= {MAX_N}, got {value}", param=name)
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
            best_of=best_of,
        )
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, **kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e), (*given, "max_tokens"))) from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]] | None = None
    max_tokens: Int | None = None
    echo: bool | None = None
    logprobs: Int | None = None
    suffix: str | None = None
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
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_template(self) -> dict[str, str]:
        """The message as chat templates take it: text content; "developer" is the new "system"."""
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
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = None
    max_completion_tokens: Int | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    add_generation_prompt: bool = True  # vLLM extra

    def to_sampling_params(self) -> SamplingParams:
        if self.tools or self.functions:
            raise APIError(400, "tool and function calling are not supported", param="tools" if self.tools else "functions")
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(400, f"response_format {self.response_format.type!r} is not supported (only 'text')",
                           param="response_format")
        if self.modalities and set(self.modalities) != {"text"}:
            raise APIError(400, "only the 'text' modality is supported", param="modalities")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, logprobs, None)


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[Int] | list[list[Int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.input, "input")


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
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
