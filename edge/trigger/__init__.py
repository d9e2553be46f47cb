"""Ejection triggers on the parked-probe ADF signal, by name.

Every trigger implements :class:`~beamloop.edge.trigger.base.Trigger` (``name``, ``start``, ``update``,
``trigger_sample``, ``baseline_rate``). They are built by name through a registry, in the manner of
hls4ml's backend registry (``hls4ml.backends.register_backend`` / ``get_backend``):

- :func:`register_trigger` adds a name and a factory;
- :func:`make_trigger` builds a trigger by name;
- :data:`TRIGGERS` (and :func:`trigger_names`) lists the names registered, in registration order.

Registered here: ``"cusum"`` and ``"window"`` (:mod:`beamloop.edge.trigger.classical`) and ``"model"``
(the quantized ejection network shipped in ``edge/models/trigger/``, :mod:`beamloop.edge.trigger.model`).
"""

from __future__ import annotations

from collections.abc import Callable

from beamloop.edge.trigger.base import BaselineTrigger, Trigger, TriggerState
from beamloop.edge.trigger.classical import CusumTrigger, WindowTrigger
from beamloop.edge.trigger.model import ModelTrigger

__all__ = ["TRIGGERS", "BaselineTrigger", "CusumTrigger", "ModelTrigger", "Trigger", "TriggerState",
           "WindowTrigger", "make_trigger", "register_trigger", "trigger_names"]

_FACTORIES: dict[str, Callable[..., Trigger]] = {}


def register_trigger(name: str, factory: Callable[..., Trigger], *, replace: bool = False) -> None:
    """Make ``make_trigger(name, **options)`` call ``factory(**options)``.

    Parameters
    ----------
    name : str
        Registry name (what ``--trigger`` takes on the command line).
    factory : callable
        Called with the options given to :func:`make_trigger`; returns a :class:`Trigger` (a trigger class
        itself will do).
    replace : bool
        Allow replacing a registered name.

    Raises
    ------
    ValueError
        Empty name, or a name already registered without ``replace``.
    TypeError
        ``factory`` not callable.
    """
    if not name:
        raise ValueError("a trigger needs a non-empty name")
    if not callable(factory):
        raise TypeError(f"trigger factory for {name!r} is not callable: {factory!r}")
    if name in _FACTORIES and not replace:
        raise ValueError(f"trigger {name!r} is already registered")
    _FACTORIES[name] = factory


def trigger_names() -> tuple[str, ...]:
    """Names registered so far, in registration order."""
    return tuple(_FACTORIES)


def make_trigger(name: str, **options) -> Trigger:
    """A new trigger by registry name.

    Parameters
    ----------
    name : str
        One of :func:`trigger_names` (``"cusum"``, ``"window"``, ``"model"``, and any registered since).
    **options
        Passed to the factory (e.g. ``h=14.0`` for ``"cusum"``, ``threshold=...`` for ``"model"``).

    Returns
    -------
    Trigger

    Raises
    ------
    ValueError
        Unknown name (or a factory's own ``ValueError`` for bad options).
    FileNotFoundError
        ``"model"`` with its manifest or model files missing.
    TypeError
        An option the factory does not take, or a factory that returns something that is not a
        :class:`Trigger`.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown trigger {name!r}; expected one of {sorted(_FACTORIES)}") from None
    trig = factory(**options)
    if not isinstance(trig, Trigger):
        raise TypeError(f"trigger factory for {name!r} returned {type(trig).__name__}, which is not a Trigger")
    return trig


register_trigger(CusumTrigger.name, CusumTrigger)
register_trigger(WindowTrigger.name, WindowTrigger)
register_trigger(ModelTrigger.name, ModelTrigger)


def __getattr__(name: str) -> tuple[str, ...]:
    """``TRIGGERS``: the registered names at the time it is read (as :func:`trigger_names`)."""
    if name == "TRIGGERS":
        return trigger_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
