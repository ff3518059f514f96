"""The installed recallfix version (recorded in every patch's and analysis's provenance)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recallfix")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
