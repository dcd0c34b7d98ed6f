"""The figures of one server at one load level: throughputs and latency distributions.

Throughputs divide by the wall time of the server's batches at that level, from the first
request sent to the last one ended (or to the time limit), so they are what a client saw the
server sustain. Latencies count only the requests that succeeded:

- TTFT: from sending the request to the first event that carried text;
- TPOT: per request, (E2E - TTFT) / (output tokens - 1);
- ITL: every gap between two events that carried text, all requests pooled (a server that sends
  several tokens in one event shows one longer gap for them);
- E2E: from sending the request to the end of its stream;
- TTFT of long prompts: that of a mixed workload's long prompts alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlc_engine.bench.client import RequestResult


@dataclass
class Distribution:
    """Mean and percentiles (linear interpolation) in seconds; None where there are no values."""

    count: int
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None)
        array = np.asarray(values, dtype=np.float64)
        median, p90, p99 = (float(v) for v in np.percentile(array, [50, 90, 99]))
        return cls(len(array), float(array.mean()), median, p90, p99)


@dataclass
class Batch:
    """One turn of one server at one load level: its requests and how long it took."""

    results: list[RequestResult]
    duration: float  # seconds of wall time
    unfinished: int  # requests cancelled or never sent at the time limit


@dataclass
class Summary:
    """One server at one load level, all its batches together."""

    server: str
    level: str
    completed: int
    errors: int
    unfinished: int  # cut off by the time limit
    short: int  # completed with fewer output tokens than asked (the server stopped at EOS)
    duration: float  # seconds, the batches' wall times added up
    prompt_tokens: int  # as the servers reported them (0 where a server reports no usage)
    cached_tokens: int | None  # of those, from the server's prompt cache (None: not reported)
    output_tokens: int
    request_throughput: float  # completed requests / duration
    output_throughput: float  # output tokens / duration
    total_throughput: float  # (prompt + output tokens) / duration
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    long_ttft: Distribution  # a mixed workload's long prompts (empty in other workloads)


def summarize(server: str, level: str, batches: Sequence[Batch], asked_tokens: int) -> Summary:
    """The figures of `batches`, all of one server at one level, each asked `asked_tokens`."""
    results = [r for batch in batches for r in batch.results]
    done = [r for r in results if r.ok]
    duration = sum(batch.duration for batch in batches)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    reported = [r.cached_tokens for r in done if r.cached_tokens is not None]
    output_tokens = sum(r.output_tokens for r in done)

    def per_second(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    return Summary(
        server=server,
        level=level,
        completed=len(done),
        errors=len(results) - len(done),
        unfinished=sum(batch.unfinished for batch in batches),
        short=sum(r.output_tokens < asked_tokens for r in done),
        duration=duration,
        prompt_tokens=prompt_tokens,
        cached_tokens=sum(reported) if reported else None,
        output_tokens=output_tokens,
        request_throughput=per_second(len(done)),
        output_throughput=per_second(output_tokens),
        total_throughput=per_second(prompt_tokens + output_tokens),
        ttft=Distribution.of([r.ttft for r in done if r.ttft is not None]),
        tpot=Distribution.of([r.tpot for r in done if r.tpot is not None]),
        itl=Distribution.of([gap for r in done for gap in r.itls]),
        e2e=Distribution.of([r.e2e for r in done if r.e2e is not None]),
        long_ttft=Distribution.of([r.ttft for r in done if r.long and r.ttft is not None]),
    )


# The figures compared between servers: throughputs (above 1: faster than the first server),
# median latencies and the ITL's p99 (above 1: slower).
COMPARED = ("request_throughput", "output_throughput", "total_throughput")
COMPARED_LATENCIES = ("ttft", "tpot", "itl", "e2e", "long_ttft")


def ratios(summary: Summary, baseline: Summary) -> dict[str, float | None]:
    """Each compared figure of `summary` divided by the baseline's; None where either is 0."""

    def ratio(value: float | None, base: float | None) -> float | None:
        return value / base if value and base else None

    out = {name: ratio(getattr(summary, name), getattr(baseline, name)) for name in COMPARED}
    for name in COMPARED_LATENCIES:
        mine: Distribution = getattr(summary, name)
        theirs: Distribution = getattr(baseline, name)
        out[f"{name}_median"] = ratio(mine.median, theirs.median)
    out["itl_p99"] = ratio(summary.itl.p99, baseline.itl.p99)
    return out
