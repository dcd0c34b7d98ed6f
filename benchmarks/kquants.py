"""The GGUF types people download, beside llama.cpp: the default model requantized by
llama-quantize, then perplexity and engine step speed on each file, ours and llama.cpp's in one
run.

The default GGUF (Q4_1 layers, a Q8_0 embedding) is requantized with `--allow-requantize` into
each type of `--types` (Q4_K_M, Q6_K and Q8_0 by default) in `--work-dir` (outside the
repository). For each file, in turn: `perplexity.py --gguf FILE --llama-cpp-bin DIR` and
`engine_step.py --gguf FILE --llama-cpp-bin DIR`, each in a process of its own, their JSON kept
in the work folder; then one Markdown table of every figure and ratio.

    python benchmarks/kquants.py --llama-cpp-bin /work/llama-build-noamx/bin
    python benchmarks/kquants.py --llama-cpp-bin DIR --types Q4_K_M --decode-steps 32

SmolLM2's hidden size (576) is not a multiple of 256, so llama-quantize falls back to other
types for the tensors whose rows are that long: the files mix types (the table lists them).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from mlc_engine.engine.models import default_model_gguf

HERE = Path(__file__).parent
TYPES = ["Q4_K_M", "Q6_K", "Q8_0"]
STEP_FIGURES = [
    ("prefill 512", "prefill_tok_s", "512"),
    ("decode x1", "decode_tok_s", "1"),
    ("decode x16", "decode_tok_s", "16"),
]
TARGETS = [">= 2.5", ">= 1.5", ">= 3"]  # issue 17's, ours / llama.cpp, beside STEP_FIGURES


def requantize(quantize: Path, kind: str, work: Path) -> Path:
    """The default GGUF in `kind`, written by llama-quantize (once: an existing file is kept)."""
    target = work / f"{default_model_gguf().stem}.{kind}.gguf"
    if not target.is_file():
        command = [
            str(quantize),
            "--allow-requantize",
            str(default_model_gguf()),
            str(target),
            kind,
        ]
        subprocess.run(command, check=True, capture_output=True)
    return target


def tensor_types(path: Path) -> str:
    """The file's quantized types with their tensor counts, most first."""
    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    counts.pop("F32", None)
    return ", ".join(f"{kind} x{n}" for kind, n in counts.most_common())


def run_script(script: str, gguf: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """One of the benchmark scripts on `gguf`, beside llama.cpp; its JSON report."""
    command = [sys.executable, str(HERE / script), "--gguf", str(gguf), "--json", str(out), *extra]
    subprocess.run(command, check=True)
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per file: its types, then perplexity and each step figure as ours / llama.cpp
    = ratio."""
    head = ["file", "tensors", "perplexity (<= 1.01)"]
    head += [
        f"{label} ({target})" for (label, _, _), target in zip(STEP_FIGURES, TARGETS, strict=True)
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ppl = row["perplexity"]
        ours, theirs = ppl["results"][0]["perplexity"], ppl["llama_cpp"]["perplexity"]
        cells = [row["type"], row["types"], f"{ours:.4f} / {theirs:.4f} = {ours / theirs:.4f}"]
        step = row["engine_step"]["results"][0]
        for _, figure, n in STEP_FIGURES:
            ours, theirs = step[figure][n], step["llama_cpp"][figure][n]
            cells.append(f"{ours:.1f} / {theirs:.1f} = {ours / theirs:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp-bin", type=Path, required=True, metavar="DIR")
    parser.add_argument("--types", nargs="+", default=TYPES, metavar="TYPE")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mlc-engine-kquants"))
    parser.add_argument("--num-threads", type=int, default=None, metavar="N")
    parser.add_argument("--decode-steps", type=int, default=32, metavar="N")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    common = ["--llama-cpp-bin", str(args.llama_cpp_bin)]
    if args.num_threads:
        common += ["--num-threads", str(args.num_threads)]
    perplexity_args = [*common] + (
        ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []
    )
    step_args = [*common, "--decode-steps", str(args.decode_steps)]
    rows = []
    for kind in args.types:
        gguf = requantize(args.llama_cpp_bin / "llama-quantize", kind, args.work_dir)
        print(f"== {gguf.name}: {tensor_types(gguf)}", flush=True)
        rows.append(
            {
                "type": kind,
                "types": tensor_types(gguf),
                "perplexity": run_script(
                    "perplexity.py",
                    gguf,
                    gguf.with_name(f"{gguf.stem}.perplexity.json"),
                    perplexity_args,
                ),
                "engine_step": run_script(
                    "engine_step.py",
                    gguf,
                    gguf.with_name(f"{gguf.stem}.engine_step.json"),
                    step_args,
                ),
            }
        )
        (args.work_dir / "kquants.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
