"""DECTRIS detector streams: SIMPLON v1 and Stream V2, received into preallocated frame stacks.

:class:`beamloop.streams.dectris.receiver.DetectorReceiver` owns the socket and the ring of frame stacks;
a *protocol adapter* reads each protocol's messages and writes them through the receiver's public
:class:`beamloop.streams.dectris.sink.RingSink` interface. Adapters are looked up by name in
:data:`PROTOCOLS`, a registry in the manner of hls4ml's backend registry (``hls4ml.backends``:
``register_backend`` / ``get_backend``); :func:`register_protocol` adds one.
"""

from __future__ import annotations

from beamloop.streams.dectris.simplon import SimplonAdapter
from beamloop.streams.dectris.stream_v2 import Stream2Adapter

PROTOCOLS: dict[str, type] = {"simplon1": SimplonAdapter, "stream2": Stream2Adapter}
"""Protocol name -> adapter class (:class:`beamloop.streams.dectris.sink.ProtocolAdapter`)."""


def register_protocol(name: str, adapter: type) -> None:
    """Make ``DetectorReceiver(protocol=name)`` read with ``adapter``.

    Parameters
    ----------
    name : str
        Protocol name; it is also the ``protocol`` of the :class:`~beamloop.streams.dectris.series.DetectorSeries`
        the adapter announces.
    adapter : type
        A class implementing :class:`beamloop.streams.dectris.sink.ProtocolAdapter`.

    Raises
    ------
    ValueError
        ``name`` is registered already (as ``hls4ml.backends.register_backend`` refuses a second backend of
        one name).
    """
    if name in PROTOCOLS:
        raise ValueError(f"protocol {name!r} is registered already ({PROTOCOLS[name].__name__})")
    PROTOCOLS[name] = adapter


def get_adapter(name: str) -> type:
    """The adapter class registered for protocol ``name``.

    Raises
    ------
    ValueError
        No protocol of that name is registered.
    """
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}") from None


__all__ = ["PROTOCOLS", "register_protocol", "get_adapter"]
