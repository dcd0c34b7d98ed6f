"""The benchmark's statistics on requests whose timings are made up, so every figure is known."""

from __future__ import annotations

import numpy as np
import pytest

from mlc_engine.bench.client import RequestResult
from mlc_engine.bench.metrics import Batch, Distribution, Summary, ratios, summarize


def _result(index: int, chunk_times: list[float], end: float, tokens: int) -> RequestResult:
    return RequestResult(
        "http://a",
        "c=1",
        index,
        chunk_times=chunk_times,
        end=end,
        output_tokens=tokens,
        prompt_tokens=10,
        usage_reported=True,
    )


def test_percentiles_interpolate_linearly() -> None:
    d = Distribution.of([float(v) for v in range(1, 101)])
    assert d.count == 100
    assert d.mean == pytest.approx(50.5)
    assert d.median == pytest.approx(50.5)
    assert d.p90 == pytest.approx(90.1)
    assert d.p99 == pytest.approx(99.01)
    assert Distribution.of([0.25]) == Distribution(1, 0.25, 0.25, 0.25, 0.25)


def test_no_values_give_no_figures() -> None:
    assert Distribution.of([]) == Distribution(0, None, None, None, None)


def test_request_figures_come_from_its_chunk_times() -> None:
    r = _result(0, [0.5, 0.6, 0.8, 1.1], end=1.2, tokens=5)
    assert r.ok and r.ttft == 0.5 and r.e2e == 1.2
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot == pytest.approx((1.2 - 0.5) / 4)
    assert _result(1, [0.5], end=0.5, tokens=1).tpot is None  # one token: no time per token


def test_summary_divides_by_the_batches_wall_time() -> None:
    fast = [_result(i, [0.1, 0.2, 0.3], end=0.3, tokens=3) for i in range(3)]
    short = _result(3, [0.1, 0.2], end=0.2, tokens=2)
    failed = RequestResult("http://a", "c=1", 4, error="HTTP 500: boom")
    batches = [Batch([*fast, short], 1.5, unfinished=1), Batch([failed], 0.5, unfinished=0)]
    s = summarize("http://a", "c=1", batches, asked_tokens=3)
    assert (s.completed, s.errors, s.unfinished, s.short) == (4, 1, 1, 1)
    assert s.duration == pytest.approx(2.0)
    assert s.output_tokens == 11 and s.prompt_tokens == 40
    assert s.output_throughput == pytest.approx(11 / 2.0)
    assert s.total_throughput == pytest.approx(51 / 2.0)
    assert s.request_throughput == pytest.approx(4 / 2.0)
    # The failed request counts in no latency figure.
    assert s.ttft.count == 4 and s.ttft.mean == pytest.approx(0.1)
    assert s.itl.count == 3 * 2 + 1
    assert s.e2e.median == pytest.approx(0.3)
    assert s.ttft.mean is not None and s.e2e.mean is not None and s.ttft.mean <= s.e2e.mean


def test_summary_of_random_requests_keeps_ttft_within_e2e() -> None:
    rng = np.random.default_rng(0)
    results = []
    for i in range(50):
        times = np.cumsum(rng.uniform(0.001, 0.05, size=int(rng.integers(1, 20))))
        results.append(_result(i, times.tolist(), end=float(times[-1]) + 0.001, tokens=len(times)))
    s = summarize("http://a", "c=4", [Batch(results, 2.0, 0)], asked_tokens=20)
    for name in ("mean", "median", "p90", "p99"):
        assert getattr(s.ttft, name) <= getattr(s.e2e, name)
    assert s.itl.count == sum(len(r.chunk_times) - 1 for r in results)
    assert s.output_tokens == sum(len(r.chunk_times) for r in results)


def test_ratios_are_relative_to_the_baseline() -> None:
    def summary(scale: float, times: list[float]) -> Summary:
        r = _result(0, [t * scale for t in times], end=times[-1] * scale, tokens=len(times))
        return summarize("http://a", "c=1", [Batch([r], times[-1] * scale, 0)], asked_tokens=2)

    base, slow = summary(1.0, [0.1, 0.2]), summary(2.0, [0.1, 0.2])
    out = ratios(slow, base)
    assert out["output_throughput"] == pytest.approx(0.5)
    assert out["request_throughput"] == pytest.approx(0.5)
    assert out["ttft_median"] == pytest.approx(2.0)
    assert out["e2e_median"] == pytest.approx(2.0)
    assert out["itl_p99"] == pytest.approx(2.0)
    assert out["long_ttft_median"] is None  # no long prompts outside a mixed workload
    # One token each: no time per output token, so no ratio rather than a division by zero.
    single = summary(1.0, [0.1])
    assert ratios(single, single)["tpot_median"] is None


def test_long_prompts_have_a_time_to_first_token_of_their_own() -> None:
    short = [_result(i, [0.1, 0.2], end=0.3, tokens=2) for i in range(3)]
    long = _result(3, [2.0, 2.1], end=2.2, tokens=2)
    long.long = True
    s = summarize("http://a", "c=4", [Batch([*short, long], 2.2, 0)], asked_tokens=2)
    assert s.long_ttft == Distribution(1, 2.0, 2.0, 2.0, 2.0)
    assert s.ttft.count == 4
