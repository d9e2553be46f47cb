"""Frame ids and frame times, as every stream receiver accounts for them.

:data:`NS` and :func:`rational_ns` convert the rational times of DECTRIS Stream V2 (and of the native stream,
which follows it); :class:`FrameIdTracker` keeps the per-series frame-id bookkeeping (gaps, late and duplicate
ids, announced frames that never came) in :class:`beamloop.streams.counters.StreamCounters`.
"""

from __future__ import annotations

from typing import Any

from beamloop.streams.counters import StreamCounters
from beamloop.streams.errors import MalformedMessage

NS = 1_000_000_000
"""Nanoseconds per second."""

MAX_NS = (1 << 63) - 1
"""Largest time a receiver accepts, nanoseconds: the int64 range its time arrays hold (about 292 years)."""

MAX_ID = (1 << 63) - 1
"""Largest image id a receiver accepts: the int64 range its id arrays hold."""

DEFAULT_MAX_GAP = 1 << 16
"""Forward jumps of more frame ids than this wait for the next id to confirm them (see :class:`FrameIdTracker`)."""

DEFAULT_WINDOW = 1024
"""Ids below the next expected one within which a repeated id is told apart from a late one."""


def rational_ns(value: Any, what: str) -> int:
    """Nanoseconds of a rational number of seconds ``[numerator, denominator]``.

    DECTRIS Stream V2 sends ``start_time``, ``stop_time`` and ``real_time`` of an ``image`` message as such
    rationals (DECTRIS Stream V2 documentation, ``image`` message): times since ``series_date`` and a
    duration, so never negative. The native stream sends the same fields.

    Parameters
    ----------
    value : object
        The decoded field: a list (or tuple) of two integers.
    what : str
        Names the field in the error message, e.g. ``"image 3 start_time"``.

    Returns
    -------
    int
        ``numerator * 10**9 // denominator``, nanoseconds, in ``[0, MAX_NS]``.

    Raises
    ------
    MalformedMessage
        Anything but two integers (``bool`` is not one) with ``numerator >= 0`` and ``denominator > 0``,
        or a time beyond :data:`MAX_NS`.
    """
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or value[0] < 0 or value[1] <= 0):
        raise MalformedMessage(f"{what} must be a rational [numerator >= 0, denominator > 0], got {value!r}")
    ns = value[0] * NS // value[1]
    if ns > MAX_NS:
        raise MalformedMessage(f"{what} of {ns} ns is beyond the int64 range of nanoseconds")
    return ns


class FrameIdTracker:
    """Frame-id bookkeeping of one receiver, one series at a time.

    Image ids of a series count 0, 1, 2, ... (DECTRIS Stream V2 ``image_id``, SIMPLON v1 ``frame``). For
    every image the receiver calls :meth:`see`; it compares the id with the next expected one and counts,
    in ``counters``:

    - ``gaps`` and ``missing_frames``: a forward jump, and the ids it skipped (frames lost upstream);
    - ``reordered``: an id below the next expected one (a late or repeated frame; it is still delivered);
    - ``duplicates``: those of the ``reordered`` ids that had been received already, as far as the last
      ``window`` ids below the next expected one tell (an older id counts as reordered only);
    - ``bogus_ids``: a single id more than ``max_gap`` ahead that the next image does not continue from:
      a corrupt or foreign id, counted once instead of as a gap of (say) 10^12 missing frames that would
      make every later image look late. A far jump the next image continues from (``id + 1``) was real
      and is counted as a gap when that image comes.

    :meth:`end` counts the announced frames that never came.

    Parameters
    ----------
    counters : StreamCounters
        The receiver's counters, updated in place.
    max_gap : int
        Longest forward jump counted at once (default :data:`DEFAULT_MAX_GAP`).
    window : int
        Ids below the next expected one in which duplicates are recognised (default :data:`DEFAULT_WINDOW`).

    Attributes
    ----------
    next_id : int
        One past the highest id accepted in the series: the id expected next.
    frames : int
        Images seen in the series (late, repeated and bogus ones included).
    """

    __slots__ = ("counters", "max_gap", "window", "next_id", "frames", "_pending", "_holes")

    def __init__(self, counters: StreamCounters, *, max_gap: int = DEFAULT_MAX_GAP,
                 window: int = DEFAULT_WINDOW) -> None:
        if max_gap < 1 or window < 0:
            raise ValueError(f"need max_gap >= 1 and window >= 0, got {max_gap}, {window}")
        self.counters = counters
        self.max_gap = int(max_gap)
        self.window = int(window)
        self.next_id = 0
        self.frames = 0
        self._pending: int | None = None  # a far jump waiting for the next id to confirm it
        self._holes: set[int] = set()  # skipped ids within the window (a later arrival is late, not repeated)

    def start(self) -> None:
        """Begin a new series: ids count from 0 again (an unconfirmed far jump is settled as bogus)."""
        self._settle()
        self.next_id = 0
        self.frames = 0
        self._holes.clear()

    def see(self, image_id: int) -> int:
        """Account for one image.

        Parameters
        ----------
        image_id : int
            Its id (validated non-negative by the decoder).

        Returns
        -------
        int
            Ids lost immediately before it: the forward jump this image makes, or, for the image that
            confirms a far jump, that jump; 0 otherwise.
        """
        self.frames += 1
        if image_id == self.next_id and self._pending is None:  # the common case
            self.next_id = image_id + 1
            return 0
        return self._irregular(image_id)

    def advance(self, n: int) -> None:
        """Account for ``n`` images with the consecutive ids ``next_id, next_id + 1, ...``, received by a
        compiled loop that handed every other id to :meth:`see`."""
        if n > 0:
            self._settle()
            self.next_id += n
            self.frames += n

    def end(self, number_of_images: int) -> int:
        """End the series; returns the announced frames that never came (counted as one gap).

        Parameters
        ----------
        number_of_images : int
            Frames the series announced; 0 when unknown (then nothing is missing).
        """
        self._settle()
        missing = max(number_of_images - self.next_id, 0) if number_of_images else 0
        if missing:
            self.counters.gaps += 1
            self.counters.missing_frames += missing
        return missing

    def _irregular(self, image_id: int) -> int:
        pending = self._pending
        if pending is not None:
            self._pending = None
            if image_id == pending + 1:  # the far jump was real: the ids before it were lost
                jump = pending - self.next_id
                self._skip(self.next_id, pending)
                self.next_id = image_id + 1
                return jump
            self.counters.bogus_ids += 1
        gap = image_id - self.next_id
        if gap > self.max_gap:
            self._pending = image_id
            return 0
        if gap >= 0:
            if gap:
                self._skip(self.next_id, image_id)
            self.next_id = image_id + 1
            return gap
        self.counters.reordered += 1
        if image_id in self._holes:
            self._holes.discard(image_id)
        elif image_id >= self.next_id - self.window:
            self.counters.duplicates += 1
        return 0

    def _skip(self, lo: int, hi: int) -> None:
        """Ids ``lo .. hi - 1`` were skipped: one gap."""
        self.counters.gaps += 1
        self.counters.missing_frames += hi - lo
        if self.window:
            holes = self._holes
            holes.update(range(max(lo, hi - self.window), hi))
            if len(holes) > self.window:
                floor = hi + 1 - self.window
                holes.difference_update([i for i in holes if i < floor])

    def _settle(self) -> None:
        if self._pending is not None:
            self._pending = None
            self.counters.bogus_ids += 1
