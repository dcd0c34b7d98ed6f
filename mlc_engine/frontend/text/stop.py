"""Stop strings in streamed text: emit what cannot be the start of one, hold back what can."""

from __future__ import annotations


class StopStringMatcher:
    """Feed text as it is generated; get back what is safe to send and whether a stop string
    ended the text (the stop string itself is never sent)."""

    def __init__(self, stops: list[str]):
        self.stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that can be sent now."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        pending = self._held + text
        found = [(pending.find(stop), stop) for stop in self.stops if stop in pending]
        if found:
            self.stopped = True
            self._held = ""
            return pending[: min(found)[0]]
        hold = self._longest_partial_stop(pending)
        self._held = pending[len(pending) - hold :] if hold else ""
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """Text held back at the end of generation (it was not a stop string after all)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-length:]):
                    longest = length
                    break
        return longest
