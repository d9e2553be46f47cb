"""Option groups of the commands that run an end of the control bridge: beam safety, CURVE keys, trigger place.

Each ``add_*`` function adds a group of options to a command's parser; the matching ``*_from_args`` /
``*_options`` function reads them back into the objects of :mod:`beamloop.edge.control.safety` and
:mod:`beamloop.edge.control.keys`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from beamloop.edge.cli.types import parse_fraction_pair, parse_nonnegative, parse_positive
from beamloop.edge.control.keys import ClientKeys, KeyFileError, ServerKeys

K = TypeVar("K")


# beam safety ------------------------------------------------------------------------------------------------
def add_safety_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the watchdog and dose options of a scan controller to a command's parser.

    The options are ``--watchdog S``, ``--on-watchdog {blank,park}``, ``--safe-position X,Y`` and
    ``--max-point-electrons N``; read them back with :func:`safety_options`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    g = parser.add_argument_group("beam safety")
    g.add_argument("--watchdog-s", "--watchdog", dest="watchdog", type=parse_nonnegative, default=1.0, metavar="S",
                   help="blank (or park) the beam when the client driving it is silent this long, seconds "
                        "(0: no watchdog)")
    g.add_argument("--on-watchdog", choices=("blank", "park"), default="blank",
                   help="what the watchdog does: blank the beam, or park it at --safe-position")
    g.add_argument("--safe-position", type=parse_fraction_pair, default=(0.0, 0.0), metavar="X,Y",
                   help="where the watchdog parks the probe, fractions of the current frame")
    g.add_argument("--max-point-electrons", type=parse_positive, default=None, metavar="N",
                   help="dose limit per probe position, electrons (default: none; 0 is refused: omit the option "
                        "for no limit)")


def safety_options(a: argparse.Namespace) -> dict:
    """The options of :func:`add_safety_arguments` as keyword arguments.

    Parameters
    ----------
    a : argparse.Namespace
        Parsed arguments of a parser given :func:`add_safety_arguments`.

    Returns
    -------
    dict
        ``watchdog_s`` (None for 0), ``on_watchdog``, ``safe_position`` (x, y), ``max_point_electrons`` (None
        when absent): names shared by :class:`beamloop.edge.control.safety.SafetyLimits` and
        :class:`beamloop.edge.sim.microscope.MicroscopeConfig`.
    """
    return {"watchdog_s": a.watchdog or None, "on_watchdog": a.on_watchdog, "safe_position": tuple(a.safe_position),
            "max_point_electrons": a.max_point_electrons}


# where the trigger decides ----------------------------------------------------------------------------------
def add_trigger_at_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--trigger-at {controller,service}`` (default ``controller``) to a command's parser.

    ``controller``: the scan controller's own trigger decides and blanks the beam next to it, when the
    controller offers the trigger's model (``get_capabilities``), else the service decides (the fallback);
    ``service``: the service always decides. The value is ``a.trigger_at``
    (:attr:`beamloop.edge.app.ServiceConfig.trigger_at`).

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    parser.add_argument("--trigger-at", choices=("controller", "service"), default="controller",
                        help="where the ejection trigger decides: at the scan controller, next to the beam, when "
                             "it offers the model (else the service), or always in the service")


# drift ---------------------------------------------------------------------------------------------------------
def add_lock_on_argument(parser: argparse.ArgumentParser, default: str | None = "predict", note: str = "") -> None:
    """Add ``--lock-on {none,predict,rescan}`` to a command's parser (the value is ``a.lock_on``,
    :attr:`beamloop.edge.app.ServiceConfig.lock_on`; ``default`` None: the command decides, ``note`` says how).

    ``predict``: the frame path registers every frame (stage ``register``) and each probe goes where the drift
    estimate puts its target now; ``none``: where the frame showed it.
    """
    parser.add_argument("--lock-on", choices=("none", "predict", "rescan"), default=default,
                        help="drift correction: predict (register frames, send the probe where the drift estimate "
                             "puts the target now; skip targets too uncertain), rescan (also re-find the column "
                             "in a 32-pixel subscan there) or none"
                             + (f"; default {note}" if note else f"; default {default}"))


def add_drift_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--drift-A-per-s V`` (specimen drift of the simulated microscope, A/s, 0 .. 100; default 0: none)."""
    from beamloop.edge.cli.types import bounded, parse_nonnegative

    parser.add_argument("--drift-A-per-s", type=bounded(parse_nonnegative, 0, 100, "A/s"), default=0.0,
                        help="specimen drift of the simulated microscope, A/s (0: none; aberration-corrected STEMs "
                             "drift 0.017-0.17 A/s after settling)")


# CURVE keys ---------------------------------------------------------------------------------------------------
def _add_key_arguments(parser: argparse.ArgumentParser, own_help: str, peer: str, peer_metavar: str,
                       peer_help: str) -> None:
    g = parser.add_argument_group("bridge security (CURVE)")
    g.add_argument("--keys", default=None, metavar="NAME.key_secret", help=own_help)
    g.add_argument(peer, default=None, metavar=peer_metavar, help=peer_help)


def _keys_from_args(secret: str | None, peer: str | None, load: Callable[[str, str], K], missing: str) -> K | None:
    if secret is None and peer is None:
        return None
    if secret is None or peer is None:
        raise KeyFileError(missing)
    return load(secret, peer)


