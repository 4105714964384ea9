"""The ITEM moderation service: intake, GPU loops, sources, outbox, ledger, operations, HTTP API and CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("item-moderation")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
