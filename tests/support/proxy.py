"""A fault-injecting TCP proxy on 127.0.0.1, owned by the tests, between the uplink and
the broker: the faults of a real link, on demand and at once.

- ``passing()``: bytes go through as they come.
- ``cut()``: every open connection is reset (RST, as a dropped 4G session looks to the
  device); ``refuse=True`` also resets every new one until ``passing()`` (the broker is
  down); ``unreachable=True`` leaves new ones unanswered instead, their SYNs dropped, as
  a network outage looks (the listening socket's queue is kept full).
- ``black_hole()``: connections stay open and nothing is forwarded either way (a
  half-open link: TCP up, nothing arriving); ``new_connections=False`` leaves new ones
  passing, so only the link in use is dead.
- ``delay(seconds)``: a round trip takes ``seconds`` (half each way), as over a 4G modem
  in poor signal.

One thread runs an asyncio loop; every change is made on that loop and takes effect
before the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One proxied connection: the device's side and the broker's."""

    downstream: asyncio.StreamWriter  # towards the device
    upstream: asyncio.StreamWriter    # towards the broker
    black_holed: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not the orderly FIN of close()."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Listen on 127.0.0.1 (a free port) and forward to ``target_port`` on 127.0.0.1."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1"):
        self.host = "127.0.0.1"
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = "pass"
        self._delay = 0.0              # one way, seconds
        self._refuse = False
        self._hole_new = True
        self._links: set[_Link] = set()
        self.accepted = 0              # connections accepted so far (for tests to wait on)
        self._accepted_cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._full: list[socket.socket] = []  # a listener whose queue is full, and its filler
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, self.host, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        for sock in self._full:
            sock.close()

        async def close() -> None:
            self._server.close()
            for link in list(self._links):
                _reset(link.downstream)
                _reset(link.upstream)
            await asyncio.sleep(0)

        if self._thread.is_alive():
            self._call(close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def _on_loop(self, function) -> None:
        async def run() -> None:
            function()

        self._call(run())

    # -- faults ----------------------------------------------------------------------

    def passing(self) -> None:
        """Forward everything again (connections black-holed so far stay dead)."""
        def change() -> None:
            self.mode, self._delay, self._refuse, self._hole_new = "pass", 0.0, False, True

        if self._full:
            for sock in self._full:
                sock.close()
            self._full = []
            self._server = self._call(asyncio.start_server(self._serve, self.host, self.port))
        self._on_loop(change)

    def cut(self, *, refuse: bool = False, unreachable: bool = False) -> None:
        def change() -> None:
            for link in list(self._links):
                _reset(link.downstream)
                _reset(link.upstream)
            self._links.clear()
            self._refuse = refuse
            if refuse:
                self.mode = "refuse"

        self._on_loop(change)
        if unreachable:
            self.mode = "unreachable"
            self._call(self._stop_listening())
            # A listener that never accepts, its queue filled by one connection: the
            # kernel drops every further SYN, and the connecting side hears nothing.
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(0)
            filler = socket.create_connection((self.host, self.port), timeout=5)
            self._full = [listener, filler]

    async def _stop_listening(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def black_hole(self, *, new_connections: bool = True) -> None:
        def change() -> None:
            for link in self._links:
                link.black_holed = True
            self._hole_new = new_connections
            if new_connections:
                self.mode = "black-hole"

        self._on_loop(change)

    def delay(self, round_trip_s: float) -> None:
        def change() -> None:
            self.mode, self._delay = "delay", round_trip_s / 2

        self._on_loop(change)

    def wait_for_connections(self, count: int, timeout: float = 15.0) -> None:
        """Until ``count`` connections have been accepted in all (the device reconnected)."""
        with self._accepted_cond:
            if not self._accepted_cond.wait_for(lambda: self.accepted >= count, timeout):
                raise AssertionError(f"the proxy saw {self.accepted} connection(s), "
                                     f"not {count}")

    # -- forwarding ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._accepted_cond:
            self.accepted += 1
            self._accepted_cond.notify_all()
        if self._refuse:
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, up_writer, black_holed=self.mode == "black-hole" and self._hole_new)
        self._links.add(link)
        link.tasks = [asyncio.ensure_future(self._pump(link, reader, up_writer)),
                      asyncio.ensure_future(self._pump(link, up_reader, writer))]
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        self._links.discard(link)
        for task in link.tasks:
            task.cancel()
        for side in (writer, up_writer):
            if not side.transport.is_closing():
                side.close()

    async def _pump(self, link: _Link, source: asyncio.StreamReader,
                    sink: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = await source.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                if link.black_holed:
                    return
                if self._delay:  # the end of the stream follows the bytes still on the way
                    self._loop.call_later(self._delay, _reset, sink)
                else:
                    _reset(sink)
                return
            if link.black_holed:
                continue  # read and dropped: the other side hears nothing, ever
            if self._delay:
                # Each chunk leaves after the delay, in order: the link is slow, not lossy.
                self._loop.call_later(self._delay, self._deliver, link, sink, data)
            else:
                sink.write(data)
                with contextlib.suppress(ConnectionError, OSError):
                    await sink.drain()

    @staticmethod
    def _deliver(link: _Link, sink: asyncio.StreamWriter, data: bytes) -> None:
        if link.black_holed or sink.transport.is_closing():
            return
        sink.write(data)
