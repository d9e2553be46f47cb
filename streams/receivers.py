"""The receiver registry: one name per detector stream protocol, for ``beamloop receive/record --protocol``.

``simplon1`` and ``stream2`` are received by :class:`beamloop.streams.dectris.receiver.DetectorReceiver` (whose
own registry of ZeroMQ protocol adapters is :data:`beamloop.streams.dectris.PROTOCOLS`), ``merlin`` (Quantum
Detectors MIB over TCP) by :class:`beamloop.streams.merlin.receiver.MerlinReceiver`. Every receiver has the
same interface: ``recv(timeout_ms)`` returning :class:`~beamloop.streams.dectris.series.SeriesStart`,
:class:`~beamloop.streams.dectris.series.FrameStack` or :class:`~beamloop.streams.dectris.series.SeriesEnd`,
``counters``, ``endpoint``, ``close()`` and use in a ``with`` block. Receivers are imported when one is opened,
so importing this module is cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_BUILTIN: dict[str, tuple[str, str, bool]] = {
    "simplon1": ("beamloop.streams.dectris.receiver", "DetectorReceiver", True),
    "stream2": ("beamloop.streams.dectris.receiver", "DetectorReceiver", True),
    "merlin": ("beamloop.streams.merlin.receiver", "MerlinReceiver", False),
}
_REGISTERED: dict[str, Callable] = {}

PROTOCOL_NAMES: tuple[str, ...] = tuple(_BUILTIN)
"""The built-in protocol names (``--protocol`` choices)."""


def register_receiver(name: str, factory: Callable) -> None:
    """Make :func:`open_receiver` open ``factory(endpoint, **kw)`` for protocol ``name``.

    Raises
    ------
    ValueError
        ``name`` is taken.
    """
    if name in _BUILTIN or name in _REGISTERED:
        raise ValueError(f"protocol {name!r} is registered already")
    _REGISTERED[name] = factory


def protocol_names() -> tuple[str, ...]:
    """Every protocol :func:`open_receiver` can open: the built-in ones, then those registered."""
    return PROTOCOL_NAMES + tuple(_REGISTERED)


def open_receiver(endpoint: str, *, protocol: str, **kw):
    """Open the receiver of ``protocol`` on ``endpoint``.

    Parameters
    ----------
    endpoint : str
        The detector's endpoint (``tcp://HOST:PORT``).
    protocol : str
        One of :func:`protocol_names`.
    **kw
        The receiver's options (``bind``, ``mode``, ``stack_size``, ``decode``...; see
        :class:`beamloop.streams.dectris.receiver.DetectorReceiver` and
        :class:`beamloop.streams.merlin.receiver.MerlinReceiver`).

    Raises
    ------
    ValueError
        Unknown protocol (or the receiver's own ``ValueError`` for bad options).
    """
    if protocol in _REGISTERED:
        return _REGISTERED[protocol](endpoint, **kw)
    if protocol not in _BUILTIN:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {protocol_names()}")
    module, cls, named = _BUILTIN[protocol]
    receiver = getattr(importlib.import_module(module), cls)
    return receiver(endpoint, protocol=protocol, **kw) if named else receiver(endpoint, **kw)
