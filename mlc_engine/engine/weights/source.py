"""Checkpoint tensors as the model converter sees them, whatever file they came from.

A source is either a GGUF file or a Hugging Face folder of safetensors. Both are read into the same
shape: Hugging Face parameter names and layouts, the stored data untouched (memory-mapped where the
file allows), and a `ModelConfig` filled from the file's metadata. GGUF's quantized blocks stay
available as codes with their scales (`gguf_blocks.py`), so a converter can keep them without
rounding them a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlc_engine.common.config import ModelConfig
from mlc_engine.engine.weights.gguf_blocks import QUANTIZED_KINDS, Blocks, decode

# Tokens that end an assistant turn in common chat templates; generation must stop there too.
CHAT_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


@dataclass
class SourceTensor:
    """One parameter: its Hugging Face name and shape, and its data as stored in the file.

    `data` is the float array for F32/F16, a uint16 array of the bit patterns for BF16, and the GGUF
    block bytes for quantized kinds (uint8 [rows, bytes_per_row]).
    """

    name: str
    shape: tuple[int, ...]
    kind: str  # "F32", "F16", "BF16", or a GGUF block type (`gguf_blocks.QUANTIZED_KINDS`)
    data: np.ndarray

    def to_float32(self) -> np.ndarray:
        """The dequantized values, shaped `self.shape` (a read-only view when stored as F32)."""
        if self.kind in ("F32", "F16"):
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.kind == "BF16":
            bits = np.asarray(self.data).view(np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        return self.blocks().to_float32().reshape(self.shape)

    def blocks(self) -> Blocks:
        """A quantized tensor's codes, scales and minimums, exactly as stored."""
        if self.kind not in QUANTIZED_KINDS:
            raise ValueError(f"{self.name} is {self.kind}, not a quantized block type")
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return decode(self.kind, np.asarray(self.data).reshape(rows, -1), self.shape[-1])


@dataclass
class ModelSource:
    """A checkpoint ready to convert: config, tensors by Hugging Face name, tokenizer."""

    config: ModelConfig
    tensors: dict[str, SourceTensor]
    tokenizer_json: str | None  # tokenizer.json's text (built from the vocab for GGUF)
    path: Path
    # Whether each tensor's encoding was chosen by whoever quantized the file (GGUF), and is
    # kept where it holds more than the scheme; a float checkpoint's is not (safetensors).
    keeps_storage: bool = False


def stop_token_ids(
    eos_ids: list[int], chat_template: str | None, token_id: Callable[[str], int | None]
) -> list[int]:
    """`eos_ids` plus the end-of-turn tokens the chat template emits, without repeats."""
    ids = list(eos_ids)
    for token in CHAT_STOP_TOKENS:
        found = token_id(token)
        if chat_template and token in chat_template and found is not None:
            ids.append(found)
    return list(dict.fromkeys(ids))


def load_source(path: Path) -> ModelSource:
    """Read a `.gguf` file or a Hugging Face folder (config.json plus safetensors)."""
    # The readers import the dataclasses above, so they are imported here, not at the top.
    from mlc_engine.engine.weights.gguf_source import load_gguf
    from mlc_engine.engine.weights.hf_source import load_hf_folder

    path = Path(path)
    if path.is_file():
        with path.open("rb") as file:
            magic = file.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        return load_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_folder(path)
    if path.is_dir():
        raise ValueError(f"{path} has no config.json; expected a Hugging Face model folder")
    raise ValueError(f"{path} does not exist; expected a .gguf file or a Hugging Face folder")
