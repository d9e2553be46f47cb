"""The trigger names the commands offer (``--trigger``), from the trigger registry."""

from __future__ import annotations


def trigger_names() -> tuple[str, ...]:
    """Registered trigger names (:mod:`beamloop.edge.trigger`)."""
    try:
        from beamloop.edge.trigger import TRIGGERS
    except ImportError:  # the registry is not there yet
        return ("cusum", "window", "model")
    return tuple(TRIGGERS)
