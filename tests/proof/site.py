"""One proof site: a broker, the judge on it, a simulated modem, and one device, with
whatever stands between the device and the broker (nothing, the tests' TCP proxy, or a
network namespace of the test's own)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from edge.tools.localbroker import LocalBroker, free_port
from tests.proof.device import DeviceSettings, ProofDevice
from tests.proof.judge import Judge
from tests.proof.netns import NetworkNamespace
from tests.support.modem_sim import ModemSimulator
from tests.support.proxy import FaultProxy


class ProofBroker(LocalBroker):
    """A LocalBroker that can also crash (kill -9: persistence only as of its last save)."""

    def crash(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        self.stop()  # reaps it and lets its log reader finish


class ProofSite:
    """Made by the ``proof_site`` fixture, which closes everything in reverse order."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack, *, persistence: bool = True,
                 proxy: bool = False, netns: bool = False, modem: bool = True,
                 state_dir: Path | None = None, sections: dict | None = None,
                 broker_config: str = "", env: dict | None = None):
        self.workdir = Path(workdir)
        self.netns = stack.enter_context(NetworkNamespace()) if netns else None
        judge_port = None
        if self.netns is not None:
            # The device reaches the broker on the host's end of the veth pair; the judge
            # on loopback, a listener of its own, so that the device's link going down is
            # not the judge's.
            judge_port = free_port()
            self.broker = ProofBroker(
                self.workdir / "broker", persistence=persistence,
                extra_config=f"listener {judge_port} 127.0.0.1\n{broker_config}")
            self.broker.host = self.netns.host_address
        else:
            self.broker = ProofBroker(self.workdir / "broker", persistence=persistence,
                                      extra_config=broker_config)
        stack.enter_context(self.broker)
        self.proxy = stack.enter_context(FaultProxy(self.broker.port)) if proxy else None
        self.modem = stack.enter_context(ModemSimulator()) if modem else None
        settings = DeviceSettings(
            broker_host=self.broker.host,
            broker_port=self.proxy.port if self.proxy else self.broker.port,
            modem_port=self.modem.port if self.modem else None,
            sections=sections or {},
            command_prefix=self.netns.command_prefix if self.netns else (),
            env=env or {})
        self.device = ProofDevice(self.workdir / "device", state_dir or self.workdir / "state",
                                  settings)
        stack.callback(self.device.close)
        uplink = self.device.config.uplink
        self.judge = Judge("127.0.0.1", judge_port or self.broker.port,
                           self.device.config.topic_prefix,
                           republish_after_s=uplink.republish_after_s,
                           republish_max_s=uplink.republish_max_s)
        # Subscribed (persistent session) before the device publishes anything.
        self.judge.start()
        stack.callback(self.judge.stop)

    def restart_broker(self, *, crash: bool = False, down_s: float = 0.0) -> None:
        """The broker goes away for ``down_s`` and comes back on the same port: SIGTERM
        (it saves its persistence file, if it has one) or kill -9."""
        if crash:
            self.broker.crash()
        else:
            self.broker.stop()
        threading.Event().wait(down_s)  # an outage of that length: presses go on meanwhile
        self.broker.start()
