"""`python -m mlc_engine` runs the `mlc-engine` command line."""

from mlc_engine.cli import main

main()
