"""What a frontend process serves, handed from `mlc-engine serve` to each uvicorn worker."""

from __future__ import annotations

import dataclasses
import json
import os

ENV_VAR = "MLC_ENGINE_SERVE_SETTINGS"
API_STYLES = ("openai", "mlc-chat")


@dataclasses.dataclass
class ServeSettings:
    model_folder: str
    model_name: str
    engines: list[list[str]]  # [input endpoint, output endpoint] of each engine
    api_style: str = "openai"
    api_key: str | None = None
    max_queue: int = 256  # requests waiting per engine beyond what it runs at once
    allowed_origins: list[str] = dataclasses.field(default_factory=list)
    max_body_bytes: int = 8 * 1024 * 1024
    tool_call_parser: str | None = None  # None: the one the chat template's model writes
    url: str = ""
    # Engines placed elsewhere (Ray): the table saying where they are, and this frontend's
    # CURVE key pair (both files in the server's private run directory).
    engine_table: str | None = None
    frontend_keys: str | None = None

    def to_env(self) -> None:
        os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[ENV_VAR]))
