"""Argument types the `trtserve` and `trtserve-client` command lines share.

Each raises argparse.ArgumentTypeError with what was expected, which argparse
prints next to the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def _pair(text: str, value: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME={value}, got {text!r}")
    return name, rest


def name_path(text: str) -> tuple[str, str]:
    """NAME=PATH, e.g. a model and its file."""
    return _pair(text, "PATH")


def name_value(text: str) -> tuple[str, str]:
    """NAME=VALUE."""
    return _pair(text, "VALUE")


def _listed(text: str, kind: Callable[[str], N], what: str) -> tuple[N, ...]:
    try:
        return tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated {what}, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    """N,N,...; may be empty."""
    return _listed(text, int, "integers")


def size_list(text: str) -> tuple[int, ...]:
    """N,N,... with at least one N, each at least 1."""
    sizes = int_list(text)
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected sizes of at least 1, got {text!r}")
    return sizes


def positive_numbers(text: str) -> tuple[float, ...]:
    """X,X,... with at least one X, each above 0."""
    values = _listed(text, float, "numbers")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers above 0, got {text!r}")
    return values


def batching_mode(text: str) -> bool | str:
    """auto, on or off: a model's `batching` key ("auto", True or False)."""
    modes: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
    mode = modes.get(text.lower())
    if mode is None:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return mode


def auto_or_int(text: str) -> int | str:
    """"auto" or a whole number (`--frontends`, `--frontend-spin-us`)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
