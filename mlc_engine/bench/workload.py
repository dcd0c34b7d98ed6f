"""What the benchmark sends: prompts of a set length, load levels and arrival times.

Input length is counted in words of the source text (runs of non-space characters), not in
tokens: the harness has no tokenizer of its own, and each server tokenizes differently. For
English text and the BPE vocabularies of small LLMs a word is about 1.3 tokens; the servers'
own count (`usage.prompt_tokens`, chat template included) is recorded for every request.
Each run tags its prompts with a random run id (one word), see `PromptSource.prompt`.

Three scenarios say what a unit of work (a conversation) sends:
- `independent`: one user message, no two alike;
- `multi-turn`: `turns` user messages one after another, each sent with the whole conversation
  so far (the server's own replies included), as chat clients do;
- `shared-prefix`: one short user message after a long system prompt that every conversation of
  the run shares, as apps with a fixed system prompt or few-shot examples do;
- `mixed`: one user message each, but every `long_every`-th is `long_words` long: long prompts
  arrive while short chats stream, which shows whether their prefill stalls the streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "pd_english.txt"
ENDPOINTS = ("chat", "completions")
SCENARIOS = ("independent", "multi-turn", "shared-prefix", "mixed")

# Request i starts i * STRIDE words into the text (wrapping around): successive prompts share no
# prefix, so a server's prefix cache cannot skip their prefill. Prime, so that offsets repeat
# only after as many requests as the text has words.
STRIDE = 997


@dataclass(frozen=True)
class Workload:
    """The requests each server gets at each load level, the same for every server."""

    endpoint: str  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    input_words: int  # prompt length in words of the text
    output_tokens: int  # max_tokens, with ignore_eos so that servers that know it reach it
    num_requests: int  # per server and load level
    max_seconds: float  # per server and load level, all its rounds together
    rounds: int = 2  # each level's requests are split into this many turns per server
    seed: int = 0  # Poisson arrival times
    scenario: str = "independent"  # one of SCENARIOS
    turns: int = 1  # user messages per conversation (multi-turn)
    system_words: int = 0  # the shared system prompt's length in words (shared-prefix)
    long_words: int = 0  # the long prompts' length in words (mixed)
    long_every: int = 0  # conversations per long one (mixed)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}: {self.endpoint!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}: {self.scenario!r}")
        if min(self.input_words, self.output_tokens, self.num_requests, self.rounds) < 1:
            raise ValueError("input words, output tokens, requests and rounds must be positive")
        if self.max_seconds <= 0:
            raise ValueError("the time limit must be positive")
        if self.scenario == "multi-turn" and (self.turns < 2 or self.endpoint != "chat"):
            raise ValueError("a multi-turn workload needs the chat endpoint and 2 turns or more")
        if self.scenario != "multi-turn" and self.turns != 1:
            raise ValueError("only a multi-turn workload has more than one turn")
        if (self.scenario == "shared-prefix") != (self.system_words > 0):
            raise ValueError("a shared-prefix workload, and only it, has a system prompt")
        long_prompts = (self.long_words, self.long_every)
        if self.scenario == "mixed" and min(long_prompts) < 1:
            raise ValueError("a mixed workload needs long prompts and how often they come")
        if self.scenario != "mixed" and any(long_prompts):
            raise ValueError("only a mixed workload has long prompts")

    def conversation(self, source: PromptSource, index: int, run_id: str = "") -> Conversation:
        """What conversation `index` sends; conversations of one run share no user message."""
        long = self.long_every > 0 and index % self.long_every == self.long_every - 1
        words = self.long_words if long else self.input_words
        turns = tuple(
            source.prompt(index * self.turns + turn, words, run_id) for turn in range(self.turns)
        )
        system = ""
        if self.system_words:
            system = source.prompt(SYSTEM_PROMPT_INDEX, self.system_words, run_id)
        return Conversation(index, system, turns, long)


# The shared system prompt's place in the text: its words end where request 0's begin.
SYSTEM_PROMPT_INDEX = -1


@dataclass(frozen=True)
class Conversation:
    """One unit of work: a system prompt (or none), then user messages sent one at a time, each
    with everything before it and the server's replies."""

    index: int
    system: str
    turns: tuple[str, ...]
    long: bool = False  # one of a mixed workload's long prompts


@dataclass(frozen=True)
class LoadLevel:
    """Either a fixed number of requests in flight or Poisson arrivals at a rate."""

    concurrency: int | None = None  # closed loop: a new request as soon as one ends
    rate: float | None = None  # open loop: requests per second, however many are in flight

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a load level has either a concurrency or a request rate")
        if (self.concurrency or self.rate or 0) <= 0:
            raise ValueError(f"load levels must be positive: {self.label}")

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.rate is None else f"rate={self.rate:g}/s"


def parse_levels(concurrency: str | None, rates: str | None) -> list[LoadLevel]:
    """Load levels from comma-separated lists: "1,4,16,64" concurrencies or "0.5,2" rates."""
    if (concurrency is None) == (rates is None):
        raise ValueError("give either concurrency levels or request rates")
    if rates is not None:
        return [LoadLevel(rate=float(part)) for part in rates.split(",")]
    assert concurrency is not None
    return [LoadLevel(concurrency=int(part)) for part in concurrency.split(",")]


def arrival_offsets(level: LoadLevel, count: int, rng: random.Random) -> list[float]:
    """Seconds after the start at which each of `count` requests may be sent.

    Closed loop: all at once, the concurrency limit holds them back. Open loop: exponential
    gaps of mean 1 / rate, the first request at once.
    """
    if level.rate is None:
        return [0.0] * count
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(level.rate)
    return offsets


class PromptSource:
    """Prompts cut from a text file, each `length` words long, a different place per request."""

    def __init__(self, text: str) -> None:
        self.words = text.split()
        if not self.words:
            raise ValueError("the prompt text is empty")

    @classmethod
    def from_file(cls, path: Path = DEFAULT_TEXT) -> PromptSource:
        return cls(path.read_text(encoding="utf-8"))

    def prompt(self, index: int, length: int, run_id: str = "") -> str:
        """The prompt of request `index`: `length` words from its own offset, wrapping around.

        With a `run_id` the first word is `run_id/index` instead: a run's prompts then differ
        from every earlier run's, so no server answers from a prompt cache an earlier run filled.
        """
        start = index * STRIDE
        words = [self.words[(start + i) % len(self.words)] for i in range(length)]
        if run_id:
            words[0] = f"{run_id}/{index}"
        return " ".join(words)
