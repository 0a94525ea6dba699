"""``guardpost demo``: the whole device in simulation, on any Linux machine.

It starts a private Mosquitto on loopback (the "police broker"), writes a simulation
configuration (gpiozero mock pins), runs ``guardpost run all`` as a child process,
and plays the police platform with ``guardpost watch --ack`` in this process. Then
either you press the simulated button (interactive), or ``--auto`` plays the story
the product promises: a glitch ignored, a press acknowledged, three presses during a
network outage delivered in order when it returns, a reset. ``--auto`` exits 0 only
if every event arrived, in order, without gaps, signed by the device (the police side
verifies each one with the device's public key), and every alarm was acknowledged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from drivers.camera.testcard import write_video
from edge.config import Config, load_config
from edge.contract.event_signature import write_private_key
from edge.daemons.button.latch import reset_alarms
from edge.platform import PlatformSigner
from edge.runtime.clock import wall_now
from edge.runtime.control import request
from edge.runtime.sdnotify import NotifyListener
from edge.store.outbox import Outbox
from edge.tools.localbroker import BrokerUnavailable, LocalBroker
from edge.tools.report import build_report, render_markdown
from edge.tools.status import collect_status, queue_text, status_text
from edge.tools.verify import own_device_keys
from edge.tools.watch import Watcher

DEMO_CONFIG = """\
# Written by `guardpost demo`: a simulated device (mock GPIO) and a local broker.
[device]
site_id = "demo-school"
device_id = "gate-1"
location = "演示小学 南门 (Demo Primary School, south gate)"

[broker]
host = "127.0.0.1"
port = {port}
keepalive = 10

# The police platform's keys (made for this demo; the desk's private key is in
# {workdir}/platform/): only what they sign is believed.
[[trust.platform_keys]]
key_id = "demo-duty-desk"
public_key = "{desk_key}"
roles = ["ack"]

[[trust.platform_keys]]
key_id = "demo-admin"
public_key = "{admin_key}"
roles = ["ack", "command"]

[uplink]
heartbeat_interval = 15
reconnect_min = 0.2
reconnect_max = 2

[storage]
database = "{workdir}/state/outbox.db"
runtime_dir = "{workdir}/run"
spool_dir = "{workdir}/state/spool"

[gpio]
pin_factory = "mock"

[inputs.gate]
pin = 17
label = "Gate panic button"

[inputs.desk]
pin = 27
contact = "normally-closed"
mode = "silent"
label = "Guardhouse desk button (silent)"

[outputs]
status_led = {{ pin = 22 }}
buzzer = {{ pin = 23 }}
# Wired (in the simulation) across the gate button's contacts: the alarm test.
test_relay = {{ pin = 24, input = "gate" }}

