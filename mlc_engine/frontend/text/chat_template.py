"""The model's Jinja chat template, rendered as transformers' `apply_chat_template` renders it.

Templates are written against transformers' Jinja environment, so this one matches it: a sandbox,
trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not escape
HTML, and `strftime_now`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlc_engine.common.config import ModelConfig
from mlc_engine.frontend.text.tokenizer import Tokenizer

# Used for models whose config carries no template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template could not be compiled, or refused to render these messages."""


class ChatTemplate:
    """Turns a list of chat messages into the prompt text the model was trained on."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        self._special_tokens = {"bos_token": bos_token, "eos_token": eos_token}
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template does not compile: {error}") from error

    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer: Tokenizer) -> ChatTemplate:
        return cls(config.chat_template, tokenizer.bos_token, tokenizer.eos_token)

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt for `messages`; extra keyword arguments become template variables."""
        # transformers always defines these; templates test `tools is not none`.
        variables: dict[str, Any] = {"tools": None, "documents": None, **self._special_tokens}
        variables.update(kwargs)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as error:
            raise ChatTemplateError(f"the chat template failed: {error}") from error


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, > and & for HTML, which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
