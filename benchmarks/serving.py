"""Serving benchmark: one workload against one or more OpenAI-compatible servers, compared.

The same as `mlc-engine bench`; see benchmarks/README.md and `--help`.

    python benchmarks/serving.py http://127.0.0.1:8000 http://127.0.0.1:8090 --concurrency 1,4
"""

from __future__ import annotations

import typer

from mlc_engine.bench.command import bench_command

if __name__ == "__main__":
    typer.run(bench_command)
