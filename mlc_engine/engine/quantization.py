"""Weight quantization schemes: their names, their storage layout and the NumPy side of them.

Names follow MLC: `q{bits}f{compute float bits}_{variant}`.
- `q0f32`, `q0f16`: unquantized weights in float32 / float16.
- `q4f32_1`, `q4f16_1`: symmetric 4-bit in groups of 32, one scale per group:
  `w = scale * (code - 8)`, code in 0..15. GGUF's Q4_0 blocks are exactly this, so they are carried
  over without re-rounding. (MLC centres on 7; centring on 8 is what lets Q4_0 map onto it.)
- `q4f32_m`, `q4f16_m`: asymmetric 4-bit in groups of 32 with a per-group minimum:
  `w = scale * code + minimum`, which is GGUF's Q4_1 block, carried over as it is.

Each weight matrix has a storage of its own (`STORAGES`), recorded per tensor in the model folder's
`mlc-chat-config.json` (`ModelConfig.tensor_storage`): the scheme's 4-bit format for weights
converted from floats, or what a GGUF file held where that had more bits (a Q8_0 tensor stays
8-bit, a float one float: `convert.py`). The scheme's dtype computes throughout.
- `q4_0`: the symmetric 4-bit groups above; `q4_1`: with a minimum (also GGUF's Q4_K, whose
  sub-blocks of 32 each have a scale and a minimum).
- `q8_0`: GGUF's Q8_0 blocks, `w = scale * code`, code in -128..127, groups of 32; `q8_1`: with
  a minimum, `w = scale * code + minimum`. `q8_0_g16` and `q8_1_g16`: the same in groups of 16.
  GGUF's 5- and 6-bit types (Q5_0, Q5_1, Q5_K, Q6_K) are carried over into these, each code in
  a byte (`convert.py`).
- `float`: the weights in the compute dtype.

The scale (and minimum) of a group is a float in the compute dtype. For GGUF's K-quants it is the
product GGML forms of the super-block's float16 scale and the sub-block's integer one: exact in
float32, so a float32 scheme computes with the file's weights bit for bit (float16 ones round it).

4-bit codes are packed eight to a uint32, element `k` of a row in bits `4 * (k % 8)` of word
`k // 8`; 8-bit codes four to a uint32, element `k` in byte `k % 4` of word `k // 4` (the int8
row viewed as uint32, little-endian).

Model folders store quantized matrices row by row ([rows, words], [rows, groups]). A library may
want them in blocks of COLUMN_BLOCK rows instead, each block word-major ([rows / 16, words, 16]:
the same word of 16 rows side by side), which is how the CPU's integer kernel (`int8_gemm.py`)
reads them into SIMD lanes. The library records which it wants (`Quantization.column_block`),
and the runtime repacks the stored arrays when it loads them (`to_storage_layout`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mlc_engine.common.config import ModelConfig

GROUP_SIZE = 32
CODES_PER_WORD = 8  # 4-bit codes in a uint32

FLOAT, Q4_0, Q4_1, Q8_0, Q8_1 = "float", "q4_0", "q4_1", "q8_0", "q8_1"
Q8_0_G16, Q8_1_G16 = "q8_0_g16", "q8_1_g16"


@dataclasses.dataclass(frozen=True)
class StorageFormat:
    """How a quantized storage holds a matrix: codes of `bits`, a scale per `group` elements of
    a row and, with `has_minimum`, a minimum per group."""

    bits: int
    has_minimum: bool
    group: int


FORMATS = {
    Q4_0: StorageFormat(4, False, GROUP_SIZE),
    Q4_1: StorageFormat(4, True, GROUP_SIZE),
    Q8_0: StorageFormat(8, False, GROUP_SIZE),
    Q8_1: StorageFormat(8, True, GROUP_SIZE),
    Q8_0_G16: StorageFormat(8, False, 16),
    Q8_1_G16: StorageFormat(8, True, 16),
}
STORAGES = (FLOAT, *FORMATS)


def codes_per_word(storage: str) -> int:
    return 32 // FORMATS[storage].bits


def group_size(storage: str) -> int:
    return FORMATS[storage].group


def has_minimum(storage: str) -> bool:
    return FORMATS[storage].has_minimum


def packed_name(storage: str) -> str:
    """The prefix of a quantized weight's arrays in the model folder (`q4`, `q8`)."""
    return f"q{FORMATS[storage].bits}"


