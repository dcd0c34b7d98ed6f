"""Where model folders live, and how a `--model` name becomes one.

A model folder holds `mlc-chat-config.json`, the converted weights and the tokenizer. `--model`
is either a path to such a folder or its name with the quantization (for example
`SmolLM2-135M-Instruct-q4f32_1`), looked up in `model_search_paths()` in order.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlc_engine.common.config import CONFIG_FILE
from mlc_engine.common.errors import ModelNotFoundError

# The schemes of engine/quantization.py, repeated because common/ does not import engine/.
QUANTIZATION_NAMES = ("q0f32", "q0f16", "q4f32_1", "q4f16_1", "q4f32_m", "q4f16_m")


def cache_dir() -> Path:
    """mlc-engine's cache: `$MLC_ENGINE_CACHE`, else `$XDG_CACHE_HOME/mlc_engine` (~/.cache)."""
    override = os.environ.get("MLC_ENGINE_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlc_engine"


def model_search_paths() -> list[Path]:
    """The folders searched for a model name, first match wins."""
    paths = []
    home = os.environ.get("MLC_ENGINE_HOME")
    if home:
        paths.append(Path(home).expanduser())
    cwd = Path.cwd()
    paths += [cwd / "dist", cwd / "dist" / "prebuilt", cache_dir() / "models"]
    return paths


def resolve_model(name_or_path: str) -> Path:
    """The model folder for a path or a name; raises ModelNotFoundError when there is none."""
    given = Path(name_or_path).expanduser()
    if given.is_dir():
        if (given / CONFIG_FILE).is_file():
            return given
        raise ModelNotFoundError(
            f"'{name_or_path}' is a folder but not a model folder: it has no {CONFIG_FILE}"
        )
    searched = model_search_paths()
    for base in searched:
        candidate = base / name_or_path
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    where = ", ".join(str(path) for path in searched)
    raise ModelNotFoundError(
        f"model '{name_or_path}' not found: no folder of that name with {CONFIG_FILE} in {where}; "
        "make one with `mlc-engine convert` (see `mlc-engine convert --help`)"
    )


def split_model_name(name: str) -> tuple[str, str | None]:
    """Split a trailing `-<quantization>` off a model name: `X-q4f32_1` -> (`X`, `q4f32_1`)."""
    for quantization in QUANTIZATION_NAMES:
        suffix = f"-{quantization}"
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], quantization
    return name, None
