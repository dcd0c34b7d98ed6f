"""Linear and embedding layers whose weights are plain floats or packed 4- or 8-bit groups.

Matmuls are written as one reduction that reads the weight (dequantizing 4-bit codes in place),
not as dequantize + transpose + matmul: the float weight is never materialized, and each matmul
is a single block for the CPU schedule to work on.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import te, tirx, topi
from tvm.relax.frontend import nn

from mlc_engine.engine.quantization import (
    CODES_PER_WORD,
    FLOAT,
    FORMATS,
    GROUP_SIZE,
    Quantization,
    blocked_shape,
    codes_per_word,
    group_size,
    has_minimum,
    packed_name,
)

# Block names the CPU schedule looks for.
MATMUL_BLOCK = "NT_matmul"
DEQUANTIZE_BLOCK = "dequantize"


def _q4_value(
    weight: te.Tensor,
    scale: te.Tensor,
    minimum: te.Tensor | None,
    row: tirx.PrimExpr,
    k: tirx.PrimExpr,
) -> tirx.PrimExpr:
    """Element [row, k] of a packed 4-bit matrix (row by row, or in blocks of rows)."""
    word = _at(weight, row, k // CODES_PER_WORD)
    shift = ((k % CODES_PER_WORD) * 4).astype("uint32")
    code = ((word >> shift) & tirx.const(0xF, "uint32")).astype(scale.dtype)
    group = k // GROUP_SIZE
    if minimum is None:
        return _at(scale, row, group) * (code - tirx.const(8, scale.dtype))
    return _at(scale, row, group) * code + _at(minimum, row, group)


def _q8_value(
    weight: te.Tensor,
    scale: te.Tensor,
    minimum: te.Tensor | None,
    group: int,
    row: tirx.PrimExpr,
    k: tirx.PrimExpr,
) -> tirx.PrimExpr:
    """Element [row, k] of a packed 8-bit matrix: byte k % 4 of its word, sign-extended, in
    groups of `group`."""
    word = _at(weight, row, k // 4)
    # The byte shifted down and truncated to int8, which takes its sign. (Shifting it up to the
    # top with `(3 - k % 4) * 8` made CUDA's lowering fold a negative uint32 constant.)
    byte = (word >> ((k % 4) * 8).astype("uint32")) & tirx.const(0xFF, "uint32")
    value = _at(scale, row, k // group) * byte.astype("int8").astype(scale.dtype)
    return value if minimum is None else value + _at(minimum, row, k // group)


def _at(array: te.Tensor, row: tirx.PrimExpr, column: tirx.PrimExpr) -> tirx.PrimExpr:
    """Element [row, column] of a 4-bit matrix's array, kept [rows, width] or in blocks of rows
    [rows / block, width, block] (see `quantization.blocked_shape`)."""
    if len(array.shape) == 2:
        return array[row, column]
    block = array.shape[2]
    return array[row // block, column, row % block]


class QuantizedWeight(nn.Module):
    """A [rows, cols] weight matrix stored as packed 4- or 8-bit codes with per-group scales
    (and minimums, for storages with them)."""

    def __init__(self, rows: int, cols: int, storage: str, quant: Quantization) -> None:
        self.storage = storage
        words = blocked_shape((rows, cols // codes_per_word(storage)), quant.column_block)
        groups = blocked_shape((rows, cols // group_size(storage)), quant.column_block)
        self.q_weight = nn.Parameter(words, "uint32")
        self.q_scale = nn.Parameter(groups, quant.dtype)
        self.q_min = nn.Parameter(groups, quant.dtype) if has_minimum(storage) else None

    def tensors(self) -> list[nn.Tensor]:
        return [self.q_weight, self.q_scale] + ([self.q_min] if self.q_min is not None else [])


def _value_reader(
    w: te.Tensor, q: tuple[te.Tensor, ...], storage: str
) -> Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]:
    """(row, k) -> weight element, for a weight stored as `storage` (q = scale[, minimum] of a
    quantized one)."""
    if storage == FLOAT:
        return lambda row, k: w[row, k]
    minimum = q[1] if has_minimum(storage) else None
    if FORMATS[storage].bits == 8:
        group = group_size(storage)
        return lambda row, k: _q8_value(w, q[0], minimum, group, row, k)
    return lambda row, k: _q4_value(w, q[0], minimum, row, k)


def _weight_args(weight: QuantizedWeight | nn.Tensor) -> tuple[list[nn.Tensor], str]:
    """The weight's tensors, and its storage."""
    if isinstance(weight, QuantizedWeight):
        return weight.tensors(), weight.storage
    return [weight], FLOAT