def add_server_key_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--keys SECRET`` and ``--authorized FOLDER`` (the scan controller's side) to a command's parser.

    Read them back with :func:`server_keys_from_args`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    _add_key_arguments(parser, "the bridge's secret key file (`beamloop keys create`); required to bind a "
                               "non-loopback address",
                       "--authorized", "FOLDER", "folder of the public keys of the clients let in "
                                                 "(`beamloop keys authorize`)")


def server_keys_from_args(a: argparse.Namespace) -> ServerKeys | None:
    """The :class:`~beamloop.edge.control.keys.ServerKeys` named by ``--keys`` / ``--authorized``.

    Parameters
    ----------
    a : argparse.Namespace
        Parsed arguments (attributes ``keys`` and ``authorized``; absent ones count as not given).

    Returns
    -------
    ServerKeys or None
        None when neither option is given.

    Raises
    ------
    KeyFileError
        Only one of the two is given, or the files are not usable
        (:meth:`beamloop.edge.control.keys.ServerKeys.load`).
    """
    return _keys_from_args(getattr(a, "keys", None), getattr(a, "authorized", None), ServerKeys.load,
                           "a secured bridge needs both --keys (its secret key file) and --authorized (the folder "
                           "of the clients' public keys)")


def add_client_key_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--keys SECRET`` and ``--server-key PUBLIC`` (a bridge client's side) to a command's parser.

    Read them back with :func:`client_keys_from_args`.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    _add_key_arguments(parser, "this client's secret key file (its public key must be authorized by the bridge)",
                       "--server-key", "SERVER.key", "the bridge's public key file")


def client_keys_from_args(a: argparse.Namespace) -> ClientKeys | None:
    """The :class:`~beamloop.edge.control.keys.ClientKeys` named by ``--keys`` / ``--server-key`` (attributes
    ``keys`` and ``server_key`` of the parsed arguments ``a``), or None when neither is given.

    Raises
    ------
    KeyFileError
        As :func:`server_keys_from_args`, with :meth:`beamloop.edge.control.keys.ClientKeys.load`.
    """
    return _keys_from_args(getattr(a, "keys", None), getattr(a, "server_key", None), ClientKeys.load,
                           "a client of a secured bridge needs both --keys (its secret key file) and --server-key "
                           "(the bridge's public key file)")



# live view ----------------------------------------------------------------------------------------------------
def add_http_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--http HOST:PORT`` (the live view and ``/metrics``, :mod:`beamloop.edge.monitor`) to a command's
    parser; the value is ``a.http``: ``(host, port)`` or None (:func:`beamloop.edge.monitor.auth.parse_http`).

    Beyond loopback the view needs the bridge client's CURVE keys (``--keys``, ``--server-key``): its bearer
    token is derived from them (:func:`beamloop.edge.monitor.auth.token_from_secret`).
    """
    from beamloop.edge.monitor.auth import parse_http

    def http(text: str) -> tuple[str, int]:
        try:
            return parse_http(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--http", type=http, default=None, metavar="HOST:PORT",
                        help="serve a live view (latest frame, columns, targets, probe, trigger, latency, counters, "
                             "a stop button that blanks the beam) and Prometheus /metrics there, e.g. "
                             "127.0.0.1:8080; beyond loopback only with --keys/--server-key, whose secret key gives "
                             "the page's token")


def http_allowed(http: tuple[str, int], keys: ClientKeys | None, command: str) -> bool:
    """Whether ``--http`` may serve at ``http`` with the bridge client ``keys``: a loopback address always, any
    other only with keys (the page's token is derived from them; :mod:`beamloop.edge.monitor.auth`). Prints a
    one-line error (``beamloop COMMAND: ...``) when not.

    Parameters
    ----------
    http : (host, port)
    keys : ClientKeys or None
    command : str
        The command's name, for the error.
    """
    from beamloop.edge.cli import error
    from beamloop.edge.monitor.auth import is_loopback

    if is_loopback(http[0]) or keys is not None:
        return True
    error(command, f"--http {http[0]}:{http[1]} is beyond loopback: the live view can stop the beam, so it needs "
                   "the bridge client keys (--keys and --server-key; the page's token is derived from them) or a "
                   "loopback address such as 127.0.0.1")
    return False


def add_drift_correction_arguments(parser) -> None:
    """The drift-correction refinements of ``serve`` and ``run`` (all off by default): ``--match-columns``,
    ``--rescan-updates``, ``--recentre-s``, ``--recentre-decline``
    (:class:`beamloop.edge.app.ServiceConfig`)."""
    from beamloop.edge.cli.types import bounded, parse_positive

    g = parser.add_argument_group("drift correction (with --lock-on predict or rescan)")
    g.add_argument("--match-columns", action="store_true",
                   help="refine each frame's registered shift by matching its columns to the previous frame's "
                        "(better on noisy frames: 0.36 vs 0.94 px RMS at 3e3 e-/A^2; equal at 1e5)")
    g.add_argument("--rescan-updates", action="store_true",
                   help="rescan: feed each re-centring subscan's column into the drift estimate")
    g.add_argument("--recentre-s", type=bounded(parse_positive, 0.05, 3600, "s"), default=None, metavar="S",
                   help="rescan: re-centre a long dwell every S seconds (blank, subscan, re-park, unblank)")
    g.add_argument("--recentre-decline", type=bounded(parse_positive, 0.01, 0.99), default=None, metavar="F",
                   help="rescan: also re-centre when the parked signal falls below F of its start without a trigger")


def drift_correction_options(a) -> dict:
    """The :class:`beamloop.edge.app.ServiceConfig` fields of :func:`add_drift_correction_arguments`."""
    return {"match_columns": bool(getattr(a, "match_columns", False)),
            "rescan_updates": bool(getattr(a, "rescan_updates", False)),
            "recentre_s": getattr(a, "recentre_s", None), "recentre_decline": getattr(a, "recentre_decline", None)}
