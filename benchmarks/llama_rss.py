"""llama-server's RSS with a KV cache of as many tokens as our engine's, beside the engine's.

KV tokens are matched by size, not by use: `-c TOKENS` with one unified cache (`-kvu`) shared by
`-np 32` slots, as our engine shares its pages among its 32 sequences; both caches hold float16
(llama.cpp's default, and our 4-bit models' default). llama.cpp clears its cache when it starts,
so all of it is resident at once; ours is touched page by page as it is used. The RSS is taken
after a round of `REQUESTS` completions (`CONCURRENCY` in flight), on the GGUF the default model
is converted from, with the same threads. Used by `soak.py --llama-server PATH`, or alone:

    python benchmarks/llama_rss.py /work/llama-build-noamx/bin/llama-server --kv-tokens 32784
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import httpx
from soak import free_port, rss_mb, running

REQUESTS = 64
CONCURRENCY = 32
SLOTS = 32


async def _load(url: str) -> None:
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = httpx.Timeout(120.0, connect=10.0)

    async def one(client: httpx.AsyncClient, index: int) -> None:
        body = {"prompt": f"Story {index}: once upon a time " * 8, "max_tokens": 32}
        async with limit:
            response = await client.post(url + "/v1/completions", json=body)
            response.raise_for_status()

    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        await asyncio.gather(*(one(client, i) for i in range(REQUESTS)))


def llama_server_rss(binary: Path, kv_tokens: int, log: Path) -> tuple[float, float]:
    """llama-server's RSS in MB once loaded and after a round of requests."""
    from mlc_engine.engine.models import default_model_gguf

    port = free_port()
    threads = len(os.sched_getaffinity(0))
    command = [str(binary), "-m", str(default_model_gguf()), "-c", str(kv_tokens), "-kvu"]
    command += ["-np", str(SLOTS), "-t", str(threads), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(command, url + "/health", log) as server:
        loaded = rss_mb(server.pid)
        asyncio.run(_load(url))
        return loaded, rss_mb(server.pid)


def compare_with_llama_server(binary: Path, kv_tokens: int, engine_mb: float) -> str:
    loaded, after = llama_server_rss(binary, kv_tokens, Path("soak-llama-server.log"))
    return (
        f"llama-server at {kv_tokens} KV tokens (-c {kv_tokens} -kvu -np {SLOTS}, float16): "
        f"RSS {loaded:.0f} MB loaded, {after:.0f} MB after {REQUESTS} requests; our engine "
        f"{engine_mb:.0f} MB after the soak: {engine_mb / after:.2f}x (target <= 1.2x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", type=Path, help="llama-server")
    parser.add_argument("--kv-tokens", type=int, default=32784, help="Our default: 2049 pages.")
    args = parser.parse_args()
    loaded, after = llama_server_rss(args.binary, args.kv_tokens, Path("llama-server.log"))
    print(f"llama-server RSS: {loaded:.0f} MB loaded, {after:.0f} MB after {REQUESTS} requests")


if __name__ == "__main__":
    main()
