"""The `modiff` command (`main`): parse options, build a config, call a pipeline."""
from modiff.cli.main import main

__all__ = ["main"]
