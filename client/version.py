"""The client's version, as installed (the server's is trtserve.service.version)."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The installed client's version; "0+unknown" when run from a checkout not installed."""
    try:
        return metadata.version("trtserve-client")
    except metadata.PackageNotFoundError:
        return "0+unknown"
