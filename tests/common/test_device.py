import pytest
import tvm
from conftest import requires_cuda_codegen, requires_vulkan_codegen
from tvm.target import codegen

from mlc_engine.common.device import (
    Device,
    parse_device,
    resolve_device,
    tvm_device,
    tvm_target,
)
from mlc_engine.common.errors import DeviceError


def _has_gpu(kind: str) -> bool:
    try:
        return bool(tvm.runtime.device(kind, 0).exist)
    except Exception:
        return False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpu", Device("cpu", 0)),
        ("llvm", Device("cpu", 0)),
        ("auto", Device("auto", 0)),
        ("cuda", Device("cuda", 0)),
        ("cuda:1", Device("cuda", 1)),
        ("vulkan:2", Device("vulkan", 2)),
        ("metal", Device("metal", 0)),
        ("rocm:0", Device("rocm", 0)),
        ("opencl:3", Device("opencl", 3)),
        (" CUDA:0 ", Device("cuda", 0)),
    ],
)
def test_parse_device_reads_kind_and_index(text: str, expected: Device) -> None:
    assert parse_device(text) == expected


def test_device_name_is_kind_colon_index() -> None:
    assert parse_device("cuda").name == "cuda:0"
    assert parse_device("vulkan:1").name == "vulkan:1"


@pytest.mark.parametrize("text", ["", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "cpu:1"])
def test_parse_device_rejects_bad_strings_with_one_line(text: str) -> None:
    with pytest.raises(DeviceError) as info:
        parse_device(text)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_cpu_resolves_to_itself() -> None:
    assert resolve_device(parse_device("cpu")) == Device("cpu", 0)


def test_auto_picks_a_gpu_when_there_is_one_else_cpu() -> None:
    resolved = resolve_device(parse_device("auto"))
    if _has_gpu("cuda"):
        assert resolved == Device("cuda", 0)
    elif not any(_has_gpu(kind) for kind in ("rocm", "metal", "vulkan", "opencl")):
        assert resolved == Device("cpu", 0)


def test_auto_passes_over_a_vulkan_device_that_is_the_cpu() -> None:
    if not _has_gpu("vulkan") or _has_gpu("cuda"):
        pytest.skip("needs a Vulkan device and no CUDA GPU")
    query = tvm.get_global_func("device_api.vulkan.get_target_property")
    if str(query(tvm.runtime.device("vulkan", 0), "device_type")) != "cpu":
        pytest.skip("this machine's Vulkan device is a GPU")
    assert resolve_device(parse_device("auto")) == Device("cpu", 0)


@pytest.mark.parametrize(
    ("kind", "support"),
    [("vulkan", "Vulkan"), ("metal", "Metal"), ("rocm", "ROCm"), ("opencl", "OpenCL")],
)
def test_missing_gpu_support_is_named_in_the_error(kind: str, support: str) -> None:
    if _has_gpu(kind):
        pytest.skip(f"this machine has a {support} device")
    with pytest.raises(DeviceError, match=f"device '{kind}:0' is not available: .*{support}"):
        resolve_device(parse_device(kind))


def test_cuda_without_a_gpu_is_not_available() -> None:
    if _has_gpu("cuda"):
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(DeviceError, match="device 'cuda:0' is not available"):
        resolve_device(parse_device("cuda"))


def test_tvm_device_for_cpu_exists() -> None:
    assert tvm_device(parse_device("cpu")).exist


def test_cpu_target_is_this_host() -> None:
    target = tvm_target(parse_device("cpu"), num_threads=3)
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) == codegen.llvm_get_system_cpu()
    assert str(target.attrs["mtriple"]) == codegen.llvm_get_system_triple()
    assert int(target.attrs["num-cores"]) == 3


@requires_cuda_codegen
def test_cuda_target_builds_without_a_gpu() -> None:
    target = tvm_target(parse_device("cuda"))
    assert target.kind.name == "cuda"
    assert str(target.attrs["arch"]).startswith("sm_")
    assert target.host is not None
    assert target.host.kind.name == "llvm"


@requires_vulkan_codegen
def test_vulkan_target_without_the_device_assumes_a_plain_gpu() -> None:
    target = tvm_target(parse_device("vulkan:9"))  # an index no machine has
    assert target.kind.name == "vulkan"
    assert bool(target.attrs["supports_float16"]) and bool(target.attrs["supports_int64"])
    assert int(target.attrs["thread_warp_size"]) == 1


def test_target_for_a_kind_this_tvm_cannot_generate_names_the_missing_code_generator() -> None:
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        pytest.skip("this TVM build can generate Vulkan code")
    with pytest.raises(DeviceError, match="no Vulkan code generator"):
        tvm_target(parse_device("vulkan"))
