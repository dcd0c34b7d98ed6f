"""The wire protocol between frontends and engines: msgpack messages over ZeroMQ.

Frontend -> engine (PUSH -> PULL): two frames, a one-byte message type and a msgpack payload.
Engine -> frontends (PUB -> SUB): three frames, a topic, the type and the payload. The topic is
the owning frontend's id (all ids are `FRONTEND_ID_LENGTH` characters, so ZeroMQ's prefix match
is an exact match), or `BROADCAST` for what every frontend hears (heartbeats, ENGINE_DEAD).

Payloads are dataclasses packed as msgpack arrays in field order (`pack` / `unpack`); `unpack`
checks every field's type, so a malformed message is a `ProtocolError`, never a crash later.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

PROTOCOL_VERSION = 2
FRONTEND_ID_LENGTH = 32  # uuid4().hex
BROADCAST = b"*"


class MessageType(bytes, enum.Enum):
    # frontend -> engine
    HELLO = b"H"
    ADD = b"A"
    ABORT = b"X"
    RESET = b"R"
    STATS = b"S"
    SHUTDOWN = b"Q"
    KEEPALIVE = b"K"
    # engine -> frontend
    READY = b"r"
    STEP = b"s"
    STATS_REPLY = b"t"
    HEARTBEAT = b"h"
    ENGINE_DEAD = b"d"


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class ErrorCode(enum.StrEnum):
    """What kind of failure an error output is, where the frontend answers each differently."""

    QUEUE_FULL = "queue_full"  # the engine is full: come back later (HTTP 429)
    INVALID_REQUEST = "invalid_request"  # the request itself is wrong (HTTP 400)


class ProtocolError(ValueError):
    """A message that does not decode to what its type says it holds."""


@dataclasses.dataclass
class SamplingParams:
    """How to pick tokens for one request. Temperature 0 is greedy; 0 / 1.0 switch a filter off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    n: int = 1
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    grammar: str | None = None  # llguidance's grammar definition that the output must match

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the first field out of range."""
        limits: list[tuple[str, bool, str]] = [
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("temperature", 0 <= self.temperature <= 2, "must be between 0 and 2"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0: no limit)"),
            ("min_p", 0 <= self.min_p <= 1, "must be between 0 and 1"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("n", 1 <= self.n <= 128, "must be between 1 and 128"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be between 0 and 20"),
            (
                "logit_bias",
                all(0 <= t < vocab_size and -100 <= b <= 100 for t, b in self.logit_bias.items()),
                f"keys must be token ids below {vocab_size}, values in [-100, 100]",
            ),
            (
                "stop_token_ids",
                all(0 <= t < vocab_size for t in self.stop_token_ids),
                f"must be token ids below {vocab_size}",
            ),
        ]
        for name, ok, rule in limits:
            if not ok:
                raise ValueError(f"{name} {rule}")


@dataclasses.dataclass
class Hello:
    frontend_id: str
    protocol_version: int = PROTOCOL_VERSION


@dataclasses.dataclass
class EngineInfo:
    """The engine's answer to HELLO: what it serves and how much room it has."""

    protocol_version: int
    model: str
    context_window: int
    vocab_size: int
    max_num_seqs: int
    kv_pages: int
    page_size: int
    eos_token_ids: list[int]
    error: str | None = None


@dataclasses.dataclass
class AddRequest:
    request_id: str
    frontend_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclasses.dataclass
class Abort:
    request_ids: list[str]


@dataclasses.dataclass
class FrontendCommand:
    """RESET, STATS and KEEPALIVE: the reply (to RESET and STATS) goes to this frontend."""

    frontend_id: str


@dataclasses.dataclass
class Shutdown:
    drain: bool = True


@dataclasses.dataclass
class TokenLogprob:
    """A sampled token's log-probability under the model, and the most likely alternatives."""

    logprob: float
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RequestMetrics:
    """Engine-side timings of one finished choice, in seconds."""

    prompt_tokens: int
    output_tokens: int
    time_to_first_token: float
    mean_inter_token_latency: float
    preemptions: int


