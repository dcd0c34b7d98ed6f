"""Checkpoint tensors as the model converter sees them, whatever file they came from.

A source is either a GGUF file or a Hugging Face folder of safetensors. Both are read into the same
shape: Hugging Face parameter names and layouts, the stored data untouched (memory-mapped where the
file allows), and a `ModelConfig` filled from the file's metadata. GGUF 4-bit blocks stay available
as blocks, so a converter can keep them without rounding them a second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlc_engine.common.config import ModelConfig

BLOCK = 32  # elements per block in every GGUF type read here
# Bytes per block and the offset of the packed codes within it.
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
Q4_CODES_AT = {"Q4_0": 2, "Q4_1": 4}
# Tokens that end an assistant turn in common chat templates; generation must stop there too.
CHAT_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")


@dataclass
class Q4Blocks:
    """4-bit codes with one scale (and for Q4_1 one minimum) per 32 consecutive elements of a row.

    Symmetric (GGUF Q4_0): value = scale * (code - 8); asymmetric (GGUF Q4_1): value = scale * code
    + minimum.
    """

    codes: np.ndarray  # uint8 [rows, cols], each 0..15
    scale: np.ndarray  # float32 [rows, cols // 32]
    minimum: np.ndarray | None  # float32 [rows, cols // 32]; None for symmetric blocks

    def to_float32(self) -> np.ndarray:
        """The values the blocks stand for, [rows, cols], computed as GGML does."""
        rows, cols = self.codes.shape
        codes = self.codes.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32)
        scale = self.scale[:, :, None]
        if self.minimum is None:
            values = scale * (codes - np.float32(8))
        else:
            values = scale * codes + self.minimum[:, :, None]
        return values.reshape(rows, cols)


@dataclass
class SourceTensor:
    """One parameter: its Hugging Face name and shape, and its data as stored in the file.

    `data` is the float array for F32/F16, a uint16 array of the bit patterns for BF16, and the GGUF
    block bytes for quantized kinds (uint8 [rows, bytes_per_row]).
    """

    name: str
    shape: tuple[int, ...]
    kind: str  # "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"
    data: np.ndarray

    def to_float32(self) -> np.ndarray:
        """The dequantized values, shaped `self.shape` (a read-only view when stored as F32)."""
        if self.kind in ("F32", "F16"):
            return np.asarray(self.data, dtype=np.float32).reshape(self.shape)
        if self.kind == "BF16":
            bits = np.asarray(self.data).view(np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        if self.kind == "Q8_0":
            codes, scale = self.q8_blocks()
            rows = codes.shape[0]
            values = codes.reshape(rows, -1, BLOCK).astype(np.float32) * scale[..., None]
            return values.reshape(self.shape)
        return self.q4_blocks().to_float32().reshape(self.shape)

    def q8_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """A Q8_0 tensor's codes (int8 [rows, cols]) and scales (float32 [rows, cols // 32]),
        exactly as stored."""
        if self.kind != "Q8_0":
            raise ValueError(f"{self.name} is {self.kind}, not Q8_0")
        blocks = self._blocks()
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return codes.reshape(blocks.shape[0], -1), _half(blocks, 0)

    def q4_blocks(self) -> Q4Blocks:
        """The stored 4-bit codes, scales and minimums of a Q4_0/Q4_1 tensor, exactly as stored."""
        if self.kind not in Q4_CODES_AT:
            raise ValueError(f"{self.name} is {self.kind}, not a 4-bit block type")
        blocks = self._blocks()
        packed = blocks[..., Q4_CODES_AT[self.kind] :]
        # Each byte holds element j in its low nibble and element j + 16 in its high nibble.
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
        rows = blocks.shape[0]
        minimum = _half(blocks, 2) if self.kind == "Q4_1" else None
        return Q4Blocks(codes.reshape(rows, -1), _half(blocks, 0), minimum)

    def _blocks(self) -> np.ndarray:
        """The block bytes as [rows, blocks_per_row, bytes_per_block]."""
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return np.asarray(self.data).reshape(rows, self.shape[-1] // BLOCK, BLOCK_BYTES[self.kind])


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 stored at byte `at` of every block, as float32 [rows, blocks_per_row]."""
    raw = np.ascontiguousarray(blocks[..., at : at + 2])
    return raw.view(np.float16)[..., 0].astype(np.float32)


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
