"""Our CPU RoPE kernel against TVM's own, compiled side by side on the same inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

from mlc_engine.common.device import Device, tvm_target
from mlc_engine.engine.model.rope import rope_cpu

TARGET = tvm_target(Device("cpu"))
HEAD_DIM, Q_HEADS, KV_HEADS, THETA = 64, 6, 2, 10000.0
SCALINGS: list[dict[str, Any]] = [
    {},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "beta_fast": 32,
        "beta_slow": 1,
        "original_max_position_embeddings": 64,
        "inv_theta_log_scale": 1.0 / (2 * np.log(THETA)),
    },
]


def _run(kernel: tvm.tirx.PrimFunc, qkv: np.ndarray, positions: np.ndarray, apply: int) -> list:
    run = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), TARGET)
    device = tvm.cpu()
    tokens = qkv.shape[0]
    outs = [
        tvm.runtime.tensor(np.zeros((tokens, heads, HEAD_DIM), np.float32), device)
        for heads in (Q_HEADS, KV_HEADS, KV_HEADS)
    ]
    run["main"](
        tvm.runtime.tensor(qkv, device), tvm.runtime.tensor(positions, device), *outs, apply
    )
    return [out.numpy() for out in outs]


@pytest.mark.parametrize("scaling", SCALINGS, ids=["default", "llama3", "yarn"])
@pytest.mark.parametrize("apply", [1, 0])
def test_rope_matches_tvms_kernel(scaling: dict[str, Any], apply: int) -> None:
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((7, Q_HEADS + 2 * KV_HEADS, HEAD_DIM)).astype(np.float32)
    positions = np.array([0, 1, 5, 17, 63, 200, 1000], dtype=np.int32)
    theirs = llama_rope_with_position_map(
        THETA, 1.0, HEAD_DIM, Q_HEADS, KV_HEADS, "float32", scaling, HEAD_DIM
    )
    ours = rope_cpu(THETA, 1.0, HEAD_DIM, Q_HEADS, KV_HEADS, "float32", scaling)
    got, want = _run(ours, qkv, positions, apply), _run(theirs, qkv, positions, apply)
    for mine, tvms in zip(got, want, strict=True):
        np.testing.assert_allclose(mine, tvms, rtol=0, atol=1e-6)
    if not apply:  # q comes out of the fused tensor untouched
        np.testing.assert_array_equal(got[0], qkv[:, :Q_HEADS])