def widest(storages: list[str]) -> str:
    """The narrowest storage that holds every one of `storages` exactly: float if any is float,
    else the most bits, a minimum if any has one, and the smallest group."""
    if FLOAT in storages:
        return FLOAT
    formats = [FORMATS[s] for s in storages]
    joined = StorageFormat(
        max(f.bits for f in formats),
        any(f.has_minimum for f in formats),
        min(f.group for f in formats),
    )
    return next(name for name, f in FORMATS.items() if f == joined)


@dataclasses.dataclass(frozen=True)
class Quantization:
    """One quantization scheme: how weights are stored and which float type computes."""

    name: str
    bits: int  # 0 means unquantized
    dtype: str  # activation / compute dtype: "float32" or "float16"
    has_minimum: bool = False
    # 4-bit arrays in blocks of this many rows (COLUMN_BLOCK), or row by row (0). A choice of
    # the library, not of the model folder.
    column_block: int = 0
    # The KV cache's dtype where a library asks for one; "" for the default (`kv_dtype`).
    kv_cache_dtype: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def kv_dtype(self) -> str:
        """What the KV cache holds: by default float16 for 4-bit models (llama.cpp's default
        cache too), which halves what a decode reads at long context; unquantized models keep
        their compute dtype, so that q0f32 stays float32 throughout."""
        if self.kv_cache_dtype:
            return self.kv_cache_dtype
        return "float16" if self.quantized else self.dtype

    @property
    def weight_storage(self) -> str:
        """The storage of a weight converted from floats under this scheme."""
        if not self.quantized:
            return FLOAT
        return Q4_1 if self.has_minimum else Q4_0


QUANTIZATIONS = {
    q.name: q
    for q in (
        Quantization("q0f32", 0, "float32"),
        Quantization("q0f16", 0, "float16"),
        Quantization("q4f32_1", 4, "float32"),
        Quantization("q4f16_1", 4, "float16"),
        Quantization("q4f32_m", 4, "float32", has_minimum=True),
        Quantization("q4f16_m", 4, "float16", has_minimum=True),
    )
}


# Rows of a 4-bit matrix (output columns of its matmul) per block, where a library blocks them.
COLUMN_BLOCK = 16


