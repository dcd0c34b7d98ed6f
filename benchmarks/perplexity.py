"""Perplexity of SmolLM2-135M-Instruct on public-domain English, one column per quantization.

The text (`data/pd_english.txt`) is tokenized raw, without a chat template, and run as one
sequence in chunks that continue the same KV cache sequence; each token after the first is
scored by the logits before it. A quantization that hurts the model shows as a perplexity ratio
above 1 against q0f32.

    python benchmarks/perplexity.py [--quantizations q0f32 q4f32_1 q4f32_m] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
from loading import load
from rich.console import Console
from rich.table import Table

from mlc_engine.common.device import Device, parse_device, resolve_device
from mlc_engine.engine.models import DEFAULT_MODEL
from mlc_engine.engine.runtime import ModelRuntime

TEXT = Path(__file__).parent / "data" / "pd_english.txt"
QUANTIZATIONS = ["q0f32", "q4f32_1", "q4f32_m"]
CHUNK = 512
SEQ_ID = 0
# Rows of logits turned into float64 at a time: 128 x 49152 vocab x 8 bytes = 48 MiB.
SCORE_ROWS = 128

console = Console(stderr=True)


@dataclasses.dataclass
class Result:
    quantization: str
    tokens: int  # tokens scored: all but the first
    nll: float  # mean negative log-likelihood, nats per token
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits[row])[targets[row]], in float64."""
    total = 0.0
    for start in range(0, len(targets), SCORE_ROWS):
        rows = logits[start : start + SCORE_ROWS].astype(np.float64)
        picked = targets[start : start + SCORE_ROWS]
        peak = rows.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        total += float((log_sum - rows[np.arange(len(picked)), picked]).sum())
    return total


def evaluate(runtime: ModelRuntime, tokens: list[int]) -> tuple[float, int]:
    """Mean NLL of each token given those before it, and the number of tokens scored."""
    ids = np.asarray(tokens, dtype=np.int64)
    kv_cache = runtime.create_kv_cache(1, len(tokens), CHUNK)
    kv_cache.add_sequence(SEQ_ID)
    total = 0.0
    for start in range(0, len(tokens) - 1, CHUNK):
        chunk = tokens[start : start + CHUNK]
        logits = runtime.prefill(kv_cache, [SEQ_ID], [chunk], all_logits=True)
        # Row i predicts token start + i + 1; the last chunk's last row has nothing to predict.
        targets = ids[start + 1 : start + 1 + len(chunk)]
        total += negative_log_likelihood(logits[: len(targets)], targets)
    kv_cache.remove_sequence(SEQ_ID)
    scored = len(tokens) - 1
    return total / scored, scored


def measure(quantization: str, device: Device, max_tokens: int | None) -> Result:
    runtime, tokenizer, _ = load(f"{DEFAULT_MODEL}-{quantization}", device)
    tokens = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    limit = runtime.config.context_window_size
    if max_tokens is not None:
        limit = min(limit, max_tokens)
    tokens = tokens[:limit]
    start = time.perf_counter()
    nll, scored = evaluate(runtime, tokens)
    return Result(quantization, scored, nll, time.perf_counter() - start)


def table(results: list[Result]) -> Table:
    reference = next((r.perplexity for r in results if r.quantization == "q0f32"), None)
    out = Table(title=f"{DEFAULT_MODEL} perplexity on {TEXT.name}")
    for name in ("quantization", "tokens", "perplexity", "vs q0f32", "seconds"):
        out.add_column(name, justify="left" if name == "quantization" else "right")
    for r in results:
        ratio = f"{r.perplexity / reference:.4f}" if reference else "-"
        row = (r.quantization, str(r.tokens), f"{r.perplexity:.3f}", ratio, f"{r.seconds:.1f}")
        out.add_row(*row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantizations", nargs="+", default=QUANTIZATIONS, metavar="Q")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most N tokens")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], ... or auto")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write here")
    args = parser.parse_args()
    if args.max_tokens is not None and args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")
    device = resolve_device(parse_device(args.device))

    results = [measure(q, device, args.max_tokens) for q in args.quantizations]
    Console().print(table(results))
    if args.json:
        figures = [{**dataclasses.asdict(r), "perplexity": r.perplexity} for r in results]
        report = {"model": DEFAULT_MODEL, "text": TEXT.name, "device": device.name}
        args.json.write_text(json.dumps({**report, "results": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