def matmul_nt(x: nn.Tensor, weight: QuantizedWeight | nn.Tensor, out_dtype: str) -> nn.Tensor:
    """`x @ W.T` for W of shape [N, K] (float or quantized).

    Two blocks: `dequantize` (W as floats, a plain copy for float weights) and the `NT_matmul`
    reduction. The CPU schedule inlines the first into the second for few rows, and stages
    tiles of it for many (see `schedule.py`)."""

    tensors, storage = _weight_args(weight)

    def compute(x: te.Tensor, w: te.Tensor, *q: te.Tensor) -> te.Tensor:
        cols = x.shape[-1]
        read = _value_reader(w, q, storage)
        rows = w.shape[0] * w.shape[2] if len(w.shape) == 3 else w.shape[0]
        weight = te.compute(
            (rows, cols), lambda n, k: read(n, k).astype(out_dtype), name=DEQUANTIZE_BLOCK
        )
        k = te.reduce_axis((0, cols), name="k")
        return te.compute(
            (*x.shape[:-1], rows),
            lambda *i: te.sum(x[(*i[:-1], k)].astype(out_dtype) * weight[i[-1], k], axis=k),
            name=MATMUL_BLOCK,
        )

    return nn.op.tensor_expr_op(compute, MATMUL_BLOCK, [x, *tensors])


def take_rows(weight: QuantizedWeight | nn.Tensor, ids: nn.Tensor, cols: int) -> nn.Tensor:
    """Rows `ids` of W as floats (an embedding lookup)."""
    tensors, storage = _weight_args(weight)

    def compute(index: te.Tensor, w: te.Tensor, *q: te.Tensor) -> te.Tensor:
        read = _value_reader(w, q, storage)
        dtype = q[0].dtype if q else w.dtype
        return te.compute(
            (index.shape[0], cols), lambda n, k: read(index[n], k).astype(dtype), name="take"
        )

    return nn.op.tensor_expr_op(compute, "take", [ids, *tensors])


class Linear(nn.Module):
    """`y = x @ W.T (+ b)` with W stored as `storage` (`quantization.STORAGES`), laid out
    [out_features, in_features]. Its parameters are `weight` for floats, else `q4.*` or `q8.*`."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, quant: Quantization, storage: str
    ):
        self.dtype = quant.dtype
        self.storage = storage
        if storage == FLOAT:
            self.weight = nn.Parameter((out_features, in_features), quant.dtype)
        else:
            # The attribute's name is the parameters' prefix in the model folder.
            packed = QuantizedWeight(out_features, in_features, storage, quant)
            setattr(self, packed_name(storage), packed)
        self.bias = nn.Parameter((out_features,), quant.dtype) if bias else None

    def _weight(self) -> QuantizedWeight | nn.Tensor:
        if self.storage == FLOAT:
            return self.weight
        return getattr(self, packed_name(self.storage))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = matmul_nt(x, self._weight(), self.dtype)
        return y + self.bias if self.bias is not None else y


class Embedding(Linear):
    """Token embedding table [vocab, hidden], usable as the tied lm_head too."""

    def __init__(self, vocab_size: int, hidden_size: int, quant: Quantization, storage: str):
        super().__init__(hidden_size, vocab_size, False, quant, storage)
        self.hidden_size = hidden_size

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        return take_rows(self._weight(), ids, self.hidden_size)

    def lm_head(self, x: nn.Tensor) -> nn.Tensor:
        return matmul_nt(x, self._weight(), "float32")


def swiglu(gate_up: nn.Tensor) -> nn.Tensor:
    """silu(gate) * up, for `gate_up` holding gate and up side by side on its last axis.

    In float32 the sigmoid takes TVM's polynomial exp (`fast_exp`, within 1.1e-6 of exp, measured
    over [-30, 30]), which vectorizes where libm's expf is one call per element."""

    def compute(x: te.Tensor) -> te.Tensor:
        *lead, width = x.shape
        size = width // 2
        negated = te.compute((*lead, size), lambda *i: -x[i], name="negated_gate")
        exp = topi.fast_exp(negated) if x.dtype == "float32" else topi.exp(negated)
        one = tirx.const(1, x.dtype)
        return te.compute(
            (*lead, size),
            lambda *i: x[i] / (one + exp[i]) * x[(*i[:-1], i[-1] + size)],
            name="swiglu",
        )

    return nn.op.tensor_expr_op(compute, "swiglu", [gate_up])
