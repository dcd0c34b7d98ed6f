"""The sampling a checkpoint's authors recommend, recorded in the model folder at conversion.

A Hugging Face folder's generation_config.json says it when it speaks of sampling at all; else
(and always for GGUF files, which carry no such thing) the recommendation on the model card of
the checkpoint's family applies. With neither, nothing is recorded and requests get the engine's
neutral values.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from mlc_engine.common.config import SAMPLING_FIELDS, checked_sampling

log = logging.getLogger(__name__)

# Model-card recommendations by family. A checkpoint belongs to a family when one of its names
# starts with the family's name (comparing letters and digits only, in any case).
FAMILIES: dict[str, dict[str, float]] = {
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, "How to use": model.generate(inputs,
    # max_new_tokens=50, temperature=0.2, top_p=0.9, do_sample=True). Its generation_config.json
    # has no sampling, and its GGUF none at all.
    "SmolLM2": {"temperature": 0.2, "top_p": 0.9},
}


def recommended_sampling(generation: dict[str, Any], names: list[str]) -> dict[str, float]:
    """The defaults from `generation` (generation_config.json's contents) when it speaks of
    sampling, else those of the family one of `names` (the checkpoint's names) belongs to."""
    stated = _from_generation_config(generation)
    if stated is not None:
        return stated
    keys = [_letters(name) for name in names]
    for family, values in FAMILIES.items():
        if any(key.startswith(_letters(family)) for key in keys):
            return dict(values)
    return {}


def _from_generation_config(generation: dict[str, Any]) -> dict[str, float] | None:
    """What transformers' `generate` does with the file, or None when it says nothing of sampling.

    `do_sample: true` samples with the values the file gives (transformers' own defaults for the
    rest, such as top_k 50, are the library's choice, not the authors', and are not recorded).
    `do_sample: false` decodes greedily: temperature 0, keeping repetition_penalty, which applies
    to greedy decoding too. Values without `do_sample` are taken as given: transformers would
    decode greedily and warn that they go unused, so they say what the authors meant (vLLM reads
    them the same way).
    """
    given = {name: generation.get(name) for name in SAMPLING_FIELDS}
    values = {name: value for name, value in given.items() if value is not None}
    do_sample = generation.get("do_sample")
    if do_sample is None and not values:
        return None
    if do_sample is False:
        penalty = {k: v for k, v in values.items() if k == "repetition_penalty"}
        values = {"temperature": 0.0, **penalty}
    usable = {}
    for name, value in values.items():
        try:
            usable.update(checked_sampling({name: value}))
        except ValueError as error:
            log.warning("generation_config.json: %s; not recorded", error)
    return usable


def _letters(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())
