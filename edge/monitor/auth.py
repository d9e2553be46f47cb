"""The live view's address and token rules (no web dependencies: the command line reads ``--http`` with them).

Bound to a loopback address the live view needs no token, like the bridge, whose loopback endpoints need no
keys. Bound beyond loopback every route requires a bearer token, derived from the bridge client's CURVE
secret key (:func:`token_from_secret`): whoever holds the keys that may drive the beam may watch and stop it,
nobody else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

TOKEN_CONTEXT = b"beamloop live view v1"
"""The message of the token's HMAC (:func:`token_from_secret`)."""


class MonitorAuthError(ValueError):
    """A live view bound beyond loopback without a token, or an unusable address."""


def token_from_secret(secret: bytes) -> str:
    """The live view's bearer token for a CURVE secret key: HMAC-SHA256 (RFC 2104) of :data:`TOKEN_CONTEXT`
    keyed with the secret key (Z85 text), as 32 hexadecimal digits. Anyone with the key file can compute it;
    the token reveals nothing of the key.

    Parameters
    ----------
    secret : bytes
        The secret key (:attr:`beamloop.edge.control.keys.ClientKeys.secret`).

    Raises
    ------
    ValueError
        An empty key.
    """
    if not secret:
        raise ValueError("no secret key to derive the live view's token from")
    return hmac.new(bytes(secret), TOKEN_CONTEXT, hashlib.sha256).hexdigest()[:32]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any free one) as ``(host, port)``.

    Raises
    ------
    ValueError
        Not ``HOST:PORT``, or a port outside 0 .. 65535.
    """
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080 (port 0 .. 65535)")
    return host.strip("[]"), int(port)




def token_from_key_file(path: str) -> str:
    """The live view's token for a CURVE secret key file (``NAME.key_secret``, `beamloop keys create`).

    Raises
    ------
    ValueError
        The file is missing, unreadable, or holds no secret key.
    """
    import zmq.auth

    try:
        _, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable key file ({exc})") from None
    if not secret:
        raise ValueError(f"{path}: holds no secret key (give the NAME.key_secret file)")
    return token_from_secret(secret)


if __name__ == "__main__":  # python -m beamloop.edge.monitor.auth CLIENT.key_secret: print the view's token
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m beamloop.edge.monitor.auth CLIENT.key_secret")
    try:
        print(token_from_key_file(sys.argv[1]))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
