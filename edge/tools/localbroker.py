"""A private Mosquitto broker on loopback, for the demo, the tests and the benchmark.

It runs Debian's ``mosquitto`` binary with its own configuration file on 127.0.0.1 and
a free port, waits for the broker to say it is running (no sleeping), and can be
stopped and started again on the same port to simulate a network outage. It can also
run a configuration given whole (``config_text``: the shipped one, in the broker tests)
and reload it as ``systemctl reload mosquitto`` does (:meth:`LocalBroker.reload`).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 15.0


class BrokerUnavailable(RuntimeError):
    """Mosquitto is not installed or did not start."""


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None)
    if found is None:
        raise BrokerUnavailable("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class BrokerTls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_certificate: bool = True


class LocalBroker:
    """One Mosquitto process; ``start()``/``stop()`` may be repeated (same port)."""

    def __init__(self, workdir: Path, *, port: int | None = None, tls: BrokerTls | None = None,
                 persistence: bool = True, password_file: Path | None = None,
                 acl_file: Path | None = None, extra_config: str = "",
                 config_text: str | None = None):
        """``config_text``, if given, is the whole configuration, used as it is: it must
        listen on ``port`` at 127.0.0.1 and log to stderr (Mosquitto's default)."""
        if config_text is not None and port is None:
            raise ValueError("a configuration given whole needs its port")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.persistence = persistence
        self.password_file = password_file
        self.acl_file = acl_file
        self.extra_config = extra_config
        self.config_text = config_text
        self.log_path = self.workdir / "mosquitto.log"
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._reloads = 0
        self._reloaded = threading.Condition()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> Path:
        path = self.workdir / "mosquitto.conf"
        if self.config_text is not None:
            path.write_text(self.config_text)
            return path
        anonymous = self.password_file is None
        lines = [f"listener {self.port} {self.host}", f"allow_anonymous {str(anonymous).lower()}",
                 "log_dest stderr", "log_type error", "log_type warning", "log_type notice",
                 "log_type information",
                 # Subscribers that fall behind must not lose messages in tests and demos.
                 # (Not 0, "unlimited": Mosquitto 2.0.11 then drops any client that has
                 # just been refused a QoS 1 publish by the ACL.)
                 "max_queued_messages 10000000"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto' and cannot write here
        else:
            lines.append(f"user {getpass.getuser()}")
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}",
                      f"keyfile {self.tls.key_file}",
                      f"require_certificate {str(self.tls.require_client_certificate).lower()}"]
        if self.extra_config:
            lines.append(self.extra_config)
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        if self.running:
            return
        config = self._write_config()
        ready = threading.Event()
        failure: list[str] = []
        process = subprocess.Popen([mosquitto_binary(), "-c", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)

        def read_log() -> None:
            with open(self.log_path, "ab") as log, process.stderr as stream:
                for line in stream:
                    log.write(line)
                    log.flush()
                    text = line.decode(errors="replace")
                    if " running" in text and "mosquitto version" in text:
                        ready.set()
                    elif "Error" in text:
                        failure.append(text.strip())
                    elif "Reloading config." in text:
                        with self._reloaded:
                            self._reloads += 1
                            self._reloaded.notify_all()
            ready.set()  # the process ended: wake the waiter either way

        self._reader = threading.Thread(target=read_log, name="mosquitto-log", daemon=True)
        self._reader.start()
        self._process = process
        if not ready.wait(STARTUP_TIMEOUT_S) or process.poll() is not None:
            self.stop()
            detail = "; ".join(failure) or f"see {self.log_path}"
            raise BrokerUnavailable(f"mosquitto did not start on port {self.port}: {detail}")

    def reload(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """SIGHUP, as ``systemctl reload mosquitto``: the ACL, the CRL and the certificates
        are read again. Returns once the broker has done it (it reloads between two
        passes of its single-threaded loop, so every connection after this sees it)."""
        if not self.running:
            raise BrokerUnavailable("the broker is not running")
        with self._reloaded:
            before = self._reloads
            self._process.send_signal(signal.SIGHUP)
            if not self._reloaded.wait_for(lambda: self._reloads > before, timeout):
                raise BrokerUnavailable(f"mosquitto did not reload within {timeout} s")

    def stop(self) -> None:
        """Terminate the broker (it saves its persistence file first) and wait for it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if self._reader is not None:
            self._reader.join(5)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.stop()
