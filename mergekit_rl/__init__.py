"""rlmerge: merge LLM checkpoints around RLHF."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergekit-rl")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
