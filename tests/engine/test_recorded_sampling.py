"""Conversion records the sampling a checkpoint's authors recommend in mlc-chat-config.json:
generation_config.json's, else the model card's of its family, else nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import TINY_HF_CONFIG, TINY_VARIANTS, tiny_hf_weights
from safetensors.numpy import save_file

from mlc_engine.common.config import CONFIG_FILE, ModelConfig
from mlc_engine.engine.convert import convert


def converted_sampling(
    root: Path, folder_name: str, generation: dict | None = None, **hf_extra: object
) -> dict[str, float]:
    """Convert a tiny Hugging Face folder named `folder_name`; the sampling its model folder's
    mlc-chat-config.json records."""
    hf_folder = root / folder_name
    hf_folder.mkdir()
    hf_config = {**TINY_HF_CONFIG, **TINY_VARIANTS["llama"], **hf_extra}
    (hf_folder / "config.json").write_text(json.dumps(hf_config))
    if generation is not None:
        (hf_folder / "generation_config.json").write_text(json.dumps(generation))
    save_file(tiny_hf_weights("llama"), str(hf_folder / "model.safetensors"))
    output = root / "model"
    convert(hf_folder, "q0f32", output)
    recorded: dict[str, float] = json.loads((output / CONFIG_FILE).read_text())["sampling"]
    assert ModelConfig.load(output).sampling == recorded
    return recorded


# The folders are named like SmolLM2 so that these also show generation_config.json outranking
# the family's model card.
@pytest.mark.parametrize(
    ("generation", "recorded"),
    [
        (
            {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": None,
             "repetition_penalty": 1.05, "eos_token_id": 2},
            {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
        ),
        # transformers decodes greedily; its repetition penalty applies to greedy decoding too.
        (
            {"do_sample": False, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.1},
            {"temperature": 0.0, "repetition_penalty": 1.1},
        ),
        ({"do_sample": False}, {"temperature": 0.0}),
        # Values without do_sample say what the authors meant.
        ({"temperature": 0.6, "top_p": 0.9}, {"temperature": 0.6, "top_p": 0.9}),
        # do_sample alone: transformers' own defaults, which are the engine's neutral ones.
        ({"do_sample": True}, {}),
    ],
    ids=["do_sample", "greedy_keeps_penalty", "greedy", "values_only", "do_sample_only"],
)  # fmt: skip
def test_generation_config_sampling_is_recorded(
    tmp_path: Path, generation: dict, recorded: dict
) -> None:
    assert converted_sampling(tmp_path, "SmolLM2-360M-Instruct", generation) == recorded


def test_generation_values_the_engine_cannot_take_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    generation = {"do_sample": True, "temperature": 3.5, "top_p": 0.5}
    with caplog.at_level(logging.WARNING):
        assert converted_sampling(tmp_path, "tiny", generation) == {"top_p": 0.5}
    assert "sampling.temperature must be between 0 and 2" in caplog.text


@pytest.mark.parametrize(
    ("folder_name", "hf_extra"),
    [
        ("SmolLM2-135M-Instruct", {}),
        # A hub snapshot: the folder is a commit hash, config.json names the model.
        ("5a1b2c3d", {"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}),
    ],
)
def test_smollm2_without_generation_sampling_gets_its_model_cards(
    tmp_path: Path, folder_name: str, hf_extra: dict
) -> None:
    generation = {"bos_token_id": 1, "eos_token_id": 2}  # what SmolLM2's own file holds
    recorded = converted_sampling(tmp_path, folder_name, generation, **hf_extra)
    assert recorded == {"temperature": 0.2, "top_p": 0.9}


def test_an_unknown_model_records_no_defaults(tmp_path: Path) -> None:
    assert converted_sampling(tmp_path, "SmolLM-135M", {"eos_token_id": 2}) == {}
