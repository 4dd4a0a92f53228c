"""Request bodies of the OpenAI API (plus the vLLM extras benchmark clients send), as strict
pydantic models: a field of the wrong type is a 400, never a silent coercion.

Fields the OpenAI spec marks nullable accept ``null`` and mean "the default". Unknown fields are
ignored (new SDK versions add fields; refusing them would break clients for nothing). Turning a
request into ``SamplingParams`` (whose own validation names bad values) lives here too.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from loom.sampling import SamplingParams
from loom.server.errors import APIError

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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.n is not None and self.n > MAX_N:
            raise APIError(400, f"n must be <= {MAX_N}, got {self.n}", param="n")
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
        )
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        try:
            return SamplingParams(max_tokens=max_tokens, **kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e), (*given, "max_tokens"))) from None


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[Int] | list[list[Int]] | None = None
    max_tokens: Int | None = None
    echo: bool | None = None
    logprobs: Int | None = None
    suffix: Text | None = None
    best_of: Int | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        n = self.n or 1
        if self.best_of is not None and self.best_of > n:
            raise APIError(400, f"best_of > n is not supported (best_of={self.best_of}, n={n})", param="best_of")
        max_tokens = COMPLETION_MAX_TOKENS_DEFAULT if self.max_tokens is None else self.max_tokens
        prompt_logprobs = self.logprobs if self.echo else None
        return self.sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ContentPart(_Body):
    type: str
    text: Text | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        """Only an assistant message may go without content (as in OpenAI's API)."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

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
    # Parse special tokens spelled out in message content as control tokens (off: they are text).
    allow_special_tokens_in_content: bool = False

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
        given = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = getattr(self, given)
        if max_tokens == 0:  # completions take 0 (score the prompt); a chat answer needs a token
            raise APIError(400, f"{given} must be >= 1 for chat completions, got 0", param=given)
        return self.sampling_params(max_tokens, logprobs, None)


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or messages rendered with the chat template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    allow_special_tokens_in_content: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[Int]


def _param_of(message: str, names: tuple[str, ...]) -> str | None:
    """SamplingParams errors start with the offending field's name ("top_p must be ...")."""
    first = message.split(" ", 1)[0]
    return first if first in names else None
