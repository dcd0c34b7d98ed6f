"""Serving benchmark: drives OpenAI-compatible servers with one workload and compares them.

Client-side only: it talks HTTP to the base URLs it is given and imports nothing of the engine
or the frontend, so it measures mlc-engine and any other server (llama.cpp's `llama-server`,
vLLM, ...) alike. `mlc-engine bench` and `benchmarks/serving.py` run it.
"""
