"""A fault-injecting TCP proxy on 127.0.0.1, owned by the tests, between the uplink and
the broker: the faults of a real link, on demand and at once.

- ``passing()``: bytes go through as they come.
- ``cut()``: every open connection is reset (RST, as a dropped 4G session looks to the
  device); ``refuse=True`` also resets every new one until ``passing()`` (the broker is
  down); ``unreachable=True`` leaves new ones unanswered instead, their SYNs dropped, as
  a network outage looks (the listening socket's queue is kept full).
- ``black_hole()``: connections stay open and nothing is forwarded either way (a
  half-open link: TCP up, nothing arriving); ``new_connections=False`` leaves new ones
  passing, so only the link in use is dead. ``direction="to_broker"`` or
  ``"to_device"`` drops one way only (an asymmetric fault: the broker hears the device
  but its answers never come back, or the reverse).
- ``delay(seconds)``: a round trip takes ``seconds`` (half each way), as over a 4G modem
  in poor signal.
- ``throttle(bytes_per_s)``: each direction carries at most that many bytes a second;
  the proxy stops reading meanwhile, so the sender feels it as TCP back-pressure (a
  congested link), not as a growing queue inside the proxy.

Bytes of one direction always leave in the order they came, whatever the mode changes
in between. One thread runs an asyncio loop; every change is made on that loop and
takes effect before the call returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

CHUNK = 65536
TO_BROKER, TO_DEVICE = "to_broker", "to_device"
BOTH_WAYS = frozenset((TO_BROKER, TO_DEVICE))
_EOF = None  # queued after the last bytes of a direction: the end of its stream


@dataclass(eq=False)
class _Link:
    """One proxied connection: the device's side and the broker's."""

    downstream: asyncio.StreamWriter  # towards the device
    upstream: asyncio.StreamWriter    # towards the broker
    holes: set[str] = field(default_factory=set)  # directions whose bytes are dropped
    tasks: list[asyncio.Task] = field(default_factory=list)
    # Per direction: bytes held back by a delay, (loop time to leave, bytes), in order.
    later: dict[str, collections.deque] = field(
        default_factory=lambda: {TO_BROKER: collections.deque(), TO_DEVICE: collections.deque()})
    senders: dict[str, asyncio.Task] = field(default_factory=dict)

    @property
    def black_holed(self) -> bool:
        return self.holes == BOTH_WAYS


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
        self._rate: float | None = None  # bytes per second each way, or None: unlimited
        self._refuse = False
        self._new_holes: frozenset[str] = frozenset()  # for connections made meanwhile
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
            self.mode, self._delay, self._rate, self._refuse = "pass", 0.0, None, False
            self._new_holes = frozenset()

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

    def black_hole(self, *, new_connections: bool = True, direction: str = "both") -> None:
        holes = BOTH_WAYS if direction == "both" else frozenset((direction,))
        if not holes <= BOTH_WAYS:
            raise ValueError(f"direction is 'both', {TO_BROKER!r} or {TO_DEVICE!r}, "
                             f"not {direction!r}")

        def change() -> None:
            for link in self._links:
                link.holes |= holes
                for way in holes:
                    link.later[way].clear()
            if new_connections:
                self._new_holes = holes
                self.mode = "black-hole" if direction == "both" else f"black-hole {direction}"

        self._on_loop(change)

    def delay(self, round_trip_s: float) -> None:
        def change() -> None:
            self.mode, self._delay = "delay", round_trip_s / 2

        self._on_loop(change)

    def throttle(self, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError("a throttle needs a positive rate")

        def change() -> None:
            self.mode, self._rate = "throttle", float(bytes_per_s)

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
        link = _Link(writer, up_writer, holes=set(self._new_holes))
        self._links.add(link)
        link.tasks = [asyncio.ensure_future(self._pump(link, reader, up_writer, TO_BROKER)),
                      asyncio.ensure_future(self._pump(link, up_reader, writer, TO_DEVICE))]
        await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        self._links.discard(link)
        for task in (*link.tasks, *link.senders.values()):
            task.cancel()
        for side in (writer, up_writer):
            if not side.transport.is_closing():
                side.close()

    async def _pump(self, link: _Link, source: asyncio.StreamReader,
                    sink: asyncio.StreamWriter, way: str) -> None:
        while True:
            try:
                data = await source.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                if way in link.holes:
                    return
                # The end of the stream follows the bytes still on the way.
                self._forward(link, sink, way, _EOF)
                if way in link.senders:
                    with contextlib.suppress(asyncio.CancelledError):
                        await link.senders[way]
                return
            if way in link.holes:
                continue  # read and dropped: the other side hears nothing, ever
            step = max(64, int(self._rate / 20)) if self._rate else len(data)
            for offset in range(0, len(data), step):
                piece = data[offset:offset + step]
                if self._rate:
                    # Not reading meanwhile: the sender's own buffers fill, as on a slow link.
                    await asyncio.sleep(len(piece) / self._rate)
                if way in link.holes:
                    break
                self._forward(link, sink, way, piece)
            if not link.later[way] and not sink.transport.is_closing():
                with contextlib.suppress(ConnectionError, OSError):
                    await sink.drain()

    def _forward(self, link: _Link, sink: asyncio.StreamWriter, way: str,
                 data: bytes | None) -> None:
        """Now, or after the delay, but never ahead of bytes still held back."""
        queue = link.later[way]
        if not self._delay and not queue:
            if data is _EOF:
                _reset(sink)
            elif not sink.transport.is_closing():
                sink.write(data)
            return
        queue.append((self._loop.time() + self._delay, data))
        sender = link.senders.get(way)
        if sender is None or sender.done():
            link.senders[way] = asyncio.ensure_future(self._send_later(link, sink, way))

    async def _send_later(self, link: _Link, sink: asyncio.StreamWriter, way: str) -> None:
        queue = link.later[way]
        while queue:
            leave, data = queue[0]
            wait = leave - self._loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not queue:
                return  # black-holed meanwhile: dropped
            queue.popleft()
            if way in link.holes or sink.transport.is_closing():
                queue.clear()
                return
            if data is _EOF:
                _reset(sink)
                return
            sink.write(data)
