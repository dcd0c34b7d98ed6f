"""GGUF's quantized block layouts, decoded into integer codes with a scale (and minimum) per group.

Every type read here stands for `value = scale * code (+ minimum)` over groups of consecutive
elements of a row, where the scale and minimum are float32 products that GGML itself forms when
it dequantizes (a float16 super-block scale times a small integer sub-block scale, exact in
float32). Decoding into that form loses nothing: `Blocks.to_float32` gives GGML's values bit for
bit, and the converter can carry the codes into a storage with at least as many bits.

- Q4_0, Q8_0, Q5_0: groups of 32, `d * (q - offset)`, so codes are signed (`q - 8`, `q`, `q - 16`).
- Q4_1, Q5_1: groups of 32, `d * q + m`.
- Q4_K, Q5_K: super-blocks of 256 with a float16 scale `d` and minimum scale `dmin`, and 8
  sub-blocks of 32, each with a 6-bit scale `sc` and minimum `m`: `d * sc * q - dmin * m`.
- Q6_K: super-blocks of 256 with a float16 `d` and 16 sub-blocks of 16, each with a signed 8-bit
  scale `sc`: `d * sc * (q - 32)`, q 6-bit.

Layouts are as ggml-common.h declares them (block_q4_K and so on).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPER_BLOCK = 256  # elements per K-quant super-block
# Elements and bytes per block of each quantized type.
BLOCK_ELEMENTS = {
    "Q4_0": 32,
    "Q4_1": 32,
    "Q5_0": 32,
    "Q5_1": 32,
    "Q8_0": 32,
    "Q4_K": SUPER_BLOCK,
    "Q5_K": SUPER_BLOCK,
    "Q6_K": SUPER_BLOCK,
}
BLOCK_BYTES = {
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q8_0": 34,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
}
QUANTIZED_KINDS = tuple(BLOCK_BYTES)


@dataclass
class Blocks:
    """A matrix as integer codes with one scale (and optionally one minimum) per `group`
    consecutive elements of a row: value = scale * code (+ minimum)."""

    codes: np.ndarray  # int8 [rows, cols]
    scale: np.ndarray  # float32 [rows, cols // group]
    minimum: np.ndarray | None  # float32 [rows, cols // group], or None
    group: int

    def to_float32(self) -> np.ndarray:
        """The values the blocks stand for, [rows, cols], rounded as GGML rounds them."""
        rows, cols = self.codes.shape
        codes = self.codes.reshape(rows, cols // self.group, self.group).astype(np.float32)
        values = self.scale[:, :, None] * codes
        if self.minimum is not None:
            values = values + self.minimum[:, :, None]
        return values.reshape(rows, cols)


def decode(kind: str, data: np.ndarray, cols: int) -> Blocks:
    """The blocks of a GGUF tensor of type `kind`, from its bytes (uint8 [rows, bytes per row])."""
    rows = data.shape[0]
    blocks = np.asarray(data).reshape(rows, cols // BLOCK_ELEMENTS[kind], BLOCK_BYTES[kind])
    decoded = _DECODERS[kind](blocks)
    return Blocks(
        np.ascontiguousarray(decoded.codes.reshape(rows, cols)),
        decoded.scale.reshape(rows, -1),
        None if decoded.minimum is None else decoded.minimum.reshape(rows, -1),
        decoded.group,
    )


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [rows, blocks]."""
    raw = np.ascontiguousarray(blocks[..., at : at + 2])
    return raw.view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes holding element j in the low nibble and element j + len in the high one, as codes."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _fifth_bits(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q5_0/Q5_1's high bits: bit j of the little-endian uint32 at `at` belongs to element j."""
    words = blocks[..., at : at + 4].astype(np.uint8)
    bits = np.unpackbits(words, axis=-1, bitorder="little")
    return bits * np.uint8(16)


def _q4_0(blocks: np.ndarray) -> Blocks:
    codes = _nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)
    return Blocks(codes, _half(blocks, 0), None, 32)


def _q4_1(blocks: np.ndarray) -> Blocks:
    return Blocks(_nibbles(blocks[..., 4:]).astype(np.int8), _half(blocks, 0), _half(blocks, 2), 32)


def _q5_0(blocks: np.ndarray) -> Blocks:
    codes = (_nibbles(blocks[..., 6:]) | _fifth_bits(blocks, 2)).astype(np.int8) - np.int8(16)
    return Blocks(codes, _half(blocks, 0), None, 32)


def _q5_1(blocks: np.ndarray) -> Blocks:
    codes = (_nibbles(blocks[..., 8:]) | _fifth_bits(blocks, 4)).astype(np.int8)
    return Blocks(codes, _half(blocks, 0), _half(blocks, 2), 32)


def _q8_0(blocks: np.ndarray) -> Blocks:
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return Blocks(codes, _half(blocks, 0), None, 32)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit sub-block scales and minimums: [..., 8] each. Sub-blocks
    0-3 have theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (minimums); sub-blocks 4-7
    have their low 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the top bits of
    bytes 0-3 (scales) and 4-7 (minimums)."""
    low, high, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 63, (extra & 0x0F) | ((low >> 6) << 4)], axis=-1)
    minimums = np.concatenate([high & 63, (extra >> 4) | ((high >> 6) << 4)], axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


def _k_quant_4_or_5(blocks: np.ndarray, high_bits_at: int | None) -> Blocks:
    """Q4_K (no high bits) or Q5_K: 4 chunks of 64 elements, each 32 bytes of codes whose low
    nibbles are the chunk's first sub-block and high nibbles its second; Q5_K's 32 bytes of fifth
    bits hold element l of sub-block s in bit s of byte l."""
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    scales, minimums = _k_scales(blocks[..., 4:16])
    lead = blocks.shape[:-1]
    codes_at = 16 if high_bits_at is None else high_bits_at + 32
    packed = blocks[..., codes_at : codes_at + 128].reshape(*lead, 4, 32)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-2).reshape(*lead, 8, 32)
    if high_bits_at is not None:
        high = blocks[..., high_bits_at : high_bits_at + 32]
        bits = (high[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
        codes = codes | (bits * np.uint8(16))
    scale = d[..., None] * scales
    minimum = -(dmin[..., None] * minimums)
    return Blocks(codes.astype(np.int8).reshape(*lead, SUPER_BLOCK), scale, minimum, 32)


def _q4_k(blocks: np.ndarray) -> Blocks:
    return _k_quant_4_or_5(blocks, None)


def _q5_k(blocks: np.ndarray) -> Blocks:
    return _k_quant_4_or_5(blocks, 16)


def _q6_k(blocks: np.ndarray) -> Blocks:
    """Two halves of 128 elements, each from 64 bytes of low nibbles (`ql`) and 32 bytes of
    2-bit high parts (`qh`): for l < 32, elements l, l + 32, l + 64, l + 96 of the half take
    the low nibbles of ql[l], ql[l + 32], then their high nibbles, and bits 0-1, 2-3, 4-5, 6-7
    of qh[l]."""
    lead = blocks.shape[:-1]
    ql = blocks[..., 0:128].reshape(*lead, 2, 2, 32)
    qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2)  # [..., half, 4, 32]
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    codes = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sub_scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    scale = _half(blocks, 208)[..., None] * sub_scales
    return Blocks(codes.reshape(*lead, SUPER_BLOCK), scale, None, 16)


_DECODERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
