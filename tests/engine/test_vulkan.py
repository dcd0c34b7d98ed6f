"""The model compiled for Vulkan, against the NumPy reference and batched against alone.

They run where this TVM generates Vulkan code and the machine has a Vulkan device (Mesa's
lavapipe counts: it runs Vulkan on the CPU), and skip elsewhere, naming which is missing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import VULKAN, requires_vulkan
from test_model import (
    _check_against_reference,
    _relative_error,
    batch_and_alone,
    dequantized_hf_weights,
)

from mlc_engine.common.device import tvm_target

pytestmark = requires_vulkan


def test_vulkan_target_is_read_from_the_device() -> None:
    target = tvm_target(VULKAN)
    assert target.kind.name == "vulkan"
    assert target.host is not None and target.host.kind.name == "llvm"
    assert int(target.attrs["max_num_threads"]) > 0


@pytest.mark.parametrize(
    ("quantization", "tolerance"),
    # float32 throughout; 4-bit weights with the float16 cache; float16 compute.
    [("q0f32", 1e-4), ("q4f32_1", 1e-3), ("q4f16_1", 2e-2)],
)
def test_vulkan_logits_match_the_numpy_reference(
    tiny_model: Callable, quantization: str, tolerance: float
) -> None:
    model = tiny_model(quantization, device=VULKAN)
    weights = dequantized_hf_weights(model.folder, model.config)
    _check_against_reference(model, weights, tolerance, quantization, device=VULKAN)


def test_vulkan_batched_prefill_and_decode_equal_each_sequence_alone(
    tiny_model: Callable,
) -> None:
    runtime = tiny_model("q4f32_1", device=VULKAN).runtime
    for in_batch, by_itself in batch_and_alone(runtime):
        # A batch runs other kernels than one sequence (matmul, not matrix-vector, schedules)
        # that add in another order: equal up to float32 rounding.
        assert _relative_error(in_batch, by_itself) < 1e-4
