"""The wire protocol: what is packed unpacks the same, and what is malformed is refused."""

from __future__ import annotations

import msgpack
import pytest

from mlc_engine.common.protocol import (
    AddRequest,
    ProtocolError,
    RequestMetrics,
    SamplingParams,
    SequenceOutput,
    StatsSnapshot,
    StepOutput,
    TokenLogprob,
    pack,
    unpack,
)


def test_messages_round_trip() -> None:
    params = SamplingParams(max_tokens=5, temperature=0.5, logit_bias={7: -1.5}, seed=-3, n=2)
    request = AddRequest("r1", "f" * 32, [1, 2, 3], params)
    assert unpack(AddRequest, pack(request)) == request
    output = SequenceOutput(
        "r1",
        1,
        [4],
        logprobs=[TokenLogprob(-0.5, [(4, -0.5), (9, -1.25)])],
        prompt_logprobs=[None, TokenLogprob(-2.0, [])],
        finish_reason="length",
        metrics=RequestMetrics(3, 1, 0.1, 0.0, 0),
    )
    step = StepOutput([output], StatsSnapshot(num_running=1, decode_seconds=0.5))
    assert unpack(StepOutput, pack(step)) == step


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([1, 2]),  # too few fields
        msgpack.packb(["r", "f", "not a list", [16] + [None] * 15]),
        msgpack.packb(["r", "f", [1, 2], ["sixteen"] + [None] * 15]),
        msgpack.packb(["r", "f", [1, True], SamplingParams().__dict__]),
    ],
)
def test_malformed_payloads_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack(AddRequest, payload)


def test_out_of_range_sampling_params_name_the_field() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).check(100)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).check(100)
