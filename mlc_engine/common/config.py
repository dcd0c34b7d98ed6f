"""The model configuration stored as `mlc-chat-config.json` in a model folder.

One dataclass is shared by the converter (which writes it), the compiler (which builds the model
from it) and the frontend (which reads the tokenizer, chat template, stop tokens and default
sampling from it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mlc_engine.common.protocol import SamplingParams

CONFIG_FILE = "mlc-chat-config.json"
# How long a step that carries running decodes aims to take (0: no limit). Off by default: on
# the 2-core CPU, 125 ms cut the mixed workload's ITL p99 from 694 to 163 ms, but cost 16% of
# its throughput and put 17% on the long prompts' TTFT, and 100 ms (121 ms) cost 22% and 31%
# (benchmarks/README.md): no setting meets all of issue 21's bars (150 ms, 0.9x, 1.2x).
DEFAULT_MAX_STEP_MS = 0.0
# The request fields a model folder may recommend defaults for, in its `sampling`, and their
# types. A field it leaves out takes the engine's neutral value (SamplingParams' default).
SAMPLING_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
}


@dataclasses.dataclass
class ModelConfig:
    """Architecture sizes plus everything needed to serve the model."""

    model_type: str  # "llama", "qwen2" or "qwen3"
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
    # The authors' recommended sampling (see SAMPLING_FIELDS): what a request that leaves a
    # field out gets. Not part of the architecture: editing it needs no new library.
    sampling: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.prefill_chunk_size == 0:
            self.prefill_chunk_size = min(self.context_window_size, 2048)
        self.sampling = checked_sampling(self.sampling)

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes each head of q and k (RMS norm over head_dim) before RoPE."""
        return self.model_type == "qwen3"

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
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ValueError as error:
            raise ValueError(f"{folder / CONFIG_FILE}: {error}") from None


def checked_sampling(sampling: dict[str, Any]) -> dict[str, float]:
    """`sampling` with each value as its field's type; ValueError naming the first bad entry."""
    if not isinstance(sampling, dict):
        raise ValueError('sampling must be an object, such as {"temperature": 0.7}')
    checked: dict[str, float] = {}
    for name, value in sampling.items():
        kind = SAMPLING_FIELDS.get(name)
        if kind is None:
            raise ValueError(f"sampling.{name} is not one of {', '.join(SAMPLING_FIELDS)}")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (kind is int and not float(value).is_integer()):
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"sampling.{name} must be {what}")
        checked[name] = kind(value)
    fields: dict[str, Any] = checked
    try:
        SamplingParams(**fields).check(vocab_size=0)
    except ValueError as error:
        raise ValueError(f"sampling.{error}") from None
    return checked
