"""mlc-chat-config.json's `sampling`: optional in old folders, checked when edited by hand."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mlc_engine.common.config import CONFIG_FILE, ModelConfig

CONFIG = ModelConfig(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    context_window_size=512,
)


def write_config(folder: Path, **changes: object) -> Path:
    """A config file as saved, with `changes` applied (None: the key left out)."""
    data = {**dataclasses.asdict(CONFIG), **changes}
    data = {key: value for key, value in data.items() if value is not None}
    (folder / CONFIG_FILE).write_text(json.dumps(data))
    return folder


def test_a_folder_from_before_sampling_defaults_loads_with_none(tmp_path: Path) -> None:
    config = ModelConfig.load(write_config(tmp_path, sampling=None))
    assert config.sampling == {}
    assert config.architecture_key() == CONFIG.architecture_key()


def test_hand_edited_sampling_is_read_with_each_fields_type(tmp_path: Path) -> None:
    edited = {"temperature": 1, "top_k": 40.0, "min_p": 0.05, "repetition_penalty": 1.1}
    config = ModelConfig.load(write_config(tmp_path, sampling=edited))
    assert config.sampling == edited
    assert isinstance(config.sampling["temperature"], float)
    assert isinstance(config.sampling["top_k"], int)


def test_sampling_is_not_part_of_the_architecture() -> None:
    edited = dataclasses.replace(CONFIG, sampling={"temperature": 0.2})
    assert edited.architecture_key() == CONFIG.architecture_key()


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"temperature": 3}, "sampling.temperature must be between 0 and 2"),
        ({"top_p": 0}, "sampling.top_p must be in (0, 1]"),
        ({"top_k": 2.5}, "sampling.top_k must be an integer"),
        ({"temperature": "low"}, "sampling.temperature must be a number"),
        ({"temprature": 0.2}, "sampling.temprature is not one of temperature, top_p"),
        ([0.2], "sampling must be an object"),
    ],
)
def test_bad_hand_edits_are_named_with_the_file(
    tmp_path: Path, sampling: object, message: str
) -> None:
    with pytest.raises(ValueError) as error:
        ModelConfig.load(write_config(tmp_path, sampling=sampling))
    assert str(error.value).startswith(f"{tmp_path / CONFIG_FILE}: {message}")
