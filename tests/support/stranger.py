"""Another user at a control socket: a child process that takes other credentials
(uid, gid, supplementary groups) before it connects, as a compromised camera daemon or a
person without the right would, and returns the daemon's reply.

The child drops its privileges itself (setgroups, setgid, setuid) instead of being
started with ``subprocess``'s ``user=``: the interpreter may live where that user cannot
read (a pyenv under /root), and the kernel records a socket peer's credentials when it
connects, so only the credentials at ``connect()`` matter. The socket must be reachable
by that user: a directory it may search, a socket mode it may write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NOBODY = 65534

_CHILD = r"""
import json, os, socket, sys
uid, gid, groups, path, message = json.loads(sys.argv[1])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(30)
    sock.connect(path)
    if message is None:
        sock.recv(1)  # hold the connection until the test has looked at it
    else:
        sock.sendall(json.dumps(message).encode() + b"\n")
        sys.stdout.write(sock.makefile("rb").readline().decode())
"""


def start_as(uid: int, gid: int, path: Path, message: dict | None,
             groups: tuple[int, ...] = ()) -> subprocess.Popen:
    """The child, running; ``message=None`` connects and waits for one byte or the end."""
    argument = json.dumps([uid, gid, list(groups), str(path), message])
    return subprocess.Popen([sys.executable, "-I", "-c", _CHILD, argument],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def request_as(uid: int, gid: int, path: Path, message: dict,
               groups: tuple[int, ...] = ()) -> dict:
    """Send ``message`` as that user; the reply (raises if the child failed)."""
    child = start_as(uid, gid, path, message, groups)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    return json.loads(out)
