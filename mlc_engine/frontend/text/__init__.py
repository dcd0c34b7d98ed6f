"""The text side of the frontend: tokenizer, chat template and streaming detokenizer."""

from mlc_engine.frontend.text.chat_template import ChatTemplate, ChatTemplateError
from mlc_engine.frontend.text.detokenizer import IncrementalDetokenizer
from mlc_engine.frontend.text.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]
