"""Render a running server's /docs in headless Chromium: check that Swagger UI lists every route
of /openapi.json, and save a screenshot.

    python scripts/docs_screenshot.py http://127.0.0.1:8000 [--output docs.png]

Needs Chromium (Debian: `apt-get install chromium`). Talks only to the URL given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",  # lets Swagger UI fetch the spec and render it
]


def chromium(url: str, *flags: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        sys.exit("Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="base URL of a running server")
    parser.add_argument("--output", type=Path, default=Path("docs.png"))
    args = parser.parse_args()
    base = args.url.rstrip("/")
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
        spec = json.load(response)
    dom = chromium(f"{base}/docs", "--dump-dom")
    missing = [path for path in spec["paths"] if f">{path}<" not in dom and path not in dom]
    chromium(f"{base}/docs", f"--screenshot={args.output}", "--window-size=1280,2200")
    print(f"{len(spec['paths']) - len(missing)} of {len(spec['paths'])} routes listed; "
          f"screenshot in {args.output}")  # fmt: skip
    if missing or not args.output.is_file():
        sys.exit(f"not rendered: {missing or 'no screenshot'}")


if __name__ == "__main__":
    main()
