"""Local trust (issue 13): the control sockets ask the kernel who is asking (SO_PEERCRED)
and allow each operation only to whom needs it. No local process but the doctor, a
person of the guardpost-admin group and the alarm test can turn the next press into a
test; a compromised camera daemon may only ask what anyone may."""

from __future__ import annotations

import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from edge.runtime.access import (
    BUTTON_ACCESS,
    CAMERA_ACCESS,
    DAEMON_USERS,
    AccessPolicy,
    Peer,
    Principals,
    Who,
    peer_of,
)
from edge.runtime.control import request
from tests.support.stranger import NOBODY, request_as, start_as

GUARDPOST_GID, ADMIN_GID, VIDEO_GID = 990, 991, 44
BUTTON, SELFTEST, UPLINK, CAMERA, INSTALLER = 2000, 2001, 2002, 2005, 1000

# The accounts of an installed device, without looking at this machine's.
INSTALLED = Principals(own_uid=BUTTON, users={Who.SELFTEST: SELFTEST, Who.UPLINK: UPLINK},
                       admin_gid=ADMIN_GID, admin_members=frozenset({INSTALLER}))


def peer(uid: int, gid: int = GUARDPOST_GID, *groups: int, known: bool = True) -> Peer:
    return Peer(pid=4242, uid=uid, gid=gid,
                groups=frozenset((gid, *groups)) if known else None)


def allowed(table, who: Peer, principals: Principals = INSTALLED) -> set[str]:
    policy = AccessPolicy("button.ctl", table, principals)
    return {op for op in table if policy.refusal(op, who) is None}


ANYONE = {"ping", "status"}


@pytest.mark.parametrize(("who", "expected"), [
    pytest.param(peer(0, 0), set(BUTTON_ACCESS), id="root"),
    pytest.param(peer(CAMERA, GUARDPOST_GID, VIDEO_GID), ANYONE, id="camera daemon"),
    pytest.param(peer(SELFTEST), ANYONE | {"relay-test"}, id="selftest daemon"),
    pytest.param(peer(UPLINK), ANYONE | {"silence"}, id="uplink daemon"),
    pytest.param(peer(BUTTON), ANYONE | {"press"}, id="the button daemon itself"),
    pytest.param(peer(INSTALLER, 1000, GUARDPOST_GID, ADMIN_GID),
                 ANYONE | {"test-press", "relay-test"}, id="admin by supplementary group"),
    pytest.param(peer(INSTALLER, ADMIN_GID), ANYONE | {"test-press", "relay-test"},
                 id="admin by primary group"),
    pytest.param(peer(INSTALLER, 1000, GUARDPOST_GID), ANYONE,
                 id="listed in the group, but not in this process's groups"),
    pytest.param(peer(INSTALLER, 1000, known=False), ANYONE | {"test-press", "relay-test"},
                 id="groups unknown: the group's member list decides"),
    pytest.param(peer(1001, 1001, GUARDPOST_GID), ANYONE, id="another person"),
])
def test_each_local_user_may_ask_the_button_daemon_only_what_it_needs(who, expected):
    assert allowed(BUTTON_ACCESS, who) == expected


def test_only_the_doctor_and_the_platforms_command_take_the_cameras_pictures():
    assert allowed(CAMERA_ACCESS, peer(0, 0)) == {"status", "frame", "snapshot"}
    assert allowed(CAMERA_ACCESS, peer(INSTALLER, 1000, ADMIN_GID)) == {"status", "frame"}
    assert allowed(CAMERA_ACCESS, peer(UPLINK)) == {"status", "snapshot"}
    for daemon in (SELFTEST, CAMERA, BUTTON):
        assert allowed(CAMERA_ACCESS, peer(daemon)) == {"status"}


def test_a_refusal_names_the_peer_and_an_unknown_op_is_unknown_to_everyone():
    policy = AccessPolicy("button.ctl", BUTTON_ACCESS, INSTALLED)
    assert policy.refusal("test-press", peer(NOBODY)) == \
        f"'test-press' is not allowed for uid {NOBODY} (nobody)"
    assert policy.refusal("format-disk", peer(0, 0)) == "unknown op 'format-disk'"


def test_without_the_system_accounts_the_daemons_own_uid_stands_in_for_them():
    """A developer's machine, the tests, a daemon run by hand: the accounts do not exist."""
    existing = [name for name in DAEMON_USERS.values() if _user_exists(name)]
    if existing:
        pytest.skip(f"this machine has the accounts {existing}")
    principals = Principals.resolve(own_uid=54321)
    assert "user guardpost-selftest" in principals.stand_ins
    assert allowed(BUTTON_ACCESS, peer(54321), principals) == set(BUTTON_ACCESS)
    assert allowed(BUTTON_ACCESS, peer(54322, 54322), principals) == ANYONE


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def public_dir():
    """A directory other users may search (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="gp-ctl-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_kernel_tells_the_peers_uid_and_every_group(public_dir):
    path = public_dir / "peek.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        path.chmod(0o666)
        server.listen(1)
        server.settimeout(30)
        child = start_as(NOBODY, NOBODY, path, None, groups=(4242, 4343))
        try:
            conn, _ = server.accept()
            with conn:
                seen = peer_of(conn)
                conn.sendall(b"x")
        finally:
            child.communicate(timeout=30)
    assert (seen.pid, seen.uid, seen.gid) == (child.pid, NOBODY, NOBODY)
    assert seen.groups == {4242, 4343}


def test_a_process_of_another_user_cannot_turn_the_next_press_into_a_test(
        make_config, daemons, open_outbox, public_dir):
    """A camera daemon gone bad (here: uid 65534, which can reach the socket) asks the
    button daemon for "the next press is a test": refused, and the next press is an
    alarm. It may still ask for the status. Root, the doctor run with sudo, may."""
    path, config = make_config(storage={"runtime_dir": str(public_dir / "run")})
    button = daemons("button", path)
    control = config.storage.runtime_dir / "button.ctl"
    config.storage.runtime_dir.chmod(0o711)  # the test's stand-in for the guardpost group
    control.chmod(0o666)

    refused = request_as(NOBODY, NOBODY, control, {"op": "test-press", "timeout": 30})
    assert refused == {"ok": False,
                       "error": f"'test-press' is not allowed for uid {NOBODY} (nobody)"}
    assert request_as(NOBODY, NOBODY, control, {"op": "relay-test", "code": 602})["ok"] is False
    status = request_as(NOBODY, NOBODY, control, {"op": "status"})
    assert status["ok"] is True and status["test_windows"] == {}
    button.wait_for_line("refused 'test-press' from pid")

    press = request(control, {"op": "press", "input": "gate", "hold": 0.05})
    assert press["ok"] and press["accepted"]
    outbox = open_outbox(config)
    assert [tuple(r) for r in outbox.db.execute("SELECT kind FROM events")] == [("alarm",)]

    as_root = request(control, {"op": "test-press", "timeout": 0.1})
    assert as_root == {"ok": False, "error": "no press of gate within 0.1 s"}  # it ran
    if not any(_user_exists(name) for name in DAEMON_USERS.values()):
        assert button.log().count("stands in") == 1  # said once, at start
