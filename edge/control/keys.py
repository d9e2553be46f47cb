"""CURVE key pairs for the control bridge, and the rule that keeps an unauthenticated bridge off the network.

The control bridge moves an electron beam, so nobody but the edge service may talk to it. Over anything
but the loopback interface it therefore uses ZeroMQ's CURVE mechanism (ZMTP 3.0 CurveZMQ, RFC 26 of the
ZeroMQ RFC series: Curve25519 key exchange, every message encrypted and authenticated): the scan
controller's side has a key pair and a folder of the public keys of the clients it accepts; a client has
its own key pair and the controller's public key. Connections from unknown keys are refused during the
handshake, before any request reaches the server.

Files are pyzmq's certificate format (:func:`zmq.auth.create_certificates`): ``NAME.key`` holds the
public key (hand it to the peer), ``NAME.key_secret`` the public and secret key (keep it; created with
mode 0600). The command line (:mod:`beamloop.edge.cli.keys`)::

    beamloop keys create server client --dir keys/          # two key pairs
    beamloop keys authorize keys/client.key --dir keys/authorized/   # let that client in

Binding the bridge to any endpoint that is not loopback (``tcp://127.x.x.x``, ``tcp://localhost``,
``tcp://[::1]``) or host-local (``ipc://``, ``inproc://``) without keys raises
:class:`InsecureBindError`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class InsecureBindError(ValueError):
    """Refused to bind the bridge to a network-reachable endpoint without CURVE keys."""


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, lacks the key it should hold, or a name that is not allowed."""


