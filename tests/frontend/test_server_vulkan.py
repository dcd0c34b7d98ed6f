"""The default model served on Vulkan answers through the HTTP API (skipped without Vulkan)."""

from __future__ import annotations

import httpx
import pytest
from conftest import VULKAN, requires_vulkan, running_server, serve_command

from mlc_engine.engine.models import prepare_model


@requires_vulkan
@pytest.mark.slow
def test_the_default_model_answers_over_http_on_vulkan() -> None:
    folder = prepare_model(None, VULKAN)  # the float16 conversion GPUs get
    # The first start compiles the model for the device: minutes on lavapipe.
    with running_server(serve_command(folder, device="vulkan"), ready_seconds=900) as url:
        body = {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]
