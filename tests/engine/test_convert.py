"""The converter: 4-bit GGUF blocks carried over exactly where our schemes can hold them."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from mlc_engine.engine.convert import _weight_params
from mlc_engine.engine.quantization import PackedWeight, dequantize, get_quantization
from mlc_engine.engine.weights.source import SourceTensor


def _packed(
    sources: list[SourceTensor], quantization: str, rerounded: list[str] | None = None
) -> PackedWeight:
    """The weight as the converter stores it under `quantization` (as a float source would be:
    its storage is the scheme's)."""
    quant = get_quantization(quantization)
    rerounded = [] if rerounded is None else rerounded
    params = _weight_params("w", sources, quant.weight_storage, quant.dtype, rerounded)
    return PackedWeight(
        quant.weight_storage,
        params["w.q4.q_weight"],
        params["w.q4.q_scale"],
        params.get("w.q4.q_min"),
    )


def _gguf_tensor(kind: str, rows: int = 8, cols: int = 64, seed: int = 0) -> SourceTensor:
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    blocks = quantize(weight, GGMLQuantizationType[kind])
    return SourceTensor(name="w", shape=(rows, cols), kind=kind, data=blocks)


@pytest.mark.parametrize(
    ("kind", "quantization"),
    [("Q4_0", "q4f32_1"), ("Q4_0", "q4f32_m"), ("Q4_1", "q4f32_m"), ("Q4_1", "q4f16_m")],
)
def test_gguf_4bit_blocks_are_carried_without_rounding_again(kind: str, quantization: str) -> None:
    tensor = _gguf_tensor(kind)
    rerounded: list[str] = []
    packed = _packed([tensor], quantization, rerounded)
    assert rerounded == []
    # Exact for f32 scales; f16 holds GGUF's f16 scales and minimums exactly too.
    np.testing.assert_array_equal(dequantize(packed), tensor.to_float32())


def test_fused_rows_keep_each_sources_blocks() -> None:
    first, second = _gguf_tensor("Q4_0", rows=4, seed=1), _gguf_tensor("Q4_0", rows=6, seed=2)
    packed = _packed([first, second], "q4f32_1")
    expected = np.concatenate([first.to_float32(), second.to_float32()])
    np.testing.assert_array_equal(dequantize(packed), expected)


def test_q4_1_blocks_into_the_symmetric_scheme_are_reported() -> None:
    rerounded: list[str] = []
    _packed([_gguf_tensor("Q4_1")], "q4f32_1", rerounded)
    assert rerounded == ["w"]


def test_columns_must_fill_whole_groups() -> None:
    tensor = SourceTensor(name="odd", shape=(2, 40), kind="F32", data=np.ones((2, 40), "float32"))
    with pytest.raises(ValueError, match="odd: 40 columns"):
        _packed([tensor], "q4f32_1")