@dataclass(frozen=True)
class ServerKeys:
    """The scan controller's side: its key pair (Z85 text as bytes, 40 characters each) and the folder of
    public keys (``*.key``) of the clients it lets in."""

    public: bytes
    secret: bytes
    authorized_dir: Path

    @classmethod
    def load(cls, secret_file: str | Path, authorized_dir: str | Path) -> ServerKeys:
        """Read the server's ``NAME.key_secret`` and check the folder of authorized client keys.

        Raises
        ------
        KeyFileError
            The secret file is missing or holds no secret key, or the folder is missing or holds no
            ``*.key`` file (a server nobody may use is a configuration error).
        """
        public, secret = _load_secret(secret_file)
        folder = Path(authorized_dir)
        if not folder.is_dir() or not any(folder.glob("*" + PUBLIC_SUFFIX)):
            raise KeyFileError(f"{folder}: no folder of authorized client public keys (*{PUBLIC_SUFFIX}); "
                               "add one with `beamloop keys authorize CLIENT.key --dir FOLDER`")
        return cls(public, secret, folder)


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair and the public key of the server it talks to (Z85 text as bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(cls, secret_file: str | Path, server_public_file: str | Path) -> ClientKeys:
        """Read the client's ``NAME.key_secret`` and the server's ``SERVER.key``.

        Raises
        ------
        KeyFileError
            A file is missing or does not hold the key it should.
        """
        public, secret = _load_secret(secret_file)
        server_public, _ = _load(server_public_file, need_secret=False)
        return cls(public, secret, server_public)


def _load_secret(path: str | Path) -> tuple[bytes, bytes]:
    public, secret = _load(path, need_secret=True)
    assert secret is not None  # _load raised otherwise
    return public, secret


def _load(path: str | Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:  # pyzmq raises ValueError/OSError/IndexError for damaged files
        raise KeyFileError(f"{path}: not a key file ({type(exc).__name__}: {exc})") from None
    if not public or len(public) != 40 or (need_secret and (not secret or len(secret) != 40)):
        raise KeyFileError(f"{path}: holds no {'secret' if need_secret else 'public'} CURVE key")
    return public, secret


def create_key_pair(key_dir: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``key_dir/NAME.key`` (public) and ``key_dir/NAME.key_secret`` (mode 0600).

    Returns the two paths.

    Raises
    ------
    KeyFileError
        ``name`` is empty or holds a path separator, or the files exist and ``overwrite`` is false.
    RuntimeError
        This libzmq was built without CURVE (``zmq.has("curve")`` is false).
    """
    import zmq.auth

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support; install pyzmq's wheels, which bundle libsodium")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name")
    folder = Path(key_dir)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / (name + PUBLIC_SUFFIX), folder / (name + SECRET_SUFFIX)
    if not overwrite and (public.exists() or secret.exists()):
        raise KeyFileError(f"{public} or {secret} exists already; pass --force to replace it")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    public.chmod(0o644)
    secret.chmod(0o600)
    return public, secret


def authorize(public_file: str | Path, authorized_dir: str | Path) -> Path:
    """Copy a client's public key file into the server's folder of authorized keys; returns the copy.

    Raises
    ------
    KeyFileError
        The file does not hold a public key, or is a secret key file (those never leave their owner).
    """
    src = Path(public_file)
    if src.name.endswith(SECRET_SUFFIX):
        raise KeyFileError(f"{src} is a secret key file; authorize the public one ({src.name[:-len(SECRET_SUFFIX)]}"
                           f"{PUBLIC_SUFFIX})")
    _load(src, need_secret=False)
    folder = Path(authorized_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / (src.stem + PUBLIC_SUFFIX)
    shutil.copyfile(src, dst)
    return dst


def is_local_endpoint(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint can only be reached from this host.

    True for ``ipc://`` and ``inproc://`` and for ``tcp://`` on a loopback address (127.0.0.0/8,
    ``::1``, ``localhost``, interface ``lo``); False for ``tcp://*``, any other address or interface,
    and every other transport.
    """
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    host = host.split(";")[-1]  # "tcp://iface;host:port" names the source then the peer
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(endpoint: str, keys: ServerKeys | None, *, what: str = "control bridge",
               insecure_option: str | None = None) -> None:
    """Refuse to bind a socket that steers the beam to a network-reachable endpoint without keys.

    Parameters
    ----------
    endpoint : str
        The endpoint to bind.
    keys : ServerKeys or None
        The socket's CURVE keys (the frame stream has none yet: pass None).
    what : str
        The socket, in the message: ``"control bridge"`` (default) or ``"frame stream"``.
    insecure_option : str, optional
        The command-line option that allows the bind anyway (e.g. ``"--insecure"``), named in the message.

    Raises
    ------
    InsecureBindError
        ``keys`` is None and ``endpoint`` is not local (:func:`is_local_endpoint`).
    """
    if keys is not None or is_local_endpoint(endpoint):
        return
    if what != "control bridge":
        raise InsecureBindError(
            f"refusing to bind the {what} to {endpoint}: it is neither encrypted nor authenticated, and the "
            "frames it carries decide where the electron beam goes. Bind to tcp://127.0.0.1 (or ipc://) for a "
            "service on this host" + (f", or pass {insecure_option} if this network is trusted"
                                      if insecure_option else ""))
    raise InsecureBindError(
        f"refusing to bind the control bridge to {endpoint} without CURVE keys: anyone who can reach this "
        "address could move the electron beam. Bind to tcp://127.0.0.1 (or ipc://) for a service on this "
        "host, or create keys with `beamloop keys create server client --dir keys/`, authorize the client "
        "with `beamloop keys authorize keys/client.key --dir keys/authorized/` and give the server its keys "
        "(`--keys keys/server.key_secret --authorized keys/authorized/`)")


def secure_server_socket(sock: zmq.Socket, keys: ServerKeys) -> None:
    """Make ``sock`` a CURVE server with ``keys`` (before it binds)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client_socket(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``sock`` a CURVE client with ``keys`` (before it connects)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


class Authenticator:
    """The ZAP handler of one ZeroMQ context: lets in CURVE clients whose public key is in
    ``keys.authorized_dir`` (pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`, one thread).

    One context has at most one; :class:`beamloop.edge.control.server.BridgeServer` gives a secured server a context of
    its own for that reason. Keys added to the folder later are read by :meth:`reload`.
    """

    def __init__(self, context: zmq.Context, keys: ServerKeys) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.keys = keys
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self.reload()

    def reload(self) -> None:
        """Read the folder of authorized public keys again."""
        self._auth.configure_curve(domain="*", location=str(self.keys.authorized_dir))

    def stop(self) -> None:
        """Stop the handler thread."""
        self._auth.stop()
