"""``guardpost doctor``: the commissioning check an installer runs before leaving the gate.

Step by step, with progress and a plain PASS / FAIL / SKIP and the reason:

 1. configuration valid            6. test event round trip acknowledged by the platform
 2. GPIO pin factory correct       7. clock synchronised (NTP)
 3. the panic button, pressed now  8. disk space for the outbox
 4. camera                         9. 4G modem
 5. broker reachable over TLS

The press asked for in step 3 goes through the real wiring and the real button daemon,
and is recorded as a *test* (Contact ID 601), never as an alarm. Step 6 waits for the
platform to acknowledge that test (or, without a press, a test committed in software,
labelled as not covering the wiring). ``--json`` prints one document for machines; the
exit code is 0 only if no step failed.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from edge.config import Config, ConfigError, load_config
from edge.contract.events import ContactId, EventDraft, EventKind, utc_now
from edge.daemons.selftest.alarmtest import follow_event
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.control import ControlUnavailable, request
from edge.runtime.mqtt import tls_handshake
from edge.runtime.wake import wake
from edge.store.outbox import Outbox
from edge.store.reserve import MIB, SpaceReserve, alarms_per_reserve

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
MIN_FREE_BYTES = 200 * 1024 * 1024


@dataclass
class Step:
    name: str
    status: str = SKIP
    detail: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


class Doctor:
    def __init__(self, config_path: Path, *, press_timeout: float = 30.0,
                 ack_timeout: float = 30.0, say: Callable[[str], None] = print,
                 press_input: str | None = None):
        self.config_path = Path(config_path)
        self.press_timeout = press_timeout
        self.press_input = press_input  # the input to press; default: the relay's, or the first
        self.ack_timeout = ack_timeout
        self.say = say
        self.config: Config | None = None
        self.steps: list[Step] = []
        self._test_event_id: str | None = None

    CHECKS = ("configuration", "GPIO pin factory", "panic button", "camera",
              "broker over TLS", "test event round trip", "clock synchronised",
              "disk space", "4G modem")

    def run(self) -> bool:
        methods = [self.check_config, self.check_gpio, self.check_press, self.check_camera,
                   self.check_broker, self.check_round_trip, self.check_clock,
                   self.check_disk, self.check_modem]
        for number, (name, method) in enumerate(zip(self.CHECKS, methods, strict=True), 1):
            step = Step(name)
            started = time.monotonic()
            if self.config is None and name != "configuration":
                step.detail = "needs a valid configuration"
            else:
                try:
                    method(step)
                except Exception as err:  # a check that crashes is a failed check, said why
                    step.status, step.detail = FAIL, f"{type(err).__name__}: {err}"
            step.seconds = round(time.monotonic() - started, 3)
            self.steps.append(step)
            self.say(f"[{number}/{len(self.CHECKS)}] {name:24} {step.status}  {step.detail}")
        return all(step.status != FAIL for step in self.steps)

    # -- the checks ----------------------------------------------------------------------

    def check_config(self, step: Step) -> None:
        try:
            self.config = load_config(self.config_path, check_broker_files=True)
        except ConfigError as err:
            step.status, step.detail = FAIL, "; ".join(err.problems)
            return
        c = self.config
        step.status = PASS
        step.detail = (f"{self.config_path}: {c.device.site_id}/{c.device.device_id}, "
                       f"fingerprint {c.fingerprint()}")

    def _button(self, op: dict, timeout: float = 5.0) -> dict | None:
        """The button daemon's answer; None if it is not running."""
        try:
            return request(self.config.storage.runtime_dir / "button.ctl", op, timeout=timeout)
        except ControlUnavailable:
            return None
        except TimeoutError:
            return {"ok": False, "error": f"the button daemon did not answer in {timeout:g} s"}

    def check_gpio(self, step: Step) -> None:
        wanted = self.config.gpio.pin_factory
        status = self._button({"op": "status"})
        if status is not None and not status.get("ok"):
            step.status, step.detail = FAIL, status["error"]
            return
        if status is not None:
            # The running daemon owns the pins: ask it rather than open them twice.
            running = status.get("pin_factory")
            step.status = PASS if running == wanted else FAIL
            step.detail = (f"button daemon running with {running}; inputs "
                           + ", ".join(f"{n}=GPIO{i['pin']}" for n, i in status["inputs"].items()))
            return
        from drivers.gpio import PinFactoryError, open_pin_factory

        try:
            factory = open_pin_factory(wanted, self.config.gpio.chip)
        except PinFactoryError as err:
            step.status, step.detail = FAIL, str(err)
            return
        factory.close()
        step.status = PASS
        step.detail = f"{wanted} opens (the button daemon is not running: start guardpost.target)"

    def check_press(self, step: Step) -> None:
        cfg = self.config
        name = self.press_input or cfg.test_input or next(iter(cfg.inputs))
        if name not in cfg.inputs:
            step.status = FAIL
            step.detail = f"no input {name!r}; inputs: {', '.join(sorted(cfg.inputs))}"
            return
        answer: list = []
        asking = threading.Thread(target=lambda: answer.append(self._button(
            {"op": "test-press", "input": name, "timeout": self.press_timeout},
            timeout=self.press_timeout + 10)), daemon=True)
        asking.start()
        # Ask the installer only once the daemon is listening for the press: one made
        # before would be an alarm.
        pause, deadline = threading.Event(), time.monotonic() + 10
        while asking.is_alive() and time.monotonic() < deadline:
            status = self._button({"op": "status"})
            if status is None or status.get("test_press_pending"):
                break
            pause.wait(0.05)
        if asking.is_alive():
            label = cfg.inputs[name].label
            self.say(f"      press the panic button {name}"
                     f"{f' ({label})' if label else ''} on GPIO{cfg.inputs[name].pin} now "
                     f"(waiting {self.press_timeout:g} s; "
                     "it is recorded as a TEST, not an alarm)")
        asking.join(self.press_timeout + 15)
        reply = answer[0] if answer else {"ok": False, "error": "no answer from the daemon"}
        if reply is None:
            step.status, step.detail = FAIL, "the button daemon is not running"
        elif not reply.get("ok"):
            step.status, step.detail = FAIL, reply.get("error", "no answer")
        else:
            event = reply["event"]
            self._test_event_id = event["id"]
            step.status = PASS
            step.detail = (f"a press of {reply['duration_ms']:.0f} ms on {reply['input']} "
                           f"arrived; recorded as test seq {event['seq']}")
            step.data = {"event": event}

    def check_camera(self, step: Step) -> None:
        if not self.config.cameras:
            step.detail = "no camera configured"
            return
        try:
            reply = request(self.config.storage.runtime_dir / "camera.ctl", {"op": "frame"},
                            timeout=10)
        except ControlUnavailable:
            step.status, step.detail = FAIL, "the camera daemon is not running"
            return
        saved = reply.get("cameras", {})
        failed = [f"{name}: {r['error']}" for name, r in saved.items() if not r["ok"]]
        good = [f"{name}: {r['size']} frame saved to {r['path']}" for name, r in saved.items()
                if r["ok"]]
        step.data = saved
        step.status = FAIL if failed or not saved else PASS
        step.detail = "; ".join(failed + good)

    def check_broker(self, step: Step) -> None:
        """The uplink's own word when it is running; else a TLS handshake with the device
        certificate, and no MQTT. The doctor never connects as the device: a broker that
        binds the client id to the certificate (config/mosquitto) would drop the uplink's
        connection for it, and a clean start would discard the device's stored session
        with the acknowledgements the broker keeps for it."""
        broker = self.config.broker
        where = f"{broker.host}:{broker.port}"
        if broker.tls is None:
            step.status = FAIL
            step.detail = (f"{where} is configured without TLS: alarms must travel encrypted "
                           "(add [broker.tls])")
            return
        uplink = self._uplink_report()
        if uplink is not None and uplink.get("connected"):
            step.status = PASS
            step.detail = (f"{uplink.get('broker', where)} over TLS: the uplink is connected "
                           f"(session {uplink.get('session')}, since "
                           f"{uplink.get('connected_at')})")
            self._check_other_brokers(step, in_use=uplink.get("broker", where).split(" ")[0])
            return
        problem = tls_handshake(broker)
        mutual = " with the device certificate" if broker.tls.cert_file else ""
        if problem is not None:
            step.status, step.detail = FAIL, f"{where}: {problem}"
        elif uplink is not None:
            step.status = FAIL
            step.detail = (f"{where} accepts a TLS connection{mutual}, but the uplink is not "
                           f"connected: {uplink.get('last_error') or 'not yet'}")
        else:
            step.status = PASS
            step.detail = (f"{where} over TLS{mutual} (a TLS handshake only: the uplink is "
                           "not running)")
        self._check_other_brokers(step, in_use=where)

    def _check_other_brokers(self, step: Step, in_use: str) -> None:
        """Every other broker of the list (``broker.alternates``, and the primary when the
        uplink is on an alternate) by a TLS handshake: a backup link that does not work is
        found at commissioning, not during the outage it is there for."""
        broker = self.config.broker
        results = {}
        for host, port in broker.endpoints:
            if f"{host}:{port}" != in_use:
                results[f"{host}:{port}"] = tls_handshake(broker.at(host, port))
        if len(broker.endpoints) == 1:
            return
        step.data["other_brokers"] = {w: problem or "ok" for w, problem in results.items()}
        failed = [f"{w}: {problem}" for w, problem in results.items() if problem is not None]
        if failed:
            step.status = FAIL
            step.detail += "; other brokers of the list: " + "; ".join(failed)
        else:
            step.detail += f"; the {len(results)} other broker(s) of the list accept TLS"

    def _uplink_report(self) -> dict | None:
        """The uplink's latest state, if it is running (reported recently)."""
        from edge.tools.status import stale_after

        with Outbox(self.config.storage.database, self.config.identity) as outbox:
            state = outbox.daemons.all().get("uplink")
        if state is None:
            return None
        raw, updated = state
        age = (utc_now() - datetime.fromisoformat(updated)).total_seconds()
        return None if age > stale_after(self.config) else json.loads(raw)

    def check_round_trip(self, step: Step) -> None:
        with Outbox(self.config.storage.database, self.config.identity) as outbox:
            event_id = self._test_event_id
            if event_id is None:
                event = outbox.commit_event(EventDraft(
                    kind=EventKind.TEST, code=ContactId.MANUAL_TEST, occurred_at=utc_now(),
                    clock_synced=clock_synchronised(), boot_id=boot_id(),
                    detail={"purpose": "commissioning", "covers_wiring": False}))
                event_id = event.id
                wake(self.config.storage.runtime_dir, "uplink")
                step.data["software_test"] = True
            row = follow_event(outbox, event_id, self.ack_timeout)
        stages = {k: getattr(row, k) for k in ("occurred_at", "committed_at", "sent_at",
                                               "acknowledged_at", "acknowledged_by")}
        step.data.update({"event_id": event_id, "stages": stages})
        if row.state == "acknowledged":
            step.status = PASS
            step.detail = (f"test seq {row.seq} acknowledged by "
                           f"{row.acknowledged_by or 'the platform'}")
            if step.data.get("software_test"):
                step.detail += " (software test: does not cover the button's wiring)"
        elif row.state == "sent":
            step.status = FAIL
            step.detail = (f"the broker has test seq {row.seq} but the platform did not "
                           f"acknowledge it within {self.ack_timeout:g} s")
        else:
            step.status = FAIL
            step.detail = (f"test seq {row.seq} did not reach the broker within "
                           f"{self.ack_timeout:g} s (is the uplink running? guardpost status)")

    def check_clock(self, step: Step) -> None:
        if clock_synchronised():
            step.status, step.detail = PASS, "the kernel reports NTP-synchronised time"
        else:
            step.status = FAIL
            step.detail = ("not synchronised: events are stamped clock_synced=false until NTP "
                           "succeeds (check network access to the time servers)")

    def check_disk(self, step: Step) -> None:
        directory = Path(self.config.storage.database).parent
        usage = shutil.disk_usage(directory if directory.exists() else directory.parent)
        reserve = SpaceReserve.of(self.config.storage)
        held = reserve.held()
        step.data = {"free_bytes": usage.free, "total_bytes": usage.total,
                     "reserve_bytes": held, "reserve_alarms": alarms_per_reserve(held)}
        free_mb = usage.free / 1024 / 1024
        if reserve.drawn():
            step.status = FAIL
            step.detail = (f"DISK FULL: the alarm reserve holds {held / MIB:.1f} of "
                           f"{reserve.size // MIB} MB (about {alarms_per_reserve(held)} more "
                           f"alarms); free space on {directory}")
        elif usage.free >= MIN_FREE_BYTES:
            step.status, step.detail = PASS, f"{free_mb:,.0f} MB free for {directory}"
            if held:
                step.detail += (f", alarm reserve {held / MIB:.0f} MB (at least "
                                f"{alarms_per_reserve(held)} alarms on a full disk)")
        else:
            step.status = FAIL
            step.detail = (f"only {free_mb:,.0f} MB free for {directory} "
                           f"(at least {MIN_FREE_BYTES // 1024 // 1024} MB needed)")

    def check_modem(self, step: Step) -> None:
        """The SMS path: from the fallback daemon's last reading while it owns the port
        (two readers of one AT port would take each other's answers), else directly."""
        cfg = self.config
        if cfg.modem is None:
            step.detail = "no [modem] configured (the SMS second path is off)"
            return
        with Outbox(cfg.storage.database, cfg.identity) as outbox:
            saved = outbox.daemons.all().get("fallback")
        fresh = saved is not None and (utc_now() - datetime.fromisoformat(saved[1])
                                       ).total_seconds() < 3 * cfg.modem.status_interval_s
        if fresh:
            status = json.loads(saved[0])["modem"]
            source = "the fallback daemon's reading"
        else:
            from drivers.modem import Modem, ModemError

            try:
                modem = Modem.open_port(str(cfg.modem.port), baudrate=cfg.modem.baudrate,
                                        command_timeout=cfg.modem.command_timeout_s)
                try:
                    status = modem.status().as_dict()
                finally:
                    modem.close()
            except ModemError as err:  # absent, silent, unplugged or garbled: that is the check
                step.status, step.detail = FAIL, str(err)
                return
            source = f"read on {cfg.modem.port}"
        step.data = status
        if not status.get("present"):
            step.status, step.detail = FAIL, f"the modem does not answer: {status.get('error')}"
        elif status.get("problems"):
            step.status, step.detail = FAIL, "; ".join(status["problems"])
        else:
            step.status = PASS
            step.detail = (f"{status.get('model') or 'modem'}: SIM ready, registered "
                           f"({status.get('registration')}), signal "
                           f"{status.get('signal_dbm')} dBm ({source})")

    def report(self) -> dict:
        return {"ok": all(s.status != FAIL for s in self.steps),
                "config": str(self.config_path), "steps": [asdict(s) for s in self.steps]}


def run_doctor(config_path: Path, *, as_json: bool, press_timeout: float,
               ack_timeout: float, press_input: str | None = None) -> int:
    doctor = Doctor(config_path, press_timeout=press_timeout, ack_timeout=ack_timeout,
                    press_input=press_input,
                    say=(lambda text: print(text, file=sys.stderr, flush=True)) if as_json
                    else (lambda text: print(text, flush=True)))
    ok = doctor.run()
    if as_json:
        print(json.dumps(doctor.report(), indent=2, ensure_ascii=False))
    else:
        failed = [s.name for s in doctor.steps if s.status == FAIL]
        print("\nPASS: the device is ready" if ok else f"\nFAIL: {', '.join(failed)}")
    return 0 if ok else 1
