"""A daemon's local control socket: one JSON request per line, one JSON reply per line.

The button daemon serves ``{runtime_dir}/button.ctl`` for ``guardpost status`` and, in
simulation, ``guardpost sim press``. Who may connect is decided by the file mode of the
socket (the ``guardpost`` group); who may ask for each operation, by the socket's
:class:`~edge.runtime.access.AccessPolicy` on the peer's kernel credentials. A refused
or malformed request gets an error reply and the daemon carries on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

from edge.runtime.access import AccessPolicy, peer_of

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024

# A handler gets the request and a function telling whether the client is still there
# (a long wait, such as the doctor's "press the button now", ends when it goes away).
Handler = Callable[[dict, Callable[[], bool]], dict]


def _client_still_there(sock: socket.socket) -> bool:
    """After the request line, the client sends nothing more: readable means gone."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


class ControlUnavailable(ConnectionError):
    """Nothing is listening on the control socket (the daemon is not running)."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class _RequestHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        try:
            if len(line) > MAX_REQUEST_BYTES:
                raise ValueError("request too long")
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError('a request is a JSON object with a string "op"')
        except ValueError as err:
            reply = {"ok": False, "error": f"malformed request: {err}"}
        else:
            reply = self._refusal(request["op"])
        if reply is None:
            try:
                reply = self.server.handle_request_dict(  # type: ignore[attr-defined]
                    request, lambda: _client_still_there(self.connection))
            except Exception as err:
                log.exception("control request %r failed", request.get("op"))
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        self.wfile.write(json.dumps(reply, ensure_ascii=False).encode() + b"\n")

    def _refusal(self, op: str) -> dict | None:
        """An error reply if this peer may not ask for ``op``; nothing has happened then."""
        policy: AccessPolicy = self.server.policy  # type: ignore[attr-defined]
        peer = peer_of(self.connection)
        reason = policy.refusal(op, peer)
        if reason is None:
            return None
        log.warning("%s: refused %r from pid %d: %s", policy.socket_name, op, peer.pid,
                    reason)
        return {"ok": False, "error": reason}


class ControlServer:
    """Serves requests on a Unix stream socket, each in its own short-lived thread."""

    def __init__(self, path: Path, handler: Handler, policy: AccessPolicy):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a killed process
        self._server = _Server(str(self.path), _RequestHandler)
        os.chmod(self.path, 0o660)
        self._server.handle_request_dict = handler  # type: ignore[attr-defined]
        self._server.policy = policy  # type: ignore[attr-defined]
        policy.announce()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.5}, name=f"control:{self.path.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, message: dict, timeout: float = 10.0) -> dict:
    """Send one request and return the reply; raises :class:`ControlUnavailable`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise ControlUnavailable(f"{path}: {err.strerror}") from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as replies:
            line = replies.readline()
    if not line:
        raise ControlUnavailable(f"{path}: closed without a reply")
    return json.loads(line)
