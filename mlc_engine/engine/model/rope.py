"""RoPE for the CPU: q and k rotated, v copied out of the fused qkv, in place of TVM's kernel.

TVM's `llama_rope_with_position_map` works out a power, a cosine and a sine for every element of
every head. The angle depends only on the token and the dimension, so this kernel works them out
once per (token, dimension), into a small table, and rotates every head of the token with it:
for SmolLM2's 15 heads that is a fifteenth of the calls into libm, which had been about 0.5 ms of
a 7 ms decode step. The angles are TVM's own expressions (`switch_rope_freq_func`, so llama3 and
YaRN scaling come with them) and the rotation is TVM's arithmetic, so the results are the same.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func
from tvm.script import tirx as T


def rope_cpu(
    theta: float,
    scale: float,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
    dtype: str,
    rope_scaling: dict[str, Any],
) -> tirx.PrimFunc:
    """A kernel with the arguments of `llama_rope_with_position_map`'s, for rotate-half RoPE
    over whole heads. `rope_scaling` as TVM's kernel gets it (YaRN's prepared by the cache)."""
    if rope_scaling.get("rope_type") in ("gptj", "longrope", "llama4"):
        raise ValueError(f"RoPE {rope_scaling['rope_type']!r} has no CPU kernel here")
    half = head_dim // 2
    frequency = switch_rope_freq_func(rope_scaling)

    def angle(position: tirx.PrimExpr, d: tirx.PrimExpr, sine: bool) -> tirx.PrimExpr:
        """cos or sin of dimension d's angle at `position`, as TVM's kernel computes it."""
        cos, sin, bindings = frequency(
            position * tirx.const(scale, "float32"), d, head_dim, theta, "float32"
        )
        value = sin if sine else cos
        for var, bound in bindings.items():
            value = tirx.Let(var, bound, value)
        return value

    def rotated(
        qkv: T.Buffer, cos: T.Buffer, sin: T.Buffer, s: tirx.PrimExpr, h: int, d: tirx.PrimExpr
    ) -> tirx.PrimExpr:
        partner = tirx.if_then_else(d < half, -qkv[s, h, d + half], qkv[s, h, d - half])
        return (
            cos[d] * qkv[s, h, d].astype("float32") + sin[d] * partner.astype("float32")
        ).astype(dtype)

    fused_heads = num_q_heads + 2 * num_kv_heads

    @T.prim_func(s_tir=True)
    def fused_rope_cpu(
        var_qkv: T.handle,
        var_position_map: T.handle,
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused_heads, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=T.int32())
        for s in T.parallel(seq_len):
            with T.sblock("rope"):
                T.reads()
                T.writes()
                cos = T.sblock_alloc_buffer((head_dim,), "float32")
                sin = T.sblock_alloc_buffer((head_dim,), "float32")
                for d in T.serial(head_dim):
                    cos[d] = angle(position_map[s], d, False)
                    sin[d] = angle(position_map[s], d, True)
                for h, d in T.grid(num_q_heads, head_dim):
                    q[s, h, d] = T.if_then_else(
                        apply_rope > 0, rotated(qkv, cos, sin, s, h, d), qkv[s, h, d]
                    )
                for h, d in T.grid(num_kv_heads, head_dim):
                    k[s, h, d] = T.if_then_else(
                        apply_rope > 0,
                        rotated(qkv, cos, sin, s, num_q_heads + h, d),
                        qkv[s, num_q_heads + h, d],
                    )
                for h, d in T.grid(num_kv_heads, head_dim):
                    v[s, h, d] = qkv[s, num_q_heads + num_kv_heads + h, d]

    return fused_rope_cpu
