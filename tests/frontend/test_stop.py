"""Stop strings in streamed text, against the answer computed on the whole text."""

from __future__ import annotations

import pytest

from mlc_engine.frontend.text.stop import StopStringMatcher

TEXT = "The answer is 42.\nUser: and then?\n###\nmore"


def streamed(text: str, stops: list[str], cuts: list[int]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = ""
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        out += matcher.push(text[start:end])
    return out + matcher.flush(), matcher.stopped


def whole(text: str, stops: list[str]) -> tuple[str, bool]:
    found = [text.index(stop) for stop in stops if stop in text]
    return (text[: min(found)], True) if found else (text, False)


@pytest.mark.parametrize(
    "stops", [["User:"], ["###", "\nUser"], ["nothing here"], ["42.\nU"], ["e"], []]
)
def test_any_split_gives_the_whole_texts_answer(stops: list[str]) -> None:
    for cut in range(1, len(TEXT)):
        assert streamed(TEXT, stops, [cut]) == whole(TEXT, stops)
    assert streamed(TEXT, stops, list(range(1, len(TEXT)))) == whole(TEXT, stops)


def test_no_part_of_a_stop_string_is_sent_before_it_is_ruled_out() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.push("text </e") == "text "
    assert matcher.push("nd") == ""
    assert matcher.push("x") == "</endx"
    assert matcher.push("</end> more") == "" and matcher.stopped
