"""The runtime sizes TVM's thread pool to the cores it is given (a fresh process per case:
the pool is sized once per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CPU, LoadedModel

from mlc_engine.engine.models import prepare_library

PROBE = """
import sys, tvm
from pathlib import Path
from mlc_engine.engine.runtime import ModelRuntime
threads = int(sys.argv[3]) if len(sys.argv) > 3 else None
runtime = ModelRuntime(Path(sys.argv[1]), Path(sys.argv[2]), tvm.cpu(), threads)
kv = runtime.create_kv_cache(1, 64, 16)
kv.add_sequence(0)
runtime.prefill(kv, [0], [[1, 2, 3]])
print(tvm.get_global_func("runtime.NumThreads")())
"""


@pytest.mark.parametrize("asked", [None, 1])
def test_runtime_uses_every_core_unless_told_otherwise(
    smollm2: LoadedModel, asked: int | None
) -> None:
    library = prepare_library(smollm2.folder, CPU)
    args = [sys.executable, "-c", PROBE, str(library), str(smollm2.folder)]
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    result = subprocess.run(
        args + ([str(asked)] if asked else []), capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    expected = asked or len(os.sched_getaffinity(0))
    assert int(result.stdout.strip().splitlines()[-1]) == expected
