"""A real three-node NATS cluster with JetStream and MQTT on 127.0.0.1, for tests and benches.

Debian's ``nats-server`` (2.9.10 in bookworm) speaks MQTT 3.1.1 only, and only with
JetStream: sessions, QoS 1 messages and retained messages live in JetStream streams
(``$MQTT_sess``, ``$MQTT_msgs``, ``$MQTT_rmsgs``), created by the first MQTT CONNECT
with as many replicas as the node then sees routed peers (at most 3). Found the hard way:
a CONNECT that comes while only two of three nodes are routed makes R2 streams, and the
loss of either of those two nodes then stalls MQTT on the whole cluster (no quorum:
CONNECTs time out, retained messages are not stored). So every node's configuration
says ``stream_replicas`` (the cluster's size, at most 3), and :meth:`NatsCluster.start`
waits, polling with a deadline (never sleeping blind), for every node to be routed to
all the others (``/routez``), for the JetStream meta leader (``/jsz``), and for a
CONNECT answered by a CONNACK 0 on every node's MQTT port.

Each node has its own ``server_name``, client, cluster, MQTT and monitoring ports, and
JetStream store directory under ``workdir``; :meth:`stop` (SIGTERM, the server's own
shutdown), :meth:`kill` (SIGKILL: a node that dies) and :meth:`restart` (same ports and
store) act on one node. Leaving the context manager stops every process; the store
directories are the caller's (a ``tmp_path``, or a temporary directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from edge.tools.localbroker import BrokerUnavailable, free_port

READY_TIMEOUT_S = 60.0  # three JetStream nodes on a busy two-core machine


def nats_binary() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.path.exists(p)),
        None)


@dataclass
class NatsNode:
    name: str
    workdir: Path
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    process: subprocess.Popen | None = None

    @property
    def mqtt_address(self) -> str:
        return f"{self.host}:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def config(self, routes: list[int], replicas: int) -> str:
        route_urls = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
        return "\n".join([
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.http_port}",
            f'jetstream {{ store_dir: "{self.workdir / "store"}" }}',
            f"cluster {{ name: guardpost, listen: 127.0.0.1:{self.cluster_port}, "
            f"routes: [{route_urls}] }}",
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}, stream_replicas: {replicas} }}",
            "",
        ])

    def monitor(self, page: str) -> dict | None:
        """A monitoring page (``jsz``, ``routez``...), None while the node does not answer."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/{page}", timeout=2) as answer:
                return json.load(answer)
        except (OSError, ValueError):
            return None

    def meta_leader(self) -> str | None:
        return ((self.monitor("jsz") or {}).get("meta_cluster") or {}).get("leader")

    def routed_peers(self) -> set[str]:
        routes = (self.monitor("routez") or {}).get("routes") or []
        return {route.get("remote_name") or route.get("remote_id") for route in routes}


class NatsCluster:
    """Three (or ``size``) ``nats-server`` processes routed to each other."""

    def __init__(self, workdir: Path, size: int = 3):
        binary = nats_binary()
        if binary is None:
            raise BrokerUnavailable("nats-server is not installed (Debian: apt-get install "
                                    "nats-server)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.nodes = [NatsNode(f"n{i + 1}", self.workdir / f"n{i + 1}") for i in range(size)]

    @property
    def addresses(self) -> list[str]:
        """Every node's MQTT ``host:port``, in node order."""
        return [node.mqtt_address for node in self.nodes]

    def _spawn(self, node: NatsNode) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        config = node.workdir / "nats.conf"
        config.write_text(node.config([n.cluster_port for n in self.nodes if n is not node],
                                      min(3, len(self.nodes))))
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen([self.binary, "-c", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, timeout: float = READY_TIMEOUT_S) -> NatsCluster:
        for node in self.nodes:
            self._spawn(node)
        try:
            self.wait_ready(self.nodes, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self, nodes: list[NatsNode], timeout: float = READY_TIMEOUT_S) -> None:
        """Until every node in ``nodes`` is routed to every other running node, knows the
        JetStream meta leader, and answers an MQTT CONNECT with CONNACK 0 (which needs
        the MQTT streams)."""
        deadline = time.monotonic() + timeout
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                if not node.running:
                    raise BrokerUnavailable(f"nats-server {node.name} exited: see {node.log_path}")
                peers = sum(1 for n in self.nodes if n is not node and n.running)
                if (len(node.routed_peers()) >= peers and node.meta_leader()
                        and mqtt_connect_accepted(node.host, node.mqtt_port)):
                    waiting.remove(node)
            if waiting and time.monotonic() >= deadline:
                names = ", ".join(n.name for n in waiting)
                raise BrokerUnavailable(f"NATS nodes {names} not ready for MQTT within "
                                        f"{timeout} s: see {self.workdir}/*/n*.log")
            if waiting:
                time.sleep(0.1)  # polling with a deadline: the cluster elects at its pace

    def meta_leader(self) -> str | None:
        for node in self.nodes:
            if node.running and node.meta_leader():
                return node.meta_leader()
        return None

    def stop(self, index: int) -> None:
        """SIGTERM: the node's own shutdown (it closes its clients' connections)."""
        self._end(self.nodes[index], signal.SIGTERM)

    def kill(self, index: int) -> None:
        """SIGKILL: the node dies as a machine that loses power."""
        self._end(self.nodes[index], signal.SIGKILL)

    def restart(self, index: int, timeout: float = READY_TIMEOUT_S) -> None:
        node = self.nodes[index]
        if node.running:
            raise RuntimeError(f"{node.name} is still running")
        self._spawn(node)
        self.wait_ready([node], timeout)

    @staticmethod
    def _end(node: NatsNode, signum: int) -> None:
        process = node.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self._end(node, signal.SIGTERM)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def mqtt_connect_accepted(host: str, port: int, timeout: float = 3.0) -> bool:
    """One MQTT 3.1.1 CONNECT (clean session, a probe client id) answered by CONNACK 0."""
    client_id = f"probe-{os.getpid()}-{port}".encode()
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 5)  # level 4, clean session
    payload = struct.pack("!H", len(client_id)) + client_id
    body = variable + payload
    packet = b"\x10" + bytes([len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(packet)
            answer = _read_exactly(sock, 4)
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return answer == b"\x20\x02\x00\x00"


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data
