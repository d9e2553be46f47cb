"""CURVE keys for the control bridge (edge/control/keys.py): key files, the bind rule, secured calls."""

import argparse
import stat

import pytest
import zmq

from beamloop.edge.cli import main
from beamloop.edge.cli.options import (
    add_client_key_arguments,
    add_server_key_arguments,
    client_keys_from_args,
    server_keys_from_args,
)
from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.keys import (
    ClientKeys,
    InsecureBindError,
    KeyFileError,
    ServerKeys,
    authorize,
    check_bind,
    create_key_pair,
    is_local_endpoint,
)
from beamloop.edge.control.protocol import BridgeTimeout
from beamloop.edge.control.server import BridgeServer
from beamloop.edge.frame.scanframe import ScanFrame

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE support")


@pytest.fixture
def keydir(tmp_path):
    assert main(["keys", "create", "server", "client", "intruder", "--dir", str(tmp_path)]) == 0
    assert main(["keys", "authorize", str(tmp_path / "client.key"), "--dir", str(tmp_path / "authorized")]) == 0
    return tmp_path


def test_key_files(keydir):
    for name in ("server", "client", "intruder"):
        assert stat.S_IMODE((keydir / f"{name}.key_secret").stat().st_mode) == 0o600
        pub = (keydir / f"{name}.key").read_text()
        assert "secret-key" not in pub and "public-key" in pub
    assert sorted(p.name for p in (keydir / "authorized").iterdir()) == ["client.key"]
    s = ServerKeys.load(keydir / "server.key_secret", keydir / "authorized")
    c = ClientKeys.load(keydir / "client.key_secret", keydir / "server.key")
    assert c.server_public == s.public and len(s.secret) == 40 and c.public != s.public
    # what must not happen
    with pytest.raises(KeyFileError, match="exists already"):
        create_key_pair(keydir, "server")
    with pytest.raises(KeyFileError, match="secret key file"):
        authorize(keydir / "client.key_secret", keydir / "authorized")
    with pytest.raises(KeyFileError, match="no secret"):
        ClientKeys.load(keydir / "client.key", keydir / "server.key")
    with pytest.raises(KeyFileError, match="no such key file"):
        ServerKeys.load(keydir / "nobody.key_secret", keydir / "authorized")
    with pytest.raises(KeyFileError, match="authorized"):
        ServerKeys.load(keydir / "server.key_secret", keydir / "empty")
    with pytest.raises(KeyFileError, match="plain file name"):
        create_key_pair(keydir, "../x")
    (keydir / "junk.key").write_text("not a certificate")
    with pytest.raises(KeyFileError):
        ClientKeys.load(keydir / "client.key_secret", keydir / "junk.key")


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5556", True), ("tcp://127.3.2.1:*", True), ("tcp://localhost:0", True),
    ("tcp://[::1]:5556", True), ("ipc:///tmp/beamloop-bridge", True), ("inproc://bridge", True),
    ("tcp://*:5556", False), ("tcp://0.0.0.0:5556", False), ("tcp://192.168.1.20:5556", False),
    ("tcp://eth0:5556", False), ("tcp://[::]:5556", False), ("udp://127.0.0.1:5556", False), ("127.0.0.1", False),
])
def test_local_endpoints(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def test_binding_to_the_network_without_keys_is_refused(keydir):
    with pytest.raises(InsecureBindError, match="without CURVE keys") as err:
        BridgeServer("tcp://0.0.0.0:0", {})
    assert "beamloop keys create" in str(err.value)
    with pytest.raises(InsecureBindError):
        BridgeServer("tcp://*:0", {})
    check_bind("tcp://0.0.0.0:5556", ServerKeys.load(keydir / "server.key_secret", keydir / "authorized"))


@pytest.fixture
def secured(keydir, run_server):
    frames = []

    def acquire(args):
        frames.append(args)
        return {"scan": ScanFrame(len(frames), (64, 64), (1.0, 1.0)).as_dict()}

    keys = ServerKeys.load(keydir / "server.key_secret", keydir / "authorized")
    with run_server(BridgeServer("tcp://127.0.0.1:0", {"acquire_frame": acquire}, keys=keys)) as server:
        yield server, frames, keydir


def test_authorized_client_is_served(secured):
    server, frames, keydir = secured
    with BridgeClient(server.endpoint, keys=ClientKeys.load(keydir / "client.key_secret", keydir / "server.key"),
                      timeout_ms=3000) as client:
        assert client.acquire_frame((64, 64), (1.0, 1.0), 2.0).frame_id == 1
        assert client.heartbeat()["watchdog_s"] == 1.0
        # both ends speak CURVE (authenticated, encrypted), not the NULL mechanism of a plain socket
        assert client._sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        assert server.socket.getsockopt(zmq.MECHANISM) == zmq.CURVE and server.socket.getsockopt(zmq.CURVE_SERVER)
    assert len(frames) == 1


@pytest.mark.parametrize("who", ["intruder", "no keys", "wrong server key"])
def test_unauthorized_clients_reach_nothing(secured, who):
    server, frames, keydir = secured
    if who == "intruder":  # a valid key pair the server does not know
        keys = ClientKeys.load(keydir / "intruder.key_secret", keydir / "server.key")
    elif who == "wrong server key":  # an authorized client talking to an impostor's key
        keys = ClientKeys.load(keydir / "client.key_secret", keydir / "intruder.key")
    else:
        keys = None
    with BridgeClient(server.endpoint, keys=keys, timeout_ms=300) as client:
        with pytest.raises(BridgeTimeout):
            client.acquire_frame((64, 64), (1.0, 1.0), 2.0)
    assert frames == [] and server.requests == 0


def test_command_options_name_the_keys(keydir):
    """The options a command that runs a bridge end adds (beamloop.edge.cli.options.add_*_key_arguments) load the
    same keys."""
    sp, cp = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_server_key_arguments(sp)
    add_client_key_arguments(cp)
    assert server_keys_from_args(sp.parse_args([])) is None and client_keys_from_args(cp.parse_args([])) is None
    s = server_keys_from_args(sp.parse_args(["--keys", str(keydir / "server.key_secret"),
                                             "--authorized", str(keydir / "authorized")]))
    c = client_keys_from_args(cp.parse_args(["--keys", str(keydir / "client.key_secret"),
                                             "--server-key", str(keydir / "server.key")]))
    assert c.server_public == s.public and s.authorized_dir == keydir / "authorized"
    with pytest.raises(KeyFileError, match="--authorized"):
        server_keys_from_args(sp.parse_args(["--keys", str(keydir / "server.key_secret")]))
    with pytest.raises(KeyFileError, match="--keys"):
        client_keys_from_args(cp.parse_args(["--server-key", str(keydir / "server.key")]))
