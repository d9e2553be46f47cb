"""``beamloop keys``: CURVE key pairs for the control bridge (:mod:`beamloop.edge.control.keys`).

::

    beamloop keys create server client --dir keys/                  # two key pairs
    beamloop keys authorize keys/client.key --dir keys/authorized/   # let that client in
"""

from __future__ import annotations

import argparse

from beamloop.edge.control.keys import authorize, create_key_pair


def cmd_create(a: argparse.Namespace) -> int:
    """``beamloop keys create``: one key pair per name in ``a.dir``; exit status.

    Raises
    ------
    beamloop.edge.control.keys.KeyFileError
        A key file exists already (without ``--force``) or a name is not a plain file name.
    """
    for name in a.names:
        public, secret = create_key_pair(a.dir, name, overwrite=a.force)
        print(f"{name}: public key {public} (give to the peer), secret key {secret} (keep private)")
    return 0


def cmd_authorize(a: argparse.Namespace) -> int:
    """``beamloop keys authorize``: copy client public keys into the folder ``a.dir``; exit status.

    Raises
    ------
    beamloop.edge.control.keys.KeyFileError
        A file is missing or holds no public key.
    """
    for f in a.public_keys:
        print(f"authorized {authorize(f, a.dir)}")
    return 0


def register(subparsers) -> None:
    """Add ``beamloop keys create`` and ``beamloop keys authorize`` to the ``beamloop`` command.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``add_subparsers()`` result of the main parser.
    """
    k = subparsers.add_parser("keys", help="CURVE key pairs for the control bridge")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create key pairs NAME.key / NAME.key_secret")
    c.add_argument("names", nargs="+", help="key pair names, e.g. server client")
    c.add_argument("--dir", default="keys", help="folder for the key files")
    c.add_argument("--force", action="store_true", help="replace existing key files")
    c.set_defaults(func=cmd_create)
    z = ks.add_parser("authorize", help="copy client public keys into the server's folder of authorized keys")
    z.add_argument("public_keys", nargs="+", help="client NAME.key files")
    z.add_argument("--dir", default="keys/authorized", help="the server's folder of authorized client keys")
    z.set_defaults(func=cmd_authorize)
