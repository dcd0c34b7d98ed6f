"""MLC-Chat's documented entry point, `python -m mlc_chat.rest`, served by mlc-engine."""
