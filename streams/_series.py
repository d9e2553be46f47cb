"""Checks every receiver makes when a series starts: the memory it would allocate, and an unended series."""

from __future__ import annotations

import numpy as np

from beamloop.streams.counters import StreamCounters
from beamloop.streams.errors import OversizedMessage, UnexpectedMessage
from beamloop.streams.events import SeriesDescription


def check_ring_bound(series: SeriesDescription, need: int, limit: int, layout: str) -> None:
    """Refuse a series whose buffers would take more than ``limit`` bytes, before anything is allocated.

    Parameters
    ----------
    series : SeriesDescription
        The series announced.
    need : int
        Bytes the receiver would allocate for it.
    limit : int
        The receiver's ``max_ring_bytes``.
    layout : str
        The buffers, for the message: e.g. ``"a ring of 8"`` or ``"4 stacks of 64"``.

    Raises
    ------
    OversizedMessage
        ``need > limit``; the message names the series, its frames, ``need`` and the bound.
    """
    if need > limit:
        raise OversizedMessage(
            f"series {series.series_id} announces {len(series.channels)} channel(s) of {series.shape[0]}x"
            f"{series.shape[1]} {np.dtype(series.dtype)} frames: {need} bytes for {layout}, over the "
            f"{limit}-byte bound (max_ring_bytes)")


def note_unended(counters: StreamCounters, open_series: SeriesDescription | None,
                 series: SeriesDescription) -> None:
    """Count (as ``unexpected``, without raising) a series that starts while ``open_series`` has not ended.

    The new series is accepted: a detector re-armed without an ``end`` message (lost, or a restarted sender)
    must not stop the stream.
    """
    if open_series is not None:
        counters.count_error(UnexpectedMessage(
            f"series {series.series_id} started while series {open_series.series_id} was open"))
