"""TVM names that differ between the builds this project runs on, imported from here only.

The pinned PyPI wheel (apache-tvm 0.27.0.post1) and a TVM built from apache/tvm's source for
Vulkan (`scripts/build-tvm.sh`; its newest reachable commit reports 0.27.devN and predates the
wheel) spell a few things differently: the wheel has `tvm.sym.Analyzer`,
`tvm.s_tir.SBlock`/`SBlockRealize`, `tvm.ir.StringImm` and `BufferRegion.source` where the
source has `tvm.arith.Analyzer`, `tvm.tirx.SBlock`/`SBlockRealize`, `tvm.relax.StringImm` and
`BufferRegion.buffer`.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx

Analyzer = tvm.sym.Analyzer if hasattr(tvm, "sym") else tvm.arith.Analyzer

SBlock = getattr(s_tir, "SBlock", None) or tirx.SBlock
SBlockRealize = getattr(s_tir, "SBlockRealize", None) or tirx.SBlockRealize
StringImm = getattr(tvm.ir, "StringImm", None) or relax.StringImm
# The node class of a buffer load (the wheel's `tirx.BufferLoad` is a function making one).
BufferLoad = getattr(tvm.ir.expr, "TensorLoad", None) or tirx.BufferLoad


def region_buffer(region: tirx.BufferRegion) -> tirx.Buffer:
    """The buffer a block's read or write region is of."""
    return region.source if hasattr(region, "source") else region.buffer
