"""What an engine step costs, learned from the steps the engine has run.

A step's time is modelled as the time of its decodes (measured per batch size, from steps that
decode only) plus a cost per prefill token on top (measured from steps that prefill). Both are
moving averages, so they follow the host's load. The scheduler asks how many prefill tokens fit
in what is left of a step's time budget once its decodes are counted. On a host too slow for
the budget (the decodes alone take longer), prefill still gets a share of each step: enough
tokens to take `MIN_PREFILL_SHARE` of the decodes' time, so a waiting prompt moves on at a
steady fraction of the machine rather than a trickle.

The cost of a prefill token grows with the context it attends to; one average over recent steps
is the approximation made here.
"""

from __future__ import annotations

SMOOTHING = 0.2  # weight of the newest step in each moving average
MIN_PREFILL_SHARE = 0.5  # prefill takes at least this much of the decodes' time (a third of a step)


class StepCosts:
    def __init__(self) -> None:
        self.decode_seconds: dict[int, float] = {}  # by number of decoding sequences
        self.prefill_token_seconds: float | None = None

    def observe(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        """Learn from one step that ran `decodes` decodes and `prefill_tokens` prefill tokens."""
        if prefill_tokens == 0:
            if decodes:
                self.decode_seconds[decodes] = _moved(self.decode_seconds.get(decodes), seconds)
            return
        decoding = self.decoding(decodes) if decodes else 0.0
        if decoding is None:
            return
        per_token = max(seconds - decoding, 0.0) / prefill_tokens
        self.prefill_token_seconds = _moved(self.prefill_token_seconds, per_token)

    def decoding(self, decodes: int) -> float | None:
        """The time of a step that decodes `decodes` sequences: measured at the nearest batch
        size seen, scaled linearly; None before any decode-only step."""
        if not self.decode_seconds:
            return None
        nearest = min(self.decode_seconds, key=lambda size: abs(size - decodes))
        return self.decode_seconds[nearest] * decodes / nearest

    def prefill_tokens_within(self, seconds: float, decodes: int) -> int | None:
        """How many prefill tokens to run beside `decodes` decodes in a step that aims to take
        `seconds`: what fits, and at least `MIN_PREFILL_SHARE` of the decodes' time; None while
        either cost is unknown."""
        decoding = self.decoding(decodes)
        if decoding is None or not self.prefill_token_seconds:
            return None
        fits = seconds - decoding
        return int(max(fits, MIN_PREFILL_SHARE * decoding) / self.prefill_token_seconds)


def _moved(average: float | None, value: float) -> float:
    return value if average is None else (1 - SMOOTHING) * average + SMOOTHING * value
