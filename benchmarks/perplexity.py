"""Perplexity of SmolLM2-135M-Instruct on public-domain English, one row per quantization.

The text (`data/pd_english.txt`) is tokenized raw, without a chat template (BOS only if the
model's config asks for one), and scored under one of two protocols (`--protocol`):

- `whole` (the default): one sequence, in prefill chunks that continue the same KV cache
  sequence; each token after the first is scored by the logits before it, with all the text
  before it in context. The README's figures from change to change are of this kind, so it
  stays the default.
- `llama`: llama.cpp's `llama-perplexity`. The text loses its final newline, as llama.cpp
  reads it; the tokens are cut into chunks of `--ctx` (512) and the rest dropped; each chunk
  is a sequence of its own, in a fresh KV cache sequence, its first token replaced by BOS when
  the vocabulary adds one, and only its second half is scored (the tokens after position
  ctx/2, each by the logits before it). Its figures compare with llama.cpp's, not with
  `whole`'s.

`--llama-cpp-bin DIR` implies `llama`: DIR/llama-perplexity scores the same text with the GGUF
the default model is converted from, with as many threads, and the table gives its perplexity
beside ours and the ratio ours / llama.cpp (below 1: ours is better). Against q0f32 a
quantization that hurts the model shows as a ratio above 1.

    python benchmarks/perplexity.py [--quantizations q0f32 q4f32_1 q4f32_m] [--max-tokens N]
    python benchmarks/perplexity.py --llama-cpp-bin /work/llama-build/bin
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import time
from pathlib import Path

import numpy as np
from llama_cpp import LlamaCppError, LlamaCppTools, last_line
from loading import load
from rich.console import Console
from rich.table import Table

from mlc_engine.common.device import Device, parse_device, resolve_device
from mlc_engine.engine.models import DEFAULT_MODEL, default_model_gguf, default_quantization
from mlc_engine.engine.runtime import KVCache, ModelRuntime, use_threads

TEXT = Path(__file__).parent / "data" / "pd_english.txt"
QUANTIZATIONS = ["q0f32", "q4f32_1", "q4f32_m"]
COMPARED_QUANTIZATIONS = ["q0f32", "q4f32_m"]  # the GGUF dequantized, and its blocks as they are
PROTOCOLS = ("whole", "llama")
CHUNK = 512  # prefill chunk
SEQ_ID = 0
# Rows of logits turned into float64 at a time: 128 x 49152 vocab x 8 bytes = 48 MiB.
SCORE_ROWS = 128
TOOL = "llama-perplexity"  # about 15 s on this text on 2 cores

console = Console(stderr=True)


def perplexity_error(nll: np.ndarray) -> tuple[float, float]:
    """exp(mean NLL) and its standard error, as llama-perplexity computes them."""
    mean = float(nll.mean())
    variance = float((nll * nll).mean()) - mean * mean
    perplexity = math.exp(mean)
    return perplexity, perplexity * math.sqrt(max(variance, 0.0) / max(len(nll) - 1, 1))


@dataclasses.dataclass
class Result:
    quantization: str
    text_tokens: int  # the whole text's, before --max-tokens
    tokens: int  # tokens scored
    chunks: int | None  # llama protocol: sequences of --ctx tokens
    perplexity: float
    error: float  # standard error of the perplexity
    # llama protocol: the perplexity over chunks 1..i, as llama-perplexity prints them.
    chunk_perplexities: list[float] | None
    seconds: float


@dataclasses.dataclass
class LlamaCppResult:
    perplexity: float  # its "Final estimate"
    error: float
    chunks: int
    chunk_perplexities: list[float]  # over chunks 1..i
    command: list[str]
    build: str
    text_tokens: int | None = None  # the whole text's, counted after the run


class LlamaPerplexity:
    """llama.cpp's `llama-perplexity` in `folder`, run on `gguf` with `threads` threads."""

    def __init__(self, folder: Path, gguf: Path, threads: int):
        self.tools = LlamaCppTools(folder, [TOOL], gguf, threads)

    def measure(self, text: Path, ctx: int, chunks: int | None) -> LlamaCppResult:
        limit = ["--chunks", str(chunks)] if chunks else []
        done = self._run("-f", str(text), "-c", str(ctx), *limit)
        final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", done.stderr)
        counted = re.search(r"calculating perplexity over (\d+) chunks", done.stderr)
        if final is None or counted is None:
            raise LlamaCppError(f"llama-perplexity printed no final estimate: {last_line(done)}")
        chunk_perplexities = [float(v) for v in re.findall(r"\[\d+\]([\d.]+),", done.stdout)]
        return LlamaCppResult(
            float(final[1]),
            float(final[2]),
            int(counted[1]),
            chunk_perplexities,
            [str(arg) for arg in done.args],
            self._build(),
        )

    def count_tokens(self, text: Path, ours: int) -> int:
        """How many tokens llama-perplexity makes of `text`. Asked for chunks of `ours` tokens,
        it needs twice as many, stops before scoring and says how many it has."""
        done = self._run("-f", str(text), "-c", str(ours))
        found = re.search(r"tokenizes to only (\d+) tokens", done.stderr)
        if found is None:
            raise LlamaCppError(f"llama-perplexity did not count the tokens: {last_line(done)}")
        return int(found[1])

    def _build(self) -> str:
        """Its version line, e.g. "0.5.0-dev (build 1, commit 0c1e570)"."""
        done = subprocess.run(
            [str(self.tools.folder / TOOL), "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        found = re.search(r"version: (.+)", done.stdout + done.stderr)
        return found[1].strip() if found else "?"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        # --no-repack: weights in the GGUF's layout, whatever the CPU. A native build on a CPU
        # that reports AMX otherwise runs AMX kernels for Q4_1, which crash (SIGILL or SIGSEGV)
        # where the host does not grant AMX state. Speed is not measured here.
        return self.tools.run(TOOL, *args, "--no-repack")


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[row])[targets[row]] for each row, in float64."""
    out = np.empty(len(targets))
    for start in range(0, len(targets), SCORE_ROWS):
        rows = logits[start : start + SCORE_ROWS].astype(np.float64)
        picked = targets[start : start + SCORE_ROWS]
        peak = rows.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        out[start : start + len(picked)] = log_sum - rows[np.arange(len(picked)), picked]
    return out


def sequence_nll(
    runtime: ModelRuntime, kv_cache: KVCache, tokens: list[int], first: int
) -> np.ndarray:
    """NLL of each of tokens[first + 1:] given all the tokens before it, run as one fresh
    sequence in prefill chunks of CHUNK tokens."""
    ids = np.asarray(tokens, dtype=np.int64)
    scores = []
    kv_cache.add_sequence(SEQ_ID)
    try:
        for start in range(0, len(tokens) - 1, CHUNK):
            chunk = tokens[start : start + CHUNK]
            logits = runtime.prefill(kv_cache, [SEQ_ID], [chunk], all_logits=True)
            # Row i predicts token start + i + 1; the last token predicts nothing.
            low, high = max(first, start), min(start + len(chunk), len(tokens) - 1)
            if low < high:
                scores.append(
                    token_nll(logits[low - start : high - start], ids[low + 1 : high + 1])
                )
    finally:
        kv_cache.remove_sequence(SEQ_ID)
    return np.concatenate(scores)


def whole_nll(runtime: ModelRuntime, tokens: list[int]) -> np.ndarray:
    """The NLL of each token after the first, as one sequence."""
    tokens = tokens[: runtime.config.context_window_size]
    return sequence_nll(runtime, runtime.create_kv_cache(1, len(tokens), CHUNK), tokens, 0)


def chunked_nll(
    runtime: ModelRuntime, tokens: list[int], ctx: int, bos: int | None
) -> list[np.ndarray]:
    """llama-perplexity's protocol: per chunk of `ctx` tokens, the NLL of its second half."""
    if ctx > runtime.config.context_window_size:
        raise SystemExit(f"perplexity.py: error: --ctx {ctx} is over the model's context window")
    kv_cache = runtime.create_kv_cache(1, ctx, min(ctx, CHUNK))
    out = []
    for start in range(0, len(tokens) - ctx + 1, ctx):
        chunk = tokens[start : start + ctx]
        if bos is not None:
            chunk[0] = bos
        out.append(sequence_nll(runtime, kv_cache, chunk, ctx // 2))
    return out


def measure(
    quantization: str,
    device: Device,
    threads: int,
    protocol: str,
    ctx: int,
    max_tokens: int | None,
    gguf: Path | None = None,
) -> Result:
    """The text's perplexity under the default model in `quantization`, or under the GGUF file
    `gguf` converted as `--model` converts it (`quantization` is then its scheme)."""
    model = str(gguf) if gguf else f"{DEFAULT_MODEL}-{quantization}"
    runtime, tokenizer, _ = load(model, device, threads)
    text = TEXT.read_text(encoding="utf-8")
    if protocol == "llama":
        text = text.removesuffix("\n")  # as llama.cpp's `-f` reads a file
    tokens = tokenizer.encode(text)
    text_tokens = len(tokens)
    tokens = tokens[:max_tokens]
    console.print(f"[dim]{quantization}: {len(tokens)} tokens, protocol {protocol}...[/dim]")
    start = time.perf_counter()
    if protocol == "whole":
        chunks = [whole_nll(runtime, tokens)]
    else:
        bos = tokenizer.bos_token_id if runtime.config.add_bos_token else None
        chunks = chunked_nll(runtime, tokens, ctx, bos)
    seconds = time.perf_counter() - start
    nll = np.concatenate(chunks)
    perplexity, error = perplexity_error(nll)
    if protocol == "whole":
        return Result(quantization, text_tokens, len(nll), None, perplexity, error, None, seconds)
    running = [perplexity_error(np.concatenate(chunks[: i + 1]))[0] for i in range(len(chunks))]
    return Result(
        quantization, text_tokens, len(nll), len(chunks), perplexity, error, running, seconds
    )


def table(
    results: list[Result], protocol: str, ctx: int, threads: int, llama: LlamaCppResult | None
) -> Table:
    reference = next((r.perplexity for r in results if r.quantization == "q0f32"), None)
    title = f"{DEFAULT_MODEL} perplexity on {TEXT.name}"
    if protocol == "llama":
        chunks = results[0].chunks if results else 0
        title += f", llama-perplexity's protocol: {chunks} chunks of {ctx}, second halves scored"
    out = Table(title=title)
    if llama:
        out.caption = (
            f"llama.cpp {llama.build}, same GGUF, {threads} threads; ratio: ours / llama.cpp"
        )
    names = ["quantization", "tokens", "perplexity", "+/-", "vs q0f32"]
    names += ["llama.cpp", "+/-", "ratio"] if llama else []
    for name in [*names, "seconds"]:
        out.add_column(name, justify="left" if name == "quantization" else "right")
    for r in results:
        row = [r.quantization, str(r.tokens), f"{r.perplexity:.4f}", f"{r.error:.4f}"]
        row.append(f"{r.perplexity / reference:.4f}" if reference else "-")
        if llama:
            row += [f"{llama.perplexity:.4f}", f"{llama.error:.4f}"]
            row.append(f"{r.perplexity / llama.perplexity:.4f}")
        out.add_row(*row, f"{r.seconds:.1f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quantizations",
        nargs="+",
        default=None,
        metavar="Q",
        help=f"default {' '.join(QUANTIZATIONS)}; with --llama-cpp-bin, "
        f"{' '.join(COMPARED_QUANTIZATIONS)}",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="whole (default) or llama (llama-perplexity's; implied by --llama-cpp-bin)",
    )
    parser.add_argument(
        "--ctx", type=int, default=512, metavar="N", help="llama protocol: chunk size (512)"
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="use only the text's first N tokens (llama protocol: its first N // ctx chunks)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda[:N], ... or auto")
    parser.add_argument(
        "--num-threads", type=int, default=None, metavar="N", help="default: every usable core"
    )
    parser.add_argument(
        "--llama-cpp-bin",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run DIR/llama-perplexity on the same text and GGUF and compare",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        metavar="FILE",
        help="measure this GGUF file instead (converted as --model converts it, each tensor in "
        "its own type, under the device's default scheme); llama.cpp runs on it too",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write here")
    args = parser.parse_args()
    if args.gguf and args.quantizations:
        parser.error("--gguf takes the device's default scheme: leave out --quantizations")
    protocol = args.protocol or ("llama" if args.llama_cpp_bin else "whole")
    if args.llama_cpp_bin and protocol != "llama":
        parser.error("--llama-cpp-bin compares under llama-perplexity's protocol: --protocol llama")
    if args.ctx < 4:
        parser.error("--ctx must be at least 4")
    least = args.ctx if protocol == "llama" else 2
    if args.max_tokens is not None and args.max_tokens < least:
        parser.error(f"--max-tokens must be at least {least}")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error("--num-threads must be at least 1")
    device = resolve_device(parse_device(args.device))
    quantizations = args.quantizations or (
        COMPARED_QUANTIZATIONS if args.llama_cpp_bin else QUANTIZATIONS
    )
    if args.gguf:
        quantizations = [default_quantization(device)]
    gguf = args.gguf or default_model_gguf()
    # Decided once here, so that llama.cpp gets exactly the thread count our runtime gets.
    threads = use_threads(args.num_threads)

    try:
        llama = None
        if args.llama_cpp_bin:
            # Its figure does not depend on our quantization: one run, first, so that a missing
            # or broken tool stops the script before ours take minutes.
            runner = LlamaPerplexity(args.llama_cpp_bin, gguf, threads)
            chunks = args.max_tokens // args.ctx if args.max_tokens else None
            llama = runner.measure(TEXT, args.ctx, chunks)
        results = [
            measure(q, device, threads, protocol, args.ctx, args.max_tokens, args.gguf)
            for q in quantizations
        ]
        if llama:
            llama.text_tokens = runner.count_tokens(TEXT, results[0].text_tokens)
    except LlamaCppError as error:
        raise SystemExit(f"perplexity.py: error: {error}") from None
    for r in results:
        # The same tokens make the same chunks: counts that differ mean the tokenizers do.
        if llama and (r.text_tokens, r.chunks) != (llama.text_tokens, llama.chunks):
            raise SystemExit(
                f"perplexity.py: error: {r.quantization} has {r.text_tokens} tokens in "
                f"{r.chunks} chunks, llama-perplexity {llama.text_tokens} in {llama.chunks}"
            )
    # Wide enough for a row when the output is not a terminal (rich then assumes 80 columns).
    Console(width=max(Console().width, 110)).print(
        table(results, protocol, args.ctx, threads, llama)
    )
    if args.json:
        report = {
            "model": DEFAULT_MODEL,
            "gguf": str(gguf),
            "text": TEXT.name,
            "device": device.name,
            "protocol": protocol,
            "ctx": args.ctx if protocol == "llama" else None,
            "num_threads": threads,
            "llama_cpp": dataclasses.asdict(llama) if llama else None,
        }
        figures = []
        for r in results:
            ratio = r.perplexity / llama.perplexity if llama else None
            figures.append({**dataclasses.asdict(r), "vs_llama_cpp": ratio})
        args.json.write_text(json.dumps({**report, "results": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
