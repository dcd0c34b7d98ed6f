from pathlib import Path

import pytest

from mlc_engine.common.config import CONFIG_FILE
from mlc_engine.common.errors import MLCEngineError, ModelNotFoundError
from mlc_engine.common.model_paths import (
    QUANTIZATION_NAMES,
    cache_dir,
    model_search_paths,
    resolve_model,
    split_model_name,
)
from mlc_engine.engine.quantization import QUANTIZATIONS

NAME = "SmolLM2-135M-Instruct-q4f32_1"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in an empty folder with no mlc-engine variables and a private cache."""
    for variable in ("MLC_ENGINE_HOME", "MLC_ENGINE_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text("{}\n", encoding="utf-8")
    return path


def test_cache_dir_defaults_to_dot_cache(tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "home" / ".cache" / "mlc_engine"


def test_cache_dir_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "mlc_engine"


def test_mlc_engine_cache_overrides_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MLC_ENGINE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_search_paths_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    models = tmp_path / "home" / ".cache" / "mlc_engine" / "models"
    assert model_search_paths() == [work / "dist", work / "dist" / "prebuilt", models]
    monkeypatch.setenv("MLC_ENGINE_HOME", str(tmp_path / "engine-home"))
    assert model_search_paths() == [
        tmp_path / "engine-home",
        work / "dist",
        work / "dist" / "prebuilt",
        models,
    ]


def test_a_model_folder_path_is_used_as_is(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "anywhere" / "my-model")
    assert resolve_model(str(folder)) == folder


def test_a_folder_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=CONFIG_FILE):
        resolve_model(str(tmp_path / "empty"))


def test_a_name_is_found_in_dist(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "work" / "dist" / NAME)
    assert resolve_model(NAME) == folder


def test_a_name_is_found_in_the_user_cache(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "home" / ".cache" / "mlc_engine" / "models" / NAME)
    assert resolve_model(NAME) == folder


def test_mlc_engine_home_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _model_folder(tmp_path / "work" / "dist" / NAME)
    preferred = _model_folder(tmp_path / "engine-home" / NAME)
    monkeypatch.setenv("MLC_ENGINE_HOME", str(tmp_path / "engine-home"))
    assert resolve_model(NAME) == preferred


def test_a_folder_without_config_on_the_search_path_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "work" / "dist" / NAME).mkdir(parents=True)
    folder = _model_folder(tmp_path / "work" / "dist" / "prebuilt" / NAME)
    assert resolve_model(NAME) == folder


def test_a_missing_model_lists_the_paths_searched_and_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(NAME)
    message = str(info.value)
    assert isinstance(info.value, MLCEngineError)
    assert NAME in message
    assert str(tmp_path / "work" / "dist" / "prebuilt") in message
    assert str(tmp_path / "home" / ".cache" / "mlc_engine" / "models") in message
    assert "mlc-engine convert" in message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (NAME, ("SmolLM2-135M-Instruct", "q4f32_1")),
        ("Llama-2-7b-chat-hf-q4f16_1", ("Llama-2-7b-chat-hf", "q4f16_1")),
        ("Qwen2-0.5B-q0f16", ("Qwen2-0.5B", "q0f16")),
        ("tiny-q4f16_m", ("tiny", "q4f16_m")),
        ("SmolLM2-135M-Instruct", ("SmolLM2-135M-Instruct", None)),
        ("model-q4f32_2", ("model-q4f32_2", None)),
        ("q4f32_1", ("q4f32_1", None)),
    ],
)
def test_split_model_name_separates_only_a_known_quantization_suffix(
    name: str, expected: tuple[str, str | None]
) -> None:
    assert split_model_name(name) == expected


def test_split_model_name_knows_every_quantization_the_engine_has() -> None:
    assert set(QUANTIZATION_NAMES) == set(QUANTIZATIONS)
