"""Who may ask what of a daemon's control socket.

Every daemon runs as its own system user (``guardpost-button``, ``guardpost-uplink``...),
all in the group ``guardpost``, which may connect to the control sockets. Connecting is
not enough for everything: a camera daemon that decodes network video, if compromised,
must not be able to say "the next press is a test" and turn a real alarm into one. So
each operation names who may ask for it, and the socket checks its peer's credentials
as the kernel gives them (``SO_PEERCRED``: they cannot be forged by the client).

Who is who is resolved from user and group names once, at start. Where those accounts
do not exist (a developer's machine, the tests, a daemon run by hand) the daemon's own
uid stands in for each missing one, and it says so once in its log; a peer with another
uid is then still allowed only what any peer may.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)

ADMIN_GROUP = "guardpost-admin"
DAEMON_USERS = {daemon: f"guardpost-{daemon}"
                for daemon in ("button", "uplink", "selftest", "fallback", "camera")}

# Linux's SO_PEERGROUPS (4.13): the peer's supplementary groups. Python has no constant
# for it; 59 on every architecture a Raspberry Pi or a PC uses (asm-generic/socket.h).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Python's getsockopt() takes at most 1024 bytes: 256 groups.
_MAX_GROUPS_BYTES = 1024


class Who(Enum):
    """The principals an operation can be granted to."""

    ANYONE = "anyone"      # any peer that can connect (the socket's mode decides that)
    ROOT = "root"          # uid 0: the installer with sudo, `guardpost doctor` as root
    ADMIN = "admin"        # members of the group guardpost-admin (people commissioning)
    SELF = "self"          # the daemon's own user
    SELFTEST = "selftest"  # the self-test daemon's user (the scheduled alarm test)
    UPLINK = "uplink"      # the uplink daemon's user (the platform's commands)


# The button daemon: `test-press` opens a window in which a press is a test, never an
# alarm: only a person commissioning (the doctor) may. `relay-test` pulses the test relay
# and is judged by the real input: the self-test daemon's schedule and a person's
# `guardpost test-alarm`. `press` exists only in simulation (the daemon refuses it
# otherwise). `silence` is the platform's cmd/silence, which only the uplink receives.
BUTTON_ACCESS: Mapping[str, frozenset[Who]] = {
    "ping": frozenset({Who.ANYONE}),
    "status": frozenset({Who.ANYONE}),
    "test-press": frozenset({Who.ROOT, Who.ADMIN}),
    "relay-test": frozenset({Who.ROOT, Who.ADMIN, Who.SELFTEST}),
    "press": frozenset({Who.ROOT, Who.SELF}),
    "silence": frozenset({Who.ROOT, Who.UPLINK}),
}

# The camera daemon: `frame` writes a picture of every camera into the spool for the
# doctor; `snapshot` is the platform's cmd/snapshot, which only the uplink receives (the
# self-test only asks for the status).
CAMERA_ACCESS: Mapping[str, frozenset[Who]] = {
    "status": frozenset({Who.ANYONE}),
    "frame": frozenset({Who.ROOT, Who.ADMIN}),
    "snapshot": frozenset({Who.ROOT, Who.UPLINK}),
}


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a Unix socket, as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] | None  # None: the kernel could not say (then names decide)

    def describe(self) -> str:
        try:
            name = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            name = "no such user"
        return f"uid {self.uid} ({name})"


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of a connected Unix socket's peer (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int] | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS_BYTES)
    except OSError as err:
        if err.errno not in (errno.ENOPROTOOPT, errno.ERANGE, errno.EINVAL):
            raise
        return None  # an old kernel, or more than 256 groups: membership by name
    count = len(raw) // 4
    return frozenset(struct.unpack(f"{count}I", raw[:count * 4]))


@dataclass(frozen=True)
class Principals:
    """The uids and the group behind each :class:`Who`, resolved once."""

    own_uid: int
    users: Mapping[Who, int]           # SELFTEST, UPLINK... -> uid
    admin_gid: int | None
    admin_members: frozenset[int]      # uids listed in the group (when groups are unknown)
    stand_ins: tuple[str, ...] = ()    # accounts missing here, whose place own_uid takes

    @classmethod
    def resolve(cls, own_uid: int | None = None) -> Principals:
        own = os.geteuid() if own_uid is None else own_uid
        users: dict[Who, int] = {}
        missing: list[str] = []
        for who, daemon in ((Who.SELFTEST, "selftest"), (Who.UPLINK, "uplink")):
            try:
                users[who] = pwd.getpwnam(DAEMON_USERS[daemon]).pw_uid
            except KeyError:
                users[who] = own
                missing.append(f"user {DAEMON_USERS[daemon]}")
        try:
            group = grp.getgrnam(ADMIN_GROUP)
        except KeyError:
            admin_gid, members = None, frozenset({own})
            missing.append(f"group {ADMIN_GROUP}")
        else:
            admin_gid = group.gr_gid
            members = frozenset(_uid(name) for name in group.gr_mem) - {None}
        return cls(own, users, admin_gid, members, tuple(missing))

    def includes(self, who: Who, peer: Peer) -> bool:
        if who is Who.ANYONE:
            return True
        if who is Who.ROOT:
            return peer.uid == 0
        if who is Who.SELF:
            return peer.uid == self.own_uid
        if who is Who.ADMIN:
            if self.admin_gid is None:
                return peer.uid in self.admin_members
            if peer.gid == self.admin_gid:
                return True
            if peer.groups is not None:
                return self.admin_gid in peer.groups
            return peer.uid in self.admin_members
        return peer.uid == self.users[who]


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


class AccessPolicy:
    """One socket's table (operation -> who may) applied to its peers."""

    def __init__(self, socket_name: str, table: Mapping[str, frozenset[Who]],
                 principals: Principals | None = None):
        self.socket_name = socket_name
        self.table = table
        self.principals = principals or Principals.resolve()

    def announce(self) -> None:
        """Say once, at start, whose place this daemon's own uid takes (if anyone's)."""
        p = self.principals
        if p.stand_ins:
            granted = sorted(op for op, whom in self.table.items()
                             if Who.ANYONE not in whom and self.allows(
                                 op, Peer(0, p.own_uid, -1, frozenset())))
            log.info("%s: no %s on this machine: this daemon's own uid %d stands in for "
                     "them (it may ask for %s); other users may only ask for what anyone may",
                     self.socket_name, ", ".join(p.stand_ins), p.own_uid,
                     ", ".join(granted) or "nothing more")

    def allows(self, op: str, peer: Peer) -> bool:
        whom = self.table.get(op, frozenset())
        return any(self.principals.includes(who, peer) for who in whom)

    def refusal(self, op: str, peer: Peer) -> str | None:
        """None if ``peer`` may ask for ``op``; else the reason, for the reply."""
        if op not in self.table:
            return f"unknown op {op!r}"
        if self.allows(op, peer):
            return None
        return f"{op!r} is not allowed for {peer.describe()}"
