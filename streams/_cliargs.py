"""argparse types of the stream commands (``beamloop receive``, ``record``, ``stream``); standard library only.

Each parses one command-line text or raises ``argparse.ArgumentTypeError`` with a one-line message naming
what was wrong (the exception argparse turns into a usage error: Python documentation, ``argparse``, "type").
"""

from __future__ import annotations

import argparse
import math


def parse_shape(text: str) -> tuple[int, int]:
    """``ROWSxCOLS`` (or ``N`` for N x N) as a pair of positive ints.

    Parameters
    ----------
    text : str
        E.g. ``"256x256"``, ``"64,32"`` or ``"96"``.

    Returns
    -------
    (int, int)
        Rows and columns.

    Raises
    ------
    argparse.ArgumentTypeError
        Not one or two integers, or a size that is not positive.
    """
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is not ROWSxCOLS (e.g. 256x256)") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is not ROWSxCOLS with positive sizes")
    return parts[0], parts[1]


def parse_positive(text: str) -> float:
    """A positive finite number.

    Raises
    ------
    argparse.ArgumentTypeError
        Not a number, or not finite and > 0.
    """
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return v