@dataclasses.dataclass
class SequenceOutput:
    """What one choice (`index` < n) of a request produced in one engine step. With
    finish_reason "stop", the last of `token_ids` is the stop token that ended the choice: it
    counts as generated and has a logprob, but no text."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first token has none
    finish_reason: str | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None
    error_code: str | None = None  # an ErrorCode, with finish_reason "error"
    # On choice 0's first output: its prompt tokens whose KV came from the prefix cache.
    cached_tokens: int | None = None


@dataclasses.dataclass
class StatsSnapshot:
    """Engine state and cumulative counters since start or the last RESET."""

    num_waiting: int = 0
    num_running: int = 0
    kv_pages_free: int = 0  # counting those only the prefix cache holds (it gives them up)
    kv_pages_total: int = 0
    kv_pages_cached: int = 0  # held only by the prefix cache
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: int = 0
    last_step_seconds: float = 0.0
    preemptions: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up at admission
    prefix_cache_hit_tokens: int = 0  # of those, found in the prefix cache (not computed)


@dataclasses.dataclass
class StepOutput:
    outputs: list[SequenceOutput]
    stats: StatsSnapshot


@dataclasses.dataclass
class EngineDead:
    message: str


def pack(message: Any) -> bytes:
    return msgpack.packb(_to_wire(message), use_bin_type=True)


T = TypeVar("T")


def unpack(cls: type[T], payload: bytes) -> T:
    """Decode `payload` as a `cls`, checking every field; ProtocolError if it is not one."""
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as error:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {error}") from None
    try:
        return typing.cast(T, _decoder(typing.cast(Any, cls))(data))
    except _Mismatch as mismatch:
        raise ProtocolError(f"{cls.__name__}{mismatch.path}: {mismatch.detail}") from None


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, list | tuple):
        return [_to_wire(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_wire(item) for key, item in value.items()}
    return value


class _Mismatch(Exception):
    """A value that is not of its field's type; `path` grows as it passes up through fields."""

    def __init__(self, detail: str, path: str = ""):
        self.detail, self.path = detail, path


Decoder = Callable[[Any], Any]


@functools.cache
def _decoder(kind: Any) -> Decoder:
    """The function that checks and converts a wire value of type `kind`, built once per type:
    working out a type's fields and hints for every message had cost 0.5 ms a STEP."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        return _dataclass_decoder(kind)
    if origin in (typing.Union, types.UnionType):
        options = [_decoder(option) for option in typing.get_args(kind)]

        def union(value: Any) -> Any:
            for option in options:
                try:
                    return option(value)
                except _Mismatch:
                    continue
            raise _Mismatch(f"{value!r:.40} is none of {kind}")

        return union
    if origin is list:
        (item,) = (_decoder(k) for k in typing.get_args(kind))

        def items(value: Any) -> Any:
            if not isinstance(value, list):
                raise _Mismatch("expected a list")
            try:
                return [item(v) for v in value]
            except _Mismatch as mismatch:
                raise _Mismatch(mismatch.detail, "[]" + mismatch.path) from None

        return items
    if origin is tuple:
        members = [_decoder(k) for k in typing.get_args(kind)]

        def fixed(value: Any) -> Any:
            if not isinstance(value, list) or len(value) != len(members):
                raise _Mismatch(f"expected {len(members)} items")
            return tuple(member(v) for member, v in zip(members, value, strict=True))

        return fixed
    if origin is dict:
        key, item = (_decoder(k) for k in typing.get_args(kind))

        def mapping(value: Any) -> Any:
            if not isinstance(value, dict):
                raise _Mismatch("expected a map")
            return {key(k): item(v) for k, v in value.items()}

        return mapping
    return functools.partial(_scalar, kind)


def _dataclass_decoder(kind: type) -> Decoder:
    hints = typing.get_type_hints(kind)
    fields = [(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(kind)]

    def decode(value: Any) -> Any:
        if not isinstance(value, list) or len(value) != len(fields):
            raise _Mismatch(f"expected {len(fields)} fields")
        arguments = {}
        for (name, field), item in zip(fields, value, strict=True):
            try:
                arguments[name] = field(item)
            except _Mismatch as mismatch:
                raise _Mismatch(mismatch.detail, f".{name}{mismatch.path}") from None
        return kind(**arguments)

    return decode


def _scalar(kind: Any, value: Any) -> Any:
    if kind is type(None):
        if value is None:
            return None
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        return value
    raise _Mismatch(f"expected {getattr(kind, '__name__', kind)}, got {value!r:.40}")
