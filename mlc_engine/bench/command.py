"""The `mlc-engine bench` command (also `benchmarks/serving.py`): options, run, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlc_engine.bench.workload import (
    DEFAULT_TEXT,
    ENDPOINTS,
    SCENARIOS,
    PromptSource,
    Workload,
    parse_levels,
)

DEFAULT_CONCURRENCY = "1,4,16,64"


def bench_command(
    urls: Annotated[
        list[str],
        typer.Argument(help="Base URLs of OpenAI-compatible servers; the first is the baseline."),
    ],
    concurrency: Annotated[
        str | None,
        typer.Option(
            help=f"Requests in flight per level, comma-separated [{DEFAULT_CONCURRENCY}]."
        ),
    ] = None,
    request_rate: Annotated[
        str | None,
        typer.Option(help="Poisson arrivals instead: requests per second per level, e.g. 0.5,2."),
    ] = None,
    num_requests: Annotated[
        int, typer.Option(min=1, help="Requests (conversations) per server and level.")
    ] = 64,
    max_seconds: Annotated[
        float, typer.Option(min=0.1, help="Time limit per server and level; the rest is cut off.")
    ] = 120.0,
    rounds: Annotated[
        int, typer.Option(min=1, help="Turns the servers take at each level (A B, B A, ...).")
    ] = 2,
    input_len: Annotated[
        int, typer.Option(min=1, help="User message length in words of the text.")
    ] = 128,
    output_len: Annotated[
        int, typer.Option(min=1, help="Output tokens per request (max_tokens, ignore_eos).")
    ] = 64,
    endpoint: Annotated[str, typer.Option(help=" or ".join(ENDPOINTS))] = "chat",
    scenario: Annotated[
        str,
        typer.Option(
            help=f"{', '.join(SCENARIOS)}: one message each, conversations of --turns "
            "messages resending the history, --system-len words of system prompt shared by "
            "every request, or one message each with every --long-every-th --long-len words."
        ),
    ] = "independent",
    turns: Annotated[int, typer.Option(min=2, help="User messages per conversation.")] = 4,
    system_len: Annotated[
        int, typer.Option(min=1, help="Shared system prompt length in words.")
    ] = 800,
    long_len: Annotated[
        int, typer.Option(min=1, help="Long prompts' length in words (mixed).")
    ] = 1500,
    long_every: Annotated[
        int, typer.Option(min=1, help="One request in this many has a long prompt (mixed).")
    ] = 4,
    model: Annotated[
        str | None, typer.Option(help="Model name to request (default: each server's first).")
    ] = None,
    text: Annotated[Path, typer.Option(help="Text file the prompts are cut from.")] = DEFAULT_TEXT,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrival times.")] = 0,
    output_dir: Annotated[
        Path, typer.Option(help="Folder for results.json and the PNG plots.")
    ] = Path("bench-results"),
) -> None:
    """Benchmark OpenAI-compatible servers with one workload, taking turns, and compare them."""
    from mlc_engine.bench.plots import write_plots
    from mlc_engine.bench.report import print_tables, write_json
    from mlc_engine.bench.run import run_benchmark

    console = Console(stderr=True, soft_wrap=True)
    try:
        if concurrency is None and request_rate is None:
            concurrency = DEFAULT_CONCURRENCY
        levels = parse_levels(concurrency, request_rate)
        workload = Workload(
            endpoint, input_len, output_len, num_requests, max_seconds, rounds, seed, scenario,
            turns=turns if scenario == "multi-turn" else 1,
            system_words=system_len if scenario == "shared-prefix" else 0,
            long_words=long_len if scenario == "mixed" else 0,
            long_every=long_every if scenario == "mixed" else 0,
        )  # fmt: skip
        source = PromptSource.from_file(text)
        result = run_benchmark(urls, workload, levels, model, source, progress=console.print)
    except (ValueError, OSError) as error:  # ConnectionError is an OSError
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from None
    out = Console()
    # Piped to a file or a test, rich would assume 80 columns and cut the figures short.
    print_tables(result, out if out.is_terminal else Console(width=120))
    write_json(result, output_dir / "results.json")
    plots = write_plots(result, output_dir)
    console.print(f"wrote {output_dir / 'results.json'}, {', '.join(p.name for p in plots)}")
