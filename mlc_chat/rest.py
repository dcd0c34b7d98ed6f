"""`python -m mlc_chat.rest`: MLC-Chat's REST server, as its documentation describes it.

Takes the documented flags and serves MLC-Chat's 2023 wire format by default (compact stream
chunks, /stats as a line of text); `--api-style openai` gives the OpenAI format instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlc_engine.cli import serve
from mlc_engine.common.errors import MLCEngineError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlc_chat.rest", description="MLC-Chat REST API server (mlc-engine)."
    )
    parser.add_argument(
        "--model",
        default=None,
        help="The model folder after compiling with MLC-LLM build process, or the model name "
        "with its quantization scheme (e.g. SmolLM2-135M-Instruct-q4f32_1), searched for over "
        "possible paths. Default: SmolLM2-135M-Instruct.",
    )
    parser.add_argument(
        "--lib-path", type=Path, default=None, help="Full path to the model library (.so) to use."
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="'device_name:device_id' or 'device_name': cuda, metal, vulkan, rocm, opencl, cpu "
        "or auto (the best local device). Default: auto.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Default: 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000, help="Default: 8000.")
    parser.add_argument(
        "--api-style", choices=["mlc-chat", "openai"], default="mlc-chat", help="Default: mlc-chat."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        serve(args.model, args.lib_path, args.device, args.host, args.port, args.api_style)
    except (MLCEngineError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
