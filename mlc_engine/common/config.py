"""The model configuration stored as `mlc-chat-config.json` in a model folder.

One dataclass is shared by the converter (which writes it), the compiler (which builds the model
from it) and the frontend (which reads the tokenizer, chat template and stop tokens from it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "mlc-chat-config.json"


@dataclasses.dataclass
class ModelConfig:
    """Architecture sizes plus everything needed to serve the model."""

    model_type: str  # "llama" or "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    context_window_size: int
    head_dim: int = 0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    quantization: str = "q0f32"
    # How each weight matrix is stored ("q4_1", "q8_0", "float", ...) by our parameter prefix;
    # empty in folders from before per-tensor storage, where the scheme decides for all.
    tensor_storage: dict[str, str] = dataclasses.field(default_factory=dict)
    # Which converter wrote the folder (`convert.CONVERTER_VERSION`; 0: before it was recorded).
    converter_version: int = 0
    prefill_chunk_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = dataclasses.field(default_factory=list)
    pad_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.prefill_chunk_size == 0:
            self.prefill_chunk_size = min(self.context_window_size, 2048)

    def architecture_key(self) -> dict[str, Any]:
        """The fields that change the compiled library (used in its cache key)."""
        keep = [
            "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
            "rope_theta", "rope_scaling", "head_dim", "tie_word_embeddings", "attention_bias",
            "quantization", "tensor_storage",
        ]  # fmt: skip
        return {name: getattr(self, name) for name in keep}

    def save(self, folder: Path) -> None:
        text = json.dumps(dataclasses.asdict(self), indent=2)
        (folder / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> ModelConfig:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
