"""PNG plots of a run: throughput against load, and TTFT and ITL distributions.

Distributions are drawn as empirical cumulative distributions on a log time axis, one panel per
load level and one line per server: the height at x is the share of values at most x, so the
median is where a line crosses 0.5 and a line further left is the faster server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402

from mlc_engine.bench.client import RequestResult  # noqa: E402
from mlc_engine.bench.run import BenchmarkResult, LevelResult  # noqa: E402

DPI = 100


def _values(
    level: LevelResult, url: str, pick: Callable[[RequestResult], list[float]]
) -> list[float]:
    return [
        value for batch in level.batches[url] for r in batch.results if r.ok for value in pick(r)
    ]


def plot_throughput(result: BenchmarkResult, path: Path) -> None:
    """Output tokens/s and requests/s against concurrency (or request rate), one line a server."""
    levels = [level.level for level in result.levels]
    by_rate = levels[0].rate is not None
    xs = [float((lv.rate if by_rate else lv.concurrency) or 0) for lv in levels]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
    for server, target in enumerate(result.targets):
        summaries = [level.summaries[server] for level in result.levels]
        axes[0].plot(xs, [s.output_throughput for s in summaries], "o-", label=target.url)
        axes[1].plot(xs, [s.request_throughput for s in summaries], "o-", label=target.url)
    for ax, ylabel in zip(axes, ("output tokens / s", "requests / s"), strict=True):
        ax.set_xlabel("request rate (1/s)" if by_rate else "concurrency")
        ax.set_ylabel(ylabel)
        if not by_rate and len(set(xs)) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("Throughput")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_distribution(
    result: BenchmarkResult, path: Path, title: str, pick: Callable[[RequestResult], list[float]]
) -> None:
    """The cumulative distribution of `pick`'s values (seconds, shown in ms) per level."""
    count = len(result.levels)
    figure, axes = plt.subplots(1, count, figsize=(4 * count + 1, 3.6), dpi=DPI, squeeze=False)
    for ax, level in zip(axes[0], result.levels, strict=True):
        for target in result.targets:
            values = np.sort(np.asarray(_values(level, target.url, pick))) * 1000
            if len(values):
                shares = np.arange(1, len(values) + 1) / len(values)
                ax.step(values, shares, where="post", label=target.url)
        ax.set_title(level.level.label)
        ax.set_xscale("log")  # the tail (a prefill between two tokens) can be 100x the median
        for axis_ticks in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            axis_ticks(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlabel(f"{title} (ms, log scale)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of values at most x")
    figure.suptitle(f"{title} distribution")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_plots(result: BenchmarkResult, folder: Path) -> list[Path]:
    """throughput.png, ttft.png and itl.png in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "throughput.png", folder / "ttft.png", folder / "itl.png"]
    plot_throughput(result, paths[0])
    plot_distribution(result, paths[1], "TTFT", lambda r: [r.ttft] if r.ttft is not None else [])
    plot_distribution(result, paths[2], "ITL", lambda r: r.itls)
    return paths
