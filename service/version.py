"""trtserve's version, as installed."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed package's version; "0+unknown" when run from a checkout not installed."""
    try:
        return metadata.version("trtserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"
