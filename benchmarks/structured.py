"""What grammar-constrained decoding costs: decode throughput of 16 concurrent requests with and
without a JSON-schema grammar, side by side in one run, in-process on the default model.

Each round adds 16 requests (short prompts, the same sampling), lets the first step prefill them,
then times `--steps` decode steps and counts the tokens they produced; constrained and plain
rounds alternate, and the median of each is compared. The schema asks for a long array of small
objects, so no request can finish early and masks cover keys, strings and numbers. The figure
for batches without a grammar is what the grammar hook costs per step, timed on its own: those
batches run the same code as before apart from it.

    python benchmarks/structured.py [--batch 16] [--steps 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import llguidance
from loading import load
from rich.console import Console

from mlc_engine.common.device import parse_device, resolve_device
from mlc_engine.common.protocol import AddRequest, SamplingParams
from mlc_engine.engine.core import Engine, EngineConfig
from mlc_engine.engine.models import DEFAULT_MODEL
from mlc_engine.frontend.structured import JSON_OPTIONS

console = Console()
FRONTEND = "b" * 32
SCHEMA: Any = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
}
HOOK_REPEATS = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=f"{DEFAULT_MODEL}-q4f32_m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runtime, tokenizer, _ = load(args.model, resolve_device(parse_device(args.device)))
    engine = Engine(runtime, EngineConfig(max_num_seqs=args.batch))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS)
    prompts = [tokenizer.encode(f"List {i + 3} people as JSON.") for i in range(args.batch)]
    decode_round(engine, prompts, grammar, 4)  # warm up both paths
    decode_round(engine, prompts, None, 4)
    rates: dict[str, list[float]] = {"plain": [], "constrained": []}
    for _ in range(args.rounds):
        rates["plain"].append(decode_round(engine, prompts, None, args.steps))
        rates["constrained"].append(decode_round(engine, prompts, grammar, args.steps))
    plain, constrained = (statistics.median(rates[k]) for k in ("plain", "constrained"))
    step_ms = 1000 * args.batch / plain
    hook_us = hook_cost(engine, args.batch)
    console.print(f"decode x{args.batch}, median of {args.rounds} rounds of {args.steps} steps:")
    console.print(f"  plain        {plain:8.1f} tok/s  ({step_ms:.1f} ms a step)")
    console.print(f"  constrained  {constrained:8.1f} tok/s  = {constrained / plain:.3f}x plain")
    console.print(
        f"  grammar hook in a batch without grammars: {hook_us:.1f} us a step "
        f"= {hook_us / 10 / step_ms:.3f}% of a step"
    )


def decode_round(
    engine: Engine, prompts: list[list[int]], grammar: str | None, steps: int
) -> float:
    """Tokens per second over `steps` decode steps of one batch of requests."""
    ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        params = SamplingParams(max_tokens=10_000, temperature=0.7, seed=1, grammar=grammar)
        params.ignore_eos = grammar is None  # a grammar that cannot end never offers EOS
        engine.add(AddRequest(request_id, FRONTEND, prompt, params))
    engine.step()  # prefill, untimed
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        tokens += sum(len(output.token_ids) for output in engine.step())
    seconds = time.perf_counter() - start
    engine.abort(ids)
    return tokens / seconds


def hook_cost(engine: Engine, batch: int) -> float:
    """Microseconds a step spends on grammars when none of its sequences has one."""
    prompts = [[1, 2, 3]] * batch
    ids = [f"hook-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add(AddRequest(request_id, FRONTEND, prompt, SamplingParams(max_tokens=100)))
    seqs = [seq for request_id in ids for seq in engine.requests[request_id]]
    start = time.perf_counter()
    for _ in range(HOOK_REPEATS):
        masks = engine.grammars.start_masks(seqs)
        engine._allowed(masks, seqs)
    seconds = time.perf_counter() - start
    engine.abort(ids)
    return 1e6 * seconds / HOOK_REPEATS


if __name__ == "__main__":
    main()
