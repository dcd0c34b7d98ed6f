"""Write the tiny GGUF fixtures of tests/engine/data/gguf/ with llama.cpp's own llama-quantize.

A one-layer Llama of random float32 weights is written with gguf-py, then quantized by
llama-quantize into each block type the engine carries over (`--pure`: every tensor in that type,
where its rows allow), and into a Q4_K_M mixture whose attn_v is Q6_K (so that a fused q/k/v
mixes Q4_K and Q6_K). K-quants take rows of 256: the hidden size is 256 and the attention output
and down projection, whose rows are 64 and 32 long, fall back to other types, as llama-quantize
does for SmolLM2's 576.

    python scripts/make_gguf_fixtures.py /work/llama-build-noamx/bin/llama-quantize

The tests need neither llama.cpp nor this script; it is kept to show how the files were made.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import gguf
import numpy as np

OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "engine" / "data" / "gguf"
CONFIG = {
    "hidden": 256,
    "intermediate": 32,
    "heads": 2,
    "kv_heads": 1,
    "head_dim": 32,
    "vocab": 64,
    "context": 256,
}
# File stem -> llama-quantize's type and options.
FIXTURES = {
    "tiny-Q4_K": ["Q4_K", "--pure"],
    "tiny-Q5_K": ["Q5_K", "--pure"],
    "tiny-Q6_K": ["Q6_K", "--pure"],
    "tiny-Q5_0": ["Q5_0", "--pure"],
    "tiny-Q5_1": ["Q5_1", "--pure"],
    "tiny-Q4_K_M": ["Q4_K_M", "--tensor-type", "attn_v=q6_k"],
}


def write_float_model(path: Path, seed: int = 0) -> None:
    """The float32 source: random weights, norms near 1, a tied output layer."""
    c = CONFIG
    rng = np.random.default_rng(seed)
    hidden, q_rows, kv_rows = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-kquant")
    writer.add_block_count(1)
    writer.add_context_length(c["context"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(c["intermediate"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"t{i}" for i in range(c["vocab"])])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = {
        "token_embd.weight": rand(c["vocab"], hidden, scale=1.0),
        "output_norm.weight": 1 + rand(hidden, scale=0.1),
        "blk.0.attn_norm.weight": 1 + rand(hidden, scale=0.1),
        "blk.0.ffn_norm.weight": 1 + rand(hidden, scale=0.1),
        # Random rows need no RoPE interleaving: any order is as random as another.
        "blk.0.attn_q.weight": rand(q_rows, hidden),
        "blk.0.attn_k.weight": rand(kv_rows, hidden),
        "blk.0.attn_v.weight": rand(kv_rows, hidden),
        "blk.0.attn_output.weight": rand(hidden, q_rows),
        "blk.0.ffn_gate.weight": rand(c["intermediate"], hidden),
        "blk.0.ffn_up.weight": rand(c["intermediate"], hidden),
        "blk.0.ffn_down.weight": rand(hidden, c["intermediate"]),
    }
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llama_quantize", type=Path, help="path to llama.cpp's llama-quantize")
    args = parser.parse_args()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "tiny-f32.gguf"
        write_float_model(source)
        for stem, (kind, *options) in FIXTURES.items():
            target = OUTPUT / f"{stem}.gguf"
            command = [str(args.llama_quantize), *options, str(source), str(target), kind]
            subprocess.run(command, check=True, capture_output=True)
            reader = gguf.GGUFReader(target)
            types = sorted({t.tensor_type.name for t in reader.tensors})
            print(f"{target.name}: {target.stat().st_size // 1024} KiB, {', '.join(types)}")


if __name__ == "__main__":
    main()
