"""Device strings such as `cpu`, `cuda:1` or `auto`: parsing, availability and TVM targets.

`parse_device` only reads the string, so the frontend can validate `--device` without TVM;
`resolve_device`, `tvm_device` and `tvm_target` ask TVM what this machine and this build can do.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

from mlc_engine.common.errors import DeviceError

if TYPE_CHECKING:
    import tvm

GPU_KINDS = ("cuda", "rocm", "metal", "vulkan", "opencl")
KINDS = ("cpu", *GPU_KINDS)
# `auto` takes the first kind in this order that the TVM build supports and the machine has.
AUTO_ORDER = (*GPU_KINDS, "cpu")

_ALIASES = {"llvm": "cpu"}
_PATTERN = re.compile(r"([a-z]+)(?::(\d+))?")
_DISPLAY_NAMES = {
    "cuda": "CUDA",
    "rocm": "ROCm",
    "metal": "Metal",
    "vulkan": "Vulkan",
    "opencl": "OpenCL",
}
_CUDA_DEFAULT_ARCH = "sm_80"


@dataclasses.dataclass(frozen=True)
class Device:
    """A device kind (`cpu`, `cuda`, ..., or `auto` before resolution) and its index."""

    kind: str
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "auto") or self.index < 0:
            raise DeviceError(f"unknown device kind or index: {self.kind!r}, {self.index}")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"


def parse_device(text: str) -> Device:
    """Read `kind[:index]`; `llvm` means `cpu`. Raises DeviceError for anything else."""
    match = _PATTERN.fullmatch(text.strip().lower())
    if match is None or _ALIASES.get(match[1], match[1]) not in (*KINDS, "auto"):
        expected = ", ".join(f"{kind}[:N]" for kind in GPU_KINDS)
        raise DeviceError(f"unknown device '{text}': expected cpu, auto or one of {expected}")
    kind = _ALIASES.get(match[1], match[1])
    index = int(match[2] or 0)
    if kind == "cpu" and index != 0:
        raise DeviceError(f"unknown device '{text}': the CPU is always 'cpu' (index 0)")
    return Device(kind, index)


def resolve_device(device: Device) -> Device:
    """Return `device` if it can be used here (`auto` picks a kind), else raise DeviceError.

    `auto` passes over a Vulkan device that is the CPU itself (Mesa's lavapipe): it runs the
    same cores as the CPU kernels, several times slower. Ask for `vulkan` to use one."""
    if device.kind == "auto":
        candidates = (Device(kind, device.index if kind != "cpu" else 0) for kind in AUTO_ORDER)
        # The CPU is always available, so this always finds one.
        return next(
            c for c in candidates if _unavailable_reason(c) is None and not _is_software_gpu(c)
        )
    reason = _unavailable_reason(device)
    if reason is not None:
        raise DeviceError(f"device '{device.name}' is not available: {reason}")
    return device


def tvm_device(device: Device) -> tvm.runtime.Device:
    """The TVM runtime device to allocate tensors and run the model on."""
    import tvm

    device = resolve_device(device)
    return tvm.runtime.device(device.kind, device.index)


def tvm_target(device: Device, num_threads: int | None = None) -> tvm.target.Target:
    """The TVM compile target for `device`, tuned to this host's CPU (and GPU, when present).

    The GPU targets do not need the GPU itself, so a model library can be built on a machine
    without one; they do need a TVM build that can generate code for that kind.
    """
    import tvm

    if device.kind == "auto":
        device = resolve_device(device)
    host = _host_llvm_target(num_threads)
    if device.kind == "cpu":
        return tvm.target.Target(host)
    if tvm.get_global_func(f"target.build.{device.kind}", allow_missing=True) is None:
        raise DeviceError(
            f"cannot compile for '{device.name}': this TVM build has no "
            f"{_DISPLAY_NAMES[device.kind]} code generator (target.build.{device.kind})"
        )
    if device.kind == "cuda":
        return tvm.target.Target(_cuda_target(device), host=host)
    if device.kind == "vulkan":
        return tvm.target.Target(_vulkan_target(device), host=host)
    return tvm.target.Target({"kind": device.kind}, host=host)


def _unavailable_reason(device: Device) -> str | None:
    """Why `device` cannot be used on this machine, or None when it can."""
    import tvm

    if device.kind == "cpu":
        return None
    display = _DISPLAY_NAMES[device.kind]
    flag = f"USE_{device.kind.upper()}"
    value = str(tvm.support.libinfo().get(flag, "OFF"))
    built_with = value.upper() not in ("", "OFF", "NOT-FOUND", "NOTFOUND", "FALSE", "0")
    # A wheel built from source (scripts/build-tvm.sh) reports USE_VULKAN=OFF in libinfo with
    # Vulkan built in: its loaded runtime says so instead.
    if not built_with and not tvm.runtime.enabled(device.kind):
        return f"this TVM build has no {display} support ({flag}={value})"
    if not _device_exists(device):
        where = "" if device.index == 0 else f" with index {device.index}"
        hint = ""
        if not tvm.runtime.enabled(device.kind):
            hint = f" (TVM's {display} runtime did not load: is the driver installed?)"
        return f"no {display} device found{where}{hint}"
    return None


def _device_exists(device: Device) -> bool:
    import tvm

    # A CUDA-enabled TVM on a machine without the driver raises instead of answering False.
    try:
        return bool(tvm.runtime.device(device.kind, device.index).exist)
    except Exception:
        return False


def _is_software_gpu(device: Device) -> bool:
    """Whether `device` is a Vulkan driver that computes on the CPU (its device type `cpu`)."""
    return device.kind == "vulkan" and _vulkan_property(device, "device_type") == "cpu"


def _vulkan_property(device: Device, name: str) -> object:
    import tvm

    query = tvm.get_global_func("device_api.vulkan.get_target_property")
    return query(tvm.runtime.device("vulkan", device.index), name)


def _host_llvm_target(num_threads: int | None) -> dict[str, Any]:
    """The LLVM target for this host: its CPU name plus the features it really has.

    `mcpu` alone implies the features of that CPU model, but a VM or container may hide some
    (AVX-512 is the usual one), so `mattr` corrects the difference, as `-march=native` does.
    """
    import tvm
    from tvm.target import codegen

    mcpu = codegen.llvm_get_system_cpu()
    mtriple = codegen.llvm_get_system_triple()
    target: dict[str, Any] = {
        "kind": "llvm",
        "mcpu": mcpu,
        "mtriple": mtriple,
        "num-cores": num_threads or _available_cores(),
    }
    host_features = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures", allow_missing=True)
    if host_features is not None:
        has = {str(name): bool(on) for name, on in dict(host_features()).items()}
        implied = codegen.llvm_get_cpu_features(
            tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": mtriple})
        )
        added = [f"+{name}" for name, on in sorted(has.items()) if on and name not in implied]
        removed = [f"-{name}" for name, on in sorted(has.items()) if not on and name in implied]
        if added or removed:
            target["mattr"] = added + removed
    return target


def _cuda_target(device: Device) -> dict[str, Any]:
    """The CUDA target, read from the GPU when there is one, else for an sm_80 (A100) class GPU."""
    import tvm

    if not _device_exists(device):
        return {
            "kind": "cuda",
            "arch": _CUDA_DEFAULT_ARCH,
            "max_shared_memory_per_block": 49152,
            "max_threads_per_block": 1024,
            "thread_warp_size": 32,
        }
    gpu = tvm.runtime.device("cuda", device.index)
    return {
        "kind": "cuda",
        "arch": "sm_" + str(gpu.compute_version).replace(".", ""),
        "max_shared_memory_per_block": int(gpu.max_shared_memory_per_block),
        "max_threads_per_block": int(gpu.max_threads_per_block),
        "thread_warp_size": int(gpu.warp_size),
    }


def _vulkan_target(device: Device) -> dict[str, Any]:
    """The Vulkan target, read from the device when there is one (TVM queries its limits and
    features), else for a GPU with 16-bit floats and storage, 64-bit integers and no subgroup
    operations."""
    if _device_exists(device):
        return {"kind": "vulkan", "from_device": device.index}
    return {
        "kind": "vulkan",
        "max_threads_per_block": 256,
        "max_num_threads": 256,
        "max_shared_memory_per_block": 32768,
        "thread_warp_size": 1,
        "supports_float16": True,
        "supports_int8": True,
        "supports_int16": True,
        "supports_int64": True,
        "supports_8bit_buffer": True,
        "supports_16bit_buffer": True,
        "supports_storage_buffer_storage_class": True,
    }


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
