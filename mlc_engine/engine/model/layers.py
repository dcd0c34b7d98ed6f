"""Linear and embedding layers whose weights are plain floats or packed 4-bit groups.

The 4-bit layers dequantize inside the graph (`tensor_expr_op`), so after operator fusion the
dequantization runs inside the matmul and the float weight is never materialized.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn

from mlc_engine.engine.quantization import CODES_PER_WORD, GROUP_SIZE, Quantization


def _dequantize_te(
    weight: te.Tensor, scale: te.Tensor, minimum: te.Tensor | None, rows: tirx.PrimExpr, cols: int
) -> te.Tensor:
    dtype = scale.dtype

    def value(i: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        word = weight[i, k // CODES_PER_WORD]
        shift = ((k % CODES_PER_WORD) * 4).astype("uint32")
        code = ((word >> shift) & tirx.const(0xF, "uint32")).astype(dtype)
        group = k // GROUP_SIZE
        if minimum is None:
            return scale[i, group] * (code - tirx.const(8, dtype))
        return scale[i, group] * code + minimum[i, group]

    return te.compute((rows, cols), value, name="dequantize")


class Q4Weight(nn.Module):
    """A [rows, cols] weight matrix stored as packed 4-bit codes with per-group scales."""

    def __init__(self, rows: int | str, cols: int, quant: Quantization) -> None:
        self.rows = rows
        self.cols = cols
        self.q_weight = nn.Parameter((rows, cols // CODES_PER_WORD), "uint32")
        self.q_scale = nn.Parameter((rows, cols // GROUP_SIZE), quant.dtype)
        self.q_min = nn.Parameter((rows, cols // GROUP_SIZE), quant.dtype) if quant.has_minimum else None

    def dequantize(self) -> nn.Tensor:
        args = [self.q_weight, self.q_scale] + ([self.q_min] if self.q_min is not None else [])
        cols = self.cols

        def compute(weight: te.Tensor, scale: te.Tensor, *rest: te.Tensor) -> te.Tensor:
            return _dequantize_te(weight, scale, rest[0] if rest else None, weight.shape[0], cols)

        return nn.op.tensor_expr_op(compute, "dequantize", args)

    def take_rows(self, ids: nn.Tensor) -> nn.Tensor:
        """Dequantize only the rows `ids` (an embedding lookup)."""
        args = [self.q_weight, self.q_scale, ids]
        if self.q_min is not None:
            args.insert(2, self.q_min)
        cols = self.cols

        def compute(weight: te.Tensor, scale: te.Tensor, *rest: te.Tensor) -> te.Tensor:
            minimum, index = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])

            def value(n: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
                row = index[n]
                word = weight[row, k // CODES_PER_WORD]
                shift = ((k % CODES_PER_WORD) * 4).astype("uint32")
                code = ((word >> shift) & tirx.const(0xF, "uint32")).astype(scale.dtype)
                group = k // GROUP_SIZE
                if minimum is None:
                    return scale[row, group] * (code - tirx.const(8, scale.dtype))
                return scale[row, group] * code + minimum[row, group]

            return te.compute((index.shape[0], cols), value, name="take_dequantize")

        return nn.op.tensor_expr_op(compute, "take_dequantize", args)


class Linear(nn.Module):
    """`y = x @ W.T (+ b)` with W float or 4-bit, laid out [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, quant: Quantization):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = quant.dtype
        if quant.quantized:
            self.q4 = Q4Weight(out_features, in_features, quant)
        else:
            self.weight = nn.Parameter((out_features, in_features), quant.dtype)
        self.bias = nn.Parameter((out_features,), quant.dtype) if bias else None
        self.quantized = quant.quantized

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        weight = self.q4.dequantize() if self.quantized else self.weight
        y = nn.op.matmul(x, nn.op.permute_dims(weight), out_dtype=self.dtype)
        return y + self.bias if self.bias is not None else y


class Embedding(nn.Module):
    """Token embedding table, usable as the tied lm_head too."""

    def __init__(self, vocab_size: int, hidden_size: int, quant: Quantization):
        self.quantized = quant.quantized
        self.hidden_size = hidden_size
        if quant.quantized:
            self.q4 = Q4Weight(vocab_size, hidden_size, quant)
        else:
            self.weight = nn.Parameter((vocab_size, hidden_size), quant.dtype)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        if self.quantized:
            return self.q4.take_rows(ids)
        return nn.op.take(self.weight, ids, axis=0)

    def lm_head(self, x: nn.Tensor) -> nn.Tensor:
        weight = self.q4.dequantize() if self.quantized else self.weight
        return nn.op.matmul(x, nn.op.permute_dims(weight), out_dtype="float32")
