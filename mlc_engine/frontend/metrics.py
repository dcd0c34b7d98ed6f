"""Prometheus metrics of one frontend process: token counters, latency histograms, and gauges of
each engine's queues and KV cache (read from the engine's latest stats when scraped)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mlc_engine.common.protocol import StatsSnapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineGauges(Collector):
    """Per-engine gauges, taken from `snapshots()` and `states()` at scrape time."""

    def __init__(
        self,
        snapshots: Callable[[], list[StatsSnapshot]],
        states: Callable[[], list[dict[str, Any]]],
    ):
        self.snapshots = snapshots
        self.states = states

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "mlc_engine_engine_up",
            "1 while the engine serves, else 0; its node and state as labels",
            labels=["engine", "node", "state"],
        )
        for state in self.states():
            labels = [str(state["engine"]), state["node"], state["state"]]
            up.add_metric(labels, 1 if state["state"] == "running" else 0)
        yield up
        fields = {
            "num_waiting": "Requests waiting in the engine",
            "num_running": "Sequences running in the engine",
            "kv_pages_free": "Free KV cache pages",
            "kv_pages_total": "KV cache pages in all",
            "kv_pages_cached": "KV cache pages held only by the prefix cache (counted as free)",
            # Totals since start or RESET, so gauges: a RESET takes them back to 0.
            "prefix_cache_queried_tokens": "Prompt tokens looked up in the prefix cache",
            "prefix_cache_hit_tokens": "Prompt tokens found in the prefix cache, not computed",
        }
        for name, documentation in fields.items():
            family = GaugeMetricFamily(f"mlc_engine_{name}", documentation, labels=["engine"])
            for index, stats in enumerate(self.snapshots()):
                family.add_metric([str(index)], getattr(stats, name))
            yield family


class Metrics:
    """What the request handlers record."""

    def __init__(
        self,
        snapshots: Callable[[], list[StatsSnapshot]],
        states: Callable[[], list[dict[str, Any]]],
    ):
        self.registry = CollectorRegistry()
        self._prompt_tokens = Counter(
            "mlc_engine_prompt_tokens", "Prompt tokens received", registry=self.registry
        )
        self._generation_tokens = Counter(
            "mlc_engine_generation_tokens", "Tokens generated", registry=self.registry
        )
        self._finished = Counter(
            "mlc_engine_requests_finished",
            "Choices finished, by reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self._ttft = Histogram(
            "mlc_engine_time_to_first_token_seconds",
            "Time from request to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._itl = Histogram(
            "mlc_engine_inter_token_latency_seconds",
            "Time between generated tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineGauges(snapshots, states))

    def prompt(self, tokens: int) -> None:
        self._prompt_tokens.inc(tokens)

    def generated(self, tokens: int) -> None:
        self._generation_tokens.inc(tokens)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def finished(self, reason: str) -> None:
        self._finished.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
