"""argparse types shared by every command: each parses one text or raises ``argparse.ArgumentTypeError``
with a one-line message naming what was wrong."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from beamloop.streams._cliargs import parse_positive, parse_shape  # one parser for every command

__all__ = ["bounded", "parse_count", "parse_fraction_pair", "parse_nonnegative", "parse_positive", "parse_positive_int",
           "parse_shape"]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def parse_nonnegative(text: str) -> float:
    """A finite number >= 0."""
    v = _number(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return v


def _whole(text: str, smallest: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < smallest:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= {smallest}")
    return v


def parse_count(text: str) -> int:
    """A whole number >= 0."""
    return _whole(text, 0)


def parse_fraction_pair(text: str) -> tuple[float, float]:
    """``X,Y``: two fractions of the scan frame in [0, 1] (x along the fast axis, y down)."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y with fractions of the frame in [0, 1]") from None
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x, y)):
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y with fractions of the frame in [0, 1]")
    return x, y


def parse_positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _whole(text, 1)


def bounded(parse: Callable[[str], float], lo: float, hi: float, unit: str = "") -> Callable[[str], float]:
    """An argparse type: ``parse(text)`` within ``[lo, hi]`` (``unit`` names it in the message)."""
    def check(text: str) -> float:
        v = parse(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is outside [{lo:g}, {hi:g}]{' ' + unit if unit else ''}")
        return v

    check.__name__ = getattr(parse, "__name__", "bounded")
    return check


def frame_compression(text: str) -> str:
    """The native stream's compression as ``--compression`` names it: ``none`` (or ``raw``) or ``lz4``; the
    stream's own names come back (``raw``, ``lz4``). Other names are returned unchanged (argparse's choices
    then refuse them)."""
    t = str(text).strip().lower()
    return "raw" if t in ("none", "raw") else t
