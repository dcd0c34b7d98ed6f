"""Checkpoint readers for the model converter: GGUF files and Hugging Face folders."""
