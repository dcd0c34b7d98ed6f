"""/openapi.json as built, without a server: valid OpenAPI 3.0 in both API styles."""

from __future__ import annotations

import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

from mlc_engine.frontend.docs import openapi_spec


@pytest.mark.parametrize("api_style", ["openai", "mlc-chat"])
def test_the_spec_is_valid_openapi_3_0(api_style: str) -> None:
    spec = openapi_spec("mlc-engine: test", api_style)
    errors = [str(error)[:300] for error in OPENAPI_30_VALIDATOR.iter_errors(spec)]
    assert not errors


def test_stats_are_an_object_or_text_as_the_api_style_answers() -> None:
    def stats(api_style: str) -> dict:
        ok = openapi_spec("t", api_style)["paths"]["/stats"]["get"]["responses"]["200"]
        return ok["content"]["application/json"]["schema"]

    assert stats("openai")["$ref"].endswith("/Stats")
    assert stats("mlc-chat")["type"] == "string"