# A simulated camera: a test-card video played in a loop, as a live camera would stream.
[cameras.gate-outside]
source = "{workdir}/gate-camera.avi"
loop = true
rate = 2.0
pre_seconds = 3
post_count = 3
width = 0
"""

# The story's events: 4 alarms, a reset, the alarm test and its result.
EVENTS = 7

HELP = """\
  Enter or p [INPUT] [SECONDS]  press a panic button (default: gate, 0.3 s)
  r                             reset the alarm (guardpost reset)
  t                             the end-to-end alarm test (guardpost test-alarm)
  d / u                         take the network down / bring it back up
  s / q                         guardpost status / guardpost queue
  x (or Ctrl-D)                 quit"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, workdir: Path, log_level: str):
        self.workdir = workdir
        self.log_level = log_level
        self.broker = LocalBroker(workdir / "broker")
        self.config_path = workdir / "guardpost.toml"
        self.config: Config | None = None
        self.device: subprocess.Popen | None = None
        self.watcher: Watcher | None = None
        self.listener: NotifyListener | None = None

    def start(self) -> None:
        self.broker.start()
        write_video(self.workdir / "gate-camera.avi", [("counter", 60.0)], fps=10.0)
        keys = self.workdir / "platform"
        keys.mkdir(mode=0o700, exist_ok=True)
        self.desk = PlatformSigner.generate("demo-duty-desk")
        self.admin = PlatformSigner.generate("demo-admin")
        for signer in (self.desk, self.admin):
            signer.save(keys / f"{signer.key_id}.key")
        self.config_path.write_text(DEMO_CONFIG.format(
            port=self.broker.port, workdir=self.workdir, desk_key=self.desk.public_key,
            admin_key=self.admin.public_key))
        # The device's own key signs every event (trust.event_key's default place, as
        # `guardpost provision` makes it); the police side verifies with its public key.
        event_key = self.workdir / "credentials" / "event-signing.key"
        if not event_key.exists():
            write_private_key(event_key)
        self.config = load_config(self.config_path)
        self.listener = NotifyListener(self.workdir / "demo.notify")
        self.device = subprocess.Popen(
            [sys.executable, "-m", "edge", "--log-level", self.log_level, "run", "all",
             "--config", str(self.config_path)], env=self.listener.env())
        pidfd = os.pidfd_open(self.device.pid)
        try:
            if not self.listener.wait_for(self.device.pid, "READY=1", 60, pidfd=pidfd):
                raise RuntimeError("the simulated device did not start (see the log above)")
        finally:
            os.close(pidfd)
        self.watcher = Watcher(self.config.broker, self.config.uplink.topic_root,
                               self.config.device.site_id, ack=True, by="110 duty officer",
                               client_id="demo-police-platform", prefix="[police 110] ",
                               signer=self.desk, device_keys=own_device_keys(self.config))
        self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.device is not None and self.device.poll() is None:
            self.device.send_signal(signal.SIGTERM)
            try:
                self.device.wait(20)
            except subprocess.TimeoutExpired:
                self.device.kill()
        self.broker.stop()
        if self.listener is not None:
            self.listener.close()

    # -- actions -----------------------------------------------------------------------

    def press(self, input_name: str = "gate", hold: float = 0.3) -> dict:
        reply = request(self.config.storage.runtime_dir / "button.ctl",
                        {"op": "press", "input": input_name, "hold": hold}, timeout=hold + 15)
        if not reply.get("ok"):
            print(f"   press refused: {reply.get('error')}")
        elif not reply["accepted"]:
            print(f"   {input_name}: ignored ({reply['reason']})")
        else:
            event = reply["event"]
            kind = f"repeat {event['repeat']}" if event["repeat_of"] else "new alarm"
            print(f"   {input_name}: {kind} recorded durably, seq {event['seq']}")
        return reply

    def reset(self) -> None:
        for event in reset_alarms(self.config, by="demo guard"):
            print(f"   reset {event.draft.input}: recorded as seq {event.seq} (Contact ID 465)")

    def status(self) -> dict:
        with Outbox(self.config.storage.database, self.config.identity) as outbox:
            return collect_status(self.config, outbox)

    def queue(self) -> str:
        with Outbox(self.config.storage.database, self.config.identity) as outbox:
            return queue_text(outbox.summary())

    def wait_until(self, condition, what: str, timeout: float = 20.0) -> bool:
        """The demo watches the device as a person would: by looking again."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while time.monotonic() < deadline:
            if condition():
                return True
            pause.wait(0.05)
        print(f"   !! gave up waiting for {what}")
        return False

    def led(self) -> str:
        return request(self.config.storage.runtime_dir / "button.ctl", {"op": "status"})["led"]

    def camera_frames(self) -> int:
        try:
            status = request(self.config.storage.runtime_dir / "camera.ctl", {"op": "status"})
        except OSError:
            return 0
        return status["cameras"]["gate-outside"]["frames_read"]

    def snapshots_of(self, event_id: str | None) -> list[dict]:
        return [s for s in list(self.watcher.snapshots) if s.get("event_id") == event_id]

    def uplink_connected(self) -> bool:
        return bool(self.status()["uplink"].get("connected"))

    # -- the scripted story ------------------------------------------------------------

    def story(self) -> int:
        ok = True
        say("A 2 ms electrical glitch on the button cable")
        ok &= not self.press("gate", 0.002).get("accepted", True)

        say("A guard presses the gate panic button")
        self.wait_until(lambda: self.camera_frames() >= 30, "3 s of camera video")
        first = self.press("gate")
        ok &= bool(first.get("accepted"))
        ok &= self.watcher.wait_for_events(1, 10)
        ok &= self.wait_until(lambda: self.led() == "steady", "the police acknowledgement")
        print(f"   status LED: {self.led()} (police received it)")
        print(f"   the police verified the alarm's signature with the device's public key: "
              f"{'yes' if self.watcher.verified and not self.watcher.unverified else 'NO'}")
        alarm_id = first.get("event", {}).get("id")
        ok &= self.wait_until(lambda: len(self.snapshots_of(alarm_id)) >= 7,
                              "the camera snapshots")
        phases = [s.get("phase") for s in self.snapshots_of(alarm_id)]
        print(f"   camera: {phases.count('pre')} snapshots from before the press and "
              f"{phases.count('post')} after it at the police so far")

        say("The network goes down (the broker stops)")
        self.broker.stop()
        ok &= self.wait_until(lambda: not self.uplink_connected(), "the uplink to notice")
        for _ in range(3):
            self.press("gate")
        print("   " + self.queue().replace("\n", "\n   "))
        print(f"   status LED: {self.led()} (recorded here, not yet with the police)")

        say("The network returns")
        self.broker.start()
        ok &= self.watcher.wait_for_events(4, 30)
        ok &= self.wait_until(lambda: self.led() == "steady", "the acknowledgements")
        print(f"   status LED: {self.led()}")

        say("The guard resets the alarm")
        self.reset()
        ok &= self.watcher.wait_for_events(5, 10)
        ok &= self.wait_until(lambda: self.led() == "off", "the LED to go off")

        say("The monthly alarm test: the test relay pulses the real gate input")
        test = subprocess.run([sys.executable, "-m", "edge", "test-alarm", "--config",
                               str(self.config_path)], capture_output=True, text=True,
                              timeout=120)
        print("   " + (test.stdout + test.stderr).strip().replace("\n", "\n   "))
        ok &= test.returncode == 0
        ok &= self.watcher.wait_for_events(EVENTS, 10)

        say("Result")
        seen: set[str] = set()
        arrival = []  # sequence numbers in arrival order, first copy of each event
        for event in self.watcher.events:
            if event["id"] not in seen:
                seen.add(event["id"])
                arrival.append(event["seq"])
        status = self.status()
        print(status_text(status))
        month = wall_now().astimezone(self.config.device.zone).strftime("%Y-%m")
        say(f"The monthly record (guardpost report --month {month}), its summary")
        report = build_report(self.config.storage.database, month, self.config.device.zone,
                              identity=self.config.identity,
                              keep_days=self.config.storage.keep_days)
        summary = render_markdown(report).split("## ")[0]
        print("   " + summary.strip().replace("\n", "\n   "))
        ok &= arrival == list(range(1, EVENTS + 1))
        ok &= status["outbox"]["queued"] == 0 and status["outbox"]["sent_unacknowledged"] == 0
        unverified = list(self.watcher.unverified)
        ok &= not unverified and self.watcher.verified >= len(arrival)
        if ok:
            print(f"\nPASS: {len(arrival)} events delivered in order (seq 1..{EVENTS}), none "
                  "missing, every one signed by the device and verified, every alarm and "
                  "test acknowledged")
        else:
            print(f"\nFAIL: sequence numbers as they arrived: {arrival}; outbox {status['outbox']};"
                  f" {self.watcher.verified} signature(s) verified, not verified: {unverified}")
        return 0 if ok else 1

    # -- interactive ---------------------------------------------------------------------

    def interactive(self) -> int:
        print(f"\nThe simulated device is running. In another terminal you can also use:\n"
              f"   guardpost sim press gate --config {self.config_path}\n"
              f"   guardpost status --config {self.config_path}\n\n{HELP}\n")
        while True:
            try:
                line = input("guardpost-demo> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            words = line.split()
            command = words[0] if words else "p"
            try:
                if command == "p":
                    name = words[1] if len(words) > 1 else "gate"
                    hold = float(words[2]) if len(words) > 2 else 0.3
                    self.press(name, hold)
                elif command == "r":
                    self.reset()
                elif command == "t":
                    subprocess.run([sys.executable, "-m", "edge", "test-alarm", "--config",
                                    str(self.config_path)], timeout=120)
                elif command == "d":
                    self.broker.stop()
                    print("   broker stopped: presses are kept in the outbox")
                elif command == "u":
                    self.broker.start()
                    print("   broker started: the backlog drains")
                elif command == "s":
                    print(status_text(self.status()))
                elif command == "q":
                    print(self.queue())
                elif command in ("x", "exit", "quit"):
                    return 0
                else:
                    print(HELP)
            except (OSError, ValueError, BrokerUnavailable) as err:
                print(f"   error: {err}")


def run_demo(*, auto: bool, workdir: Path | None, log_level: str) -> int:
    keep = workdir is not None
    workdir = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="gp-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(workdir.resolve(), log_level)
    try:
        demo.start()
        say(f"Simulated device {demo.config.topic_prefix} running; broker on "
            f"127.0.0.1:{demo.broker.port}; files in {workdir}")
        return demo.story() if auto else demo.interactive()
    except BrokerUnavailable as err:
        print(f"guardpost demo: {err}", file=sys.stderr)
        return 69
    finally:
        demo.stop()
        if not keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
