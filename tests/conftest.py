"""Shared fixtures: a real Mosquitto per test, configuration files, daemons, a platform."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomlkit

from edge.config import Config, load_config
from edge.runtime.sdnotify import NotifyListener
from edge.store.outbox import Outbox
from edge.tools.localbroker import BrokerTls, LocalBroker
from tests.support.daemons import DaemonProcess
from tests.support.device_keys import write_event_key
from tests.support.pki import write_pki
from tests.support.platform import PlatformStandIn
from tests.support.trust import trust_section


def pytest_addoption(parser):
    # Here and not in tests/proof/conftest.py: pytest reads options only from the
    # rootdir's conftest (and plugins), before it collects any sub-directory.
    parser.addoption("--soak", action="store_true", default=False,
                     help="proof suite: hundreds of injections per scenario instead of CI's "
                          "few (200 kills, 50 broker restarts, dozens of network faults)")


def write_toml(path: Path, document: dict) -> Path:
    """Write a configuration document as TOML, and the device's event-signing key where
    it finds it by default (``credentials/`` beside it: signed events)."""
    path.write_text(tomlkit.dumps(document))
    write_event_key(path.parent / "credentials")
    return path


def sim_document(tmp_path: Path, port: int, **sections) -> dict:
    """A simulation configuration (mock GPIO) for a broker on 127.0.0.1:port."""
    doc = {
        "device": {"site_id": "test-school", "device_id": "gate-1", "location": "测试 South gate"},
        "broker": {"host": "127.0.0.1", "port": port, "keepalive": 5, "connect_timeout": 3},
        "trust": trust_section(),
        "uplink": {"heartbeat_interval": 60, "reconnect_min": 0.05, "reconnect_max": 0.5},
        "storage": {"database": str(tmp_path / "state" / "outbox.db"),
                    "runtime_dir": str(tmp_path / "run"),
                    "spool_dir": str(tmp_path / "state" / "spool")},
        "gpio": {"pin_factory": "mock"},
        "inputs": {"gate": {"pin": 17}},
        "outputs": {"status_led": {"pin": 22}, "buzzer": {"pin": 23}},
    }
    for name, values in sections.items():
        if values is None:
            doc.pop(name, None)
        elif name == "inputs":
            doc["inputs"] = values
        else:
            doc.setdefault(name, {}).update(values)
    return doc


@pytest.fixture
def broker(tmp_path):
    with LocalBroker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def make_config(tmp_path, broker):
    """Write a simulation configuration; returns (path, validated Config)."""

    def make(name: str = "guardpost.toml", **sections) -> tuple[Path, Config]:
        path = write_toml(tmp_path / name, sim_document(tmp_path, broker.port, **sections))
        return path, load_config(path)

    return make


@pytest.fixture
def listener(tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    yield notify
    notify.close()


@pytest.fixture
def daemons(listener):
    """Start daemons as processes; every one still running is stopped at the end."""
    started: list[DaemonProcess] = []

    def start(name: str, config_path: Path, **kwargs) -> DaemonProcess:
        process = DaemonProcess(name, config_path, listener, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        with contextlib.suppress(Exception):
            process.stop()
        # Shown by pytest only when the test failed.
        print(f"---- log of {process.name} (pid {process.pid}) ----\n{process.log()}")


@pytest.fixture
def platform(broker):
    """Start a platform stand-in for a configuration; all stand-ins stop at the end."""
    started: list[PlatformStandIn] = []

    def start(config: Config, **kwargs) -> PlatformStandIn:
        stand_in = PlatformStandIn(broker.host, broker.port, config.topic_prefix, **kwargs)
        started.append(stand_in)
        return stand_in.start()

    yield start
    for stand_in in started:
        stand_in.stop()
    for stand_in in started:
        assert not stand_in.schema_problems, "\n".join(stand_in.schema_problems)


@dataclass
class RunningDevice:
    path: Path
    config: Config
    police: PlatformStandIn
    button: DaemonProcess
    uplink: DaemonProcess


@pytest.fixture
def device(make_config, daemons, platform):
    """Button and uplink daemons running, a platform acknowledging alarms, birth seen."""

    def start(**sections) -> RunningDevice:
        path, config = make_config(**sections)
        police = platform(config, ack=True)
        button = daemons("button", path)
        uplink = daemons("uplink", path)
        police.wait_for(lambda p: any(s["state"] == "online" for s in p.on("status")),
                        what="the device's birth")
        return RunningDevice(path, config, police, button, uplink)

    return start


@dataclass
class TlsSite:
    """A broker that requires client certificates, its PKI, and configurations for it."""

    broker: LocalBroker
    pki: dict
    tmp_path: Path

    def config(self, name: str = "tls.toml", *, client_certificate: bool = True, **broker):
        tls = {"ca_file": str(self.pki["ca"][0])}
        if client_certificate:
            tls |= {"cert_file": str(self.pki["device"][0]),
                    "key_file": str(self.pki["device"][1])}
        path = write_toml(self.tmp_path / name, sim_document(
            self.tmp_path, self.broker.port, broker={"tls": tls, **broker}))
        return path, load_config(path)

    def platform(self, config: Config, **kwargs) -> PlatformStandIn:
        return PlatformStandIn(self.broker.host, self.broker.port, config.topic_prefix,
                               client_id="platform-tls", tls={
                                   "ca_certs": str(self.pki["ca"][0]),
                                   "certfile": str(self.pki["device"][0]),
                                   "keyfile": str(self.pki["device"][1])}, **kwargs).start()


@pytest.fixture
def tls_site(tmp_path):
    pki = write_pki(tmp_path / "pki")
    tls = BrokerTls(ca_file=pki["ca"][0], cert_file=pki["broker"][0], key_file=pki["broker"][1])
    with LocalBroker(tmp_path / "tls-broker", tls=tls) as broker:
        yield TlsSite(broker, pki, tmp_path)


@pytest.fixture
def open_outbox():
    opened: list[Outbox] = []

    def open_(config: Config) -> Outbox:
        outbox = Outbox(config.storage.database, config.identity)
        opened.append(outbox)
        return outbox

    yield open_
    for outbox in opened:
        outbox.close()
