"""Prompts, load levels, arrival times and the servers' turns of the serving benchmark."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from mlc_engine.bench.run import round_indices, turn_order
from mlc_engine.bench.workload import (
    DEFAULT_TEXT,
    LoadLevel,
    PromptSource,
    Workload,
    arrival_offsets,
    parse_levels,
)


def test_prompts_have_the_asked_length_and_differ_per_request() -> None:
    source = PromptSource.from_file(DEFAULT_TEXT)
    prompts = [source.prompt(i, 128) for i in range(64)]
    assert all(len(p.split()) == 128 for p in prompts)
    # No two begin alike, so a prefix cache cannot skip one's prefill after another.
    assert len({tuple(p.split()[:8]) for p in prompts}) == 64
    assert source.prompt(5, 128) == prompts[5]  # the same request is the same for every server


def test_a_run_id_makes_the_first_word() -> None:
    source = PromptSource("one two three four")  # request 1 starts at word 997 % 4 = 1
    assert source.prompt(1, 3) == "two three four"
    assert source.prompt(1, 3, "ab12") == "ab12/1 three four"


def test_prompts_longer_than_the_text_wrap_around() -> None:
    source = PromptSource("one two three")
    assert source.prompt(0, 7) == "one two three one two three one"
    with pytest.raises(ValueError):
        PromptSource("  \n ")


def test_levels_are_parsed_from_lists() -> None:
    assert parse_levels("1,4,16", None) == [LoadLevel(concurrency=c) for c in (1, 4, 16)]
    assert [lv.label for lv in parse_levels(None, "0.5,2")] == ["rate=0.5/s", "rate=2/s"]
    for bad in (("1", "2"), (None, None), ("0", None), (None, "-1")):
        with pytest.raises(ValueError):
            parse_levels(*bad)


def test_closed_loop_sends_everything_at_once() -> None:
    assert arrival_offsets(LoadLevel(concurrency=4), 3, random.Random(0)) == [0.0, 0.0, 0.0]


def test_poisson_arrivals_have_the_asked_rate_and_repeat_with_the_seed() -> None:
    level = LoadLevel(rate=4.0)
    offsets = arrival_offsets(level, 4000, random.Random("seed"))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    assert statistics.fmean(gaps) == pytest.approx(1 / 4.0, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.stdev(gaps) == pytest.approx(1 / 4.0, rel=0.1)
    assert arrival_offsets(level, 4000, random.Random("seed")) == offsets


def test_rounds_split_the_requests_and_alternate_the_servers() -> None:
    assert round_indices(7, 2) == [range(0, 3), range(3, 7)]
    assert round_indices(1, 3) == [range(0, 1)]  # no empty rounds
    assert [turn_order(2, r) for r in range(3)] == [[0, 1], [1, 0], [0, 1]]
    assert turn_order(1, 1) == [0]


def test_workload_rejects_what_it_cannot_run() -> None:
    Workload("chat", 8, 8, 4, 10.0)
    for bad in (
        dict(endpoint="embeddings"),
        dict(input_words=0),
        dict(num_requests=0),
        dict(max_seconds=0.0),
    ):
        args = dict(
            endpoint="chat", input_words=8, output_tokens=8, num_requests=4, max_seconds=1.0
        )
        with pytest.raises(ValueError):
            Workload(**{**args, **bad})


def test_each_scenario_sends_its_own_conversations() -> None:
    source = PromptSource.from_file(DEFAULT_TEXT)
    single = Workload("chat", 16, 8, 4, 10.0).conversation(source, 2, "ab12")
    assert single.system == "" and single.turns == (source.prompt(2, 16, "ab12"),)

    chat = Workload("chat", 16, 8, 4, 10.0, scenario="multi-turn", turns=3)
    turns = [chat.conversation(source, i, "ab12").turns for i in range(4)]
    assert all(len(t) == 3 for t in turns)
    # No user message is sent twice in a run, nor shares its first words with another.
    assert len({message.split()[0] for t in turns for message in t}) == 12

    shared = Workload("chat", 16, 8, 4, 10.0, scenario="shared-prefix", system_words=800)
    conversations = [shared.conversation(source, i, "ab12") for i in range(4)]
    assert len({c.system for c in conversations}) == 1
    assert len(conversations[0].system.split()) == 800
    assert len({c.turns for c in conversations}) == 4

    mixed = Workload("chat", 16, 8, 8, 10.0, scenario="mixed", long_words=300, long_every=4)
    conversations = [mixed.conversation(source, i, "ab12") for i in range(8)]
    assert [c.long for c in conversations] == [False, False, False, True] * 2
    assert [len(c.turns[0].split()) for c in conversations[2:4]] == [16, 300]


@pytest.mark.parametrize(
    "fields",
    [
        {"scenario": "chatty"},
        {"scenario": "multi-turn", "turns": 1},
        {"scenario": "multi-turn", "turns": 3, "endpoint": "completions"},
        {"turns": 2},
        {"scenario": "shared-prefix"},
        {"system_words": 10},
        {"scenario": "mixed", "long_words": 300},
        {"long_words": 300, "long_every": 4},
    ],
)
def test_workloads_that_do_not_add_up_are_refused(fields: dict) -> None:
    arguments = {"endpoint": "chat", **fields}
    with pytest.raises(ValueError):
        Workload(input_words=16, output_tokens=8, num_requests=4, max_seconds=10, **arguments)