def blocked_shape(shape: tuple[int, int], column_block: int) -> tuple[int, ...]:
    """The shape a [rows, width] 4-bit array is kept in: blocks of `column_block` rows where
    the rows divide into them, else as it is."""
    rows, width = shape
    if column_block and rows % column_block == 0:
        return (rows // column_block, width, column_block)
    return (rows, width)


def to_storage_layout(array: np.ndarray, column_block: int) -> np.ndarray:
    """A [rows, width] 4-bit array (codes, scales or minimums) as a library with this
    `column_block` reads it (see `blocked_shape`)."""
    shape = blocked_shape(array.shape, column_block)
    if len(shape) == 2:
        return array
    blocks, width, block = shape
    return np.ascontiguousarray(array.reshape(blocks, block, width).transpose(0, 2, 1))


def get_quantization(name: str) -> Quantization:
    """Look a scheme up by name, with an error that lists the known ones."""
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        known = ", ".join(QUANTIZATIONS)
        raise ValueError(f"unknown quantization {name!r}; known: {known}") from None


def storage_of(config: ModelConfig, name: str) -> str:
    """How the weight `name` (a linear layer or the embedding, by our parameter prefix) is stored:
    as the model folder records it, else (folders from before per-tensor storage) the scheme's."""
    return config.tensor_storage.get(name) or get_quantization(config.quantization).weight_storage


@dataclasses.dataclass
class PackedWeight:
    """A quantized weight matrix as stored in a model folder."""

    storage: str  # one of FORMATS
    weight: np.ndarray  # uint32 [rows, cols // codes_per_word(storage)]
    scale: np.ndarray  # [rows, cols // group_size(storage)]
    minimum: np.ndarray | None = None  # as scale, for storages with a minimum


def quantize_symmetric(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round a float matrix to symmetric 4-bit groups: returns (codes uint8, scale float32)."""
    rows, cols = w.shape
    groups = w.astype(np.float32).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    scale = np.abs(groups).max(axis=-1) / 7.0
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    codes = np.clip(np.rint(groups / safe) + 8, 0, 15).astype(np.uint8)
    return codes.reshape(rows, cols), scale.astype(np.float32)


def quantize_asymmetric(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round a float matrix to asymmetric 4-bit groups: returns (codes, scale, minimum)."""
    rows, cols = w.shape
    groups = w.astype(np.float32).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
    low = groups.min(axis=-1)
    scale = (groups.max(axis=-1) - low) / 15.0
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    codes = np.clip(np.rint((groups - low[..., None]) / safe), 0, 15).astype(np.uint8)
    return codes.reshape(rows, cols), scale.astype(np.float32), low.astype(np.float32)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Pack uint8 codes [rows, cols] (0..15) into uint32 words [rows, cols // 8]."""
    rows, cols = codes.shape
    nibbles = codes.astype(np.uint32).reshape(rows, cols // CODES_PER_WORD, CODES_PER_WORD)
    shifts = np.arange(CODES_PER_WORD, dtype=np.uint32) * 4
    return np.bitwise_or.reduce(nibbles << shifts, axis=-1).astype(np.uint32)


def unpack_codes(words: np.ndarray) -> np.ndarray:
    """Inverse of `pack_codes`."""
    shifts = np.arange(CODES_PER_WORD, dtype=np.uint32) * 4
    codes = (words[..., None] >> shifts) & 0xF
    return codes.reshape(words.shape[0], -1).astype(np.uint8)


def quantize_q8(w: np.ndarray, group: int = GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Round a float matrix to 8-bit groups as GGUF's Q8_0 does: (codes int8, scale float32)."""
    rows, cols = w.shape
    groups = w.astype(np.float32).reshape(rows, cols // group, group)
    scale = np.abs(groups).max(axis=-1) / 127.0
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    codes = np.clip(np.rint(groups / safe), -127, 127).astype(np.int8)
    return codes.reshape(rows, cols), scale.astype(np.float32)


def pack_q8(codes: np.ndarray) -> np.ndarray:
    """int8 codes [rows, cols] as uint32 words [rows, cols // 4], four codes to a word."""
    return np.ascontiguousarray(codes, dtype=np.int8).view("<u4")


def unpack_q8(words: np.ndarray) -> np.ndarray:
    """Inverse of `pack_q8`."""
    return np.ascontiguousarray(words, dtype="<u4").view(np.int8)


def dequantize(packed: PackedWeight) -> np.ndarray:
    """The float32 matrix a packed weight stands for."""
    scale = packed.scale.astype(np.float32)[..., None]
    if FORMATS[packed.storage].bits == 8:
        codes = unpack_q8(packed.weight).astype(np.float32)
    else:
        codes = unpack_codes(packed.weight).astype(np.float32)
        if packed.minimum is None:
            codes = codes - 8.0
    rows, cols = codes.shape
    values = scale * codes.reshape(rows, cols // group_size(packed.storage), -1)
    if packed.minimum is not None:
        values = values + packed.minimum.astype(np.float32)[..., None]
    return values.reshape(rows, cols)
