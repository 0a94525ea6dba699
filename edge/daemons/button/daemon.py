"""The button daemon (``guardpost run button``): the first link of the alarm path.

It owns all GPIO. A press travels:

    pin edge (gpiozero thread) -> PanicInputs worker: glitch/hold filter
      -> test window? (windows.py: the relay's pulse, the installer's press) else an alarm
      -> recorder thread (recorder.py): the latch commits it durably (synchronous=FULL)
      -> wake the uplink -> buzzer chirp "recorded" -> status LED fast blink (feedback.py)
    uplink marks it sent / acknowledged -> wakes us -> LED slow blink / steady + two chirps

The recorder never drops a press: a commit that fails or times out on the outbox's lock
is retried until it sticks, the LED showing the fault meanwhile. The main loop waits for
nothing without a bound, so systemd's watchdog is fed while a press waits in memory.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from datetime import timedelta

from gpiozero import DigitalInputDevice, Factory

from drivers.gpio import Indicators, PanicInputs, PressReport, open_pin_factory
from drivers.gpio.sim import SimulatedContact, wire_test_relay
from edge import __version__
from edge.config import Config
from edge.contract.events import ContactId, Event, EventKind, utc_iso, utc_now
from edge.daemons.button.feedback import Feedback
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.button.recorder import AcceptedPress, Recorder
from edge.daemons.button.testpulse import REPORT_GRACE_S, RelayTester
from edge.daemons.button.windows import (
    TestSpec,
    TestWindow,
    TestWindows,
    Waiter,
    WindowBusy,
    new_waiter,
    tell,
)
from edge.runtime.access import BUTTON_ACCESS, AccessPolicy
from edge.runtime.control import ControlServer
from edge.runtime.daemon import Daemon
from edge.runtime.wake import wake
from edge.store.outbox import Outbox

log = logging.getLogger(__name__)

FEEDBACK_POLL_S = 2.0      # the LED is refreshed at least this often, wake-ups or not
STATE_EVERY_S = 60.0       # how often the daemon records that it is alive
MAX_SIM_HOLD_S = 60.0
MAX_TEST_PRESS_WAIT_S = 120
OUTCOME_WAIT_S = 10.0  # for the recorder to commit a press (it retries a failing disk)


class _OutcomeWaiters:
    """Lets a ``sim press`` request wait for the decision about the press it caused."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Waiter]] = collections.defaultdict(list)

    def expect(self, input_name: str) -> Waiter:
        waiter = new_waiter()
        with self._lock:
            self._waiting[input_name].append(waiter)
        return waiter

    def cancel(self, input_name: str, waiter) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiting[input_name].remove(waiter)

    def resolve(self, input_name: str, outcome: dict) -> None:
        with self._lock:
            waiters = self._waiting.pop(input_name, [])
        for waiter in waiters:
            tell(waiter, outcome)


def _event_summary(event: Event) -> dict:
    d = event.draft
    return {"id": event.id, "seq": event.seq, "kind": d.kind.value, "code": int(d.code),
            "repeat_of": d.repeat_of, "repeat": d.repeat}


class ButtonDaemon(Daemon):
    """Reads the panic inputs, commits alarms, drives the LED and buzzer."""

    name = "button"
    alarm_path = True  # records or delivers alarms: may write from the alarm reserve

    def __init__(self, config: Config, *, pin_factory: Factory | None = None):
        super().__init__(config)
        self._pin_factory = pin_factory  # a test's own (mock) factory; else the configured one
        self.windows = TestWindows()
        self.recorder = Recorder(config, self._recorded, self._failing)
        self._waiters = _OutcomeWaiters()
        self.outcome_wait_s = OUTCOME_WAIT_S
        self.supervision: dict[str, DigitalInputDevice] = {}
        self.indicators: Indicators | None = None
        self.feedback: Feedback | None = None
        self.inputs: PanicInputs | None = None
        self.tester: RelayTester | None = None
        self.contacts: dict[str, SimulatedContact] = {}
        self._outbox: Outbox | None = None
        self._latch: AlarmLatch | None = None
        self._started_at = utc_now()

    # -- lifecycle -------------------------------------------------------------------

    def start(self, stack: contextlib.ExitStack) -> str:
        cfg = self.config
        factory = self._pin_factory or open_pin_factory(cfg.gpio.pin_factory, cfg.gpio.chip)
        stack.callback(factory.close)
        self._outbox = self.open_outbox(stack, checkpoint=False)
        self._latch = AlarmLatch(self._outbox, cfg.inputs)
        relay = cfg.outputs.test_relay
        if cfg.simulated and relay is not None:
            # The fake's wiring: the relay's contact across the panic input's.
            wire_test_relay(factory, relay.pin, relay.active_high,
                            lambda: self.contacts.get(cfg.test_input))
        self.indicators = Indicators(factory, cfg.outputs)
        stack.callback(self.indicators.close)
        self.feedback = Feedback(cfg, self.indicators, self.recorder)
        # Closed in reverse: the inputs stop first, then the recorder commits whatever
        # presses they had already accepted.
        self.recorder.start()
        stack.callback(self.recorder.stop)
        self.inputs = PanicInputs(factory, cfg.inputs, on_report=self._on_report,
                                  on_edge=self.windows.saw_edge)
        stack.callback(self.inputs.close)
        if cfg.simulated:
            self.contacts = {name: SimulatedContact(self.inputs.pin(name), spec.contact,
                                                    spec.pull)
                             for name, spec in cfg.inputs.items()}
        self._open_supervision(factory, stack)
        self.tester = RelayTester(cfg, self.indicators.test_relay, self.inputs, self.windows,
                                  self.recorder, self._latched_inputs, self.stop_event)
        self.tester.outcome_wait_s = self.outcome_wait_s
        self.inputs.start()
        control = ControlServer(cfg.storage.runtime_dir / "button.ctl", self._handle_control,
                                AccessPolicy("button.ctl", BUTTON_ACCESS))
        control.start()
        stack.callback(control.close)

        self._refresh()
        self.save_state(self._outbox)
        self.every(FEEDBACK_POLL_S, self._refresh)
        self.every(STATE_EVERY_S, lambda: self.save_state(self._outbox))
        log.info("button daemon ready: %s, inputs %s", cfg.gpio.pin_factory,
                 ", ".join(f"{n}=GPIO{s.pin}" for n, s in cfg.inputs.items()))
        return f"watching {len(cfg.inputs)} panic input(s)"

    def woken(self) -> None:
        self._refresh()

    def step(self) -> int | None:
        if not self.recorder.alive():
            # Exit so that the service manager starts a working daemon again.
            log.critical("stopping: the recorder thread has died")
            return 1
        return None

    def stopping(self) -> None:
        log.info("button daemon stopping")

    def _refresh(self) -> None:
        try:
            self.feedback.refresh(self._outbox, self._latch)
        except Exception as err:  # an outbox that cannot be read now: show it, go on
            log.error("cannot refresh the status LED from the outbox: %s", err)
            self.feedback.failing()

    def _latched_inputs(self) -> set[str]:
        """For control requests, which run on threads of their own: their own connection."""
        with Outbox(self.config.storage.database, self.identity, checkpoint=False) as outbox:
            return set(AlarmLatch(outbox, self.config.inputs).latches())

    def _open_supervision(self, factory, stack: contextlib.ExitStack) -> None:
        """Supervision loops: a wire pair looped at the button, read with a pull-up; it
        reads closed (low) while the cable is whole."""
        for name, spec in self.config.inputs.items():
            if spec.supervision_pin is None:
                continue
            loop = DigitalInputDevice(f"GPIO{spec.supervision_pin}", pull_up=True,
                                      pin_factory=factory)
            stack.callback(loop.close)
            if self.config.simulated:
                loop.pin.drive_low()  # the simulated cable is whole
            self.supervision[name] = loop

    def wiring(self) -> dict[str, str]:
        """``ok`` or ``open`` for each input with a supervision loop."""
        return {name: "ok" if loop.is_active else "open"
                for name, loop in self.supervision.items()}

    # -- presses ---------------------------------------------------------------------

    def _on_report(self, report: PressReport) -> None:
        """PanicInputs worker thread: hand accepted presses to the recorder."""
        if not report.accepted:
            self._waiters.resolve(report.input, {
                "accepted": False, "reason": report.reason, "edge_ticks": report.edge_ticks,
                "duration_ms": round(report.duration * 1000, 3)})
            return
        occurred_at = utc_now() - timedelta(seconds=report.age)
        claimed = self.windows.claim(report)
        if claimed is None:
            self.recorder.submit(AcceptedPress(report, occurred_at))
            return
        # A test press: recorded as the test at once, like an alarm, so its latency is
        # the real one.
        window, also_alarm = claimed
        window.occurred_at = occurred_at
        test = window.test
        if window.kind == "commissioning":
            test = TestSpec(test.code, {**test.detail,
                                        "held_ms": round(report.duration * 1000, 1)})
        if window.closed_at is not None:
            log.warning("a press of %s began in its %s test window and was decided %.1f s "
                        "after the window closed: recorded as that test", report.input,
                        window.kind, time.monotonic() - window.closed_at)
        self.recorder.submit(AcceptedPress(report, occurred_at, test=test,
                                           waiter=window.outcome))
        if also_alarm:
            # The relay test saw a finger on the button after its pulse before this
            # press was decided: the person's press is an alarm too, never swallowed.
            self.recorder.submit(AcceptedPress(report, occurred_at, waiter=new_waiter()))

    def _failing(self) -> None:
        if self.feedback is not None:
            self.feedback.failing()

    def _recorded(self, press: AcceptedPress, event: Event) -> None:
        """Recorder thread, after each commit."""
        cfg = self.config
        wake(cfg.storage.runtime_dir, "uplink")
        if cfg.fallback is not None and event.kind == EventKind.ALARM:
            wake(cfg.storage.runtime_dir, "fallback")  # starts the acknowledgement clock
        if cfg.cameras:
            wake(cfg.storage.runtime_dir, "camera")  # the snapshots of before the press
        if self.feedback is not None:
            self.feedback.recorded(press, event)
        outcome = {"accepted": True, "input": press.report.input, "reason": press.report.reason,
                   "edge_ticks": press.report.edge_ticks,
                   "duration_ms": round(press.report.duration * 1000, 3),
                   "event": _event_summary(event)}
        if press.waiter is not None:
            tell(press.waiter, outcome)  # the test (or the held button) that waits for it
        self._waiters.resolve(press.report.input, outcome)  # `sim press`, which caused it
        self.wake()

    # -- state -------------------------------------------------------------------------

    def state(self) -> dict:
        inputs = {}
        for name, spec in self.config.inputs.items():
            inputs[name] = {"pin": spec.pin, "mode": spec.mode,
                            "active": self.inputs.is_active(name) if self.inputs else None}
        windows = self.windows.busy()
        return {
            "daemon": self.name, "version": __version__, "pid": os.getpid(),
            "started_at": utc_iso(self._started_at), "pin_factory": self.config.gpio.pin_factory,
            "led": self.indicators.pattern.value if self.indicators else None,
            "unrecorded_presses": self.recorder.unrecorded, "inputs": inputs,
            "test_press_pending": "commissioning" in windows.values(),
            "test_windows": windows,
            "test_relay": ({"input": self.config.test_input,
                            "pin": self.config.outputs.test_relay.pin}
                           if self.config.outputs.test_relay else None),
            "wiring": self.wiring(),
        }

    # -- control socket --------------------------------------------------------------

    def _handle_control(self, request: dict, client_alive) -> dict:
        op = request["op"]
        if op == "ping":
            return {"ok": True}
        if op == "status":
            return {"ok": True, **self.state()}
        if op == "press":
            return self._sim_press(request)
        if op == "test-press":
            return self._await_test_press(request, client_alive)
        if op == "relay-test":
            self.tester.outcome_wait_s = self.outcome_wait_s
            return self.tester.run(request)
        if op == "silence":
            return self._silence(request)
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _silence(self, request: dict) -> dict:
        """The platform's cmd/silence (through the uplink): the siren stops; the alarm
        stays latched, only a reset clears it."""
        relay = self.indicators.siren_relay if self.indicators is not None else None
        if relay is None:
            return {"ok": True, "siren": "none"}
        was_on = bool(relay.value)
        self.indicators.silence_siren()
        by = request.get("by")
        log.warning("siren silenced by %s", by if isinstance(by, str) else "the platform")
        return {"ok": True, "siren": "silenced" if was_on else "was off"}

    def _await_test_press(self, request: dict, client_alive) -> dict:
        """Wait for the installer to press one panic input (``input``; by default the
        test relay's, or the first); that press is recorded as a test (601), not an
        alarm. A press on any other input is an alarm, as always. The window closes when
        the press came, the time is up, or the doctor went away (Ctrl-C)."""
        cfg = self.config
        name = request.get("input") or cfg.test_input or next(iter(cfg.inputs))
        if name not in cfg.inputs:
            return {"ok": False, "error": f"no input {name!r}; inputs: {sorted(cfg.inputs)}"}
        timeout = request.get("timeout", 30)
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TEST_PRESS_WAIT_S:
            return {"ok": False, "error": "timeout must be a number of seconds, "
                                          f"up to {MAX_TEST_PRESS_WAIT_S}"}
        opens = time.monotonic()
        window = TestWindow(name, "commissioning", opens, opens + timeout,
                            TestSpec(ContactId.MANUAL_TEST, {"purpose": "commissioning",
                                                             "covers_wiring": True}))
        try:
            self.windows.open(window)
        except WindowBusy as err:
            return {"ok": False, "error": str(err)}
        done, box = window.outcome
        try:
            while not done.is_set() and client_alive():
                remaining = opens + timeout - time.monotonic()
                if remaining <= 0:
                    break
                done.wait(min(0.25, remaining))
        finally:
            self.windows.close(window, time.monotonic())
        if not done.is_set() and (window.report is not None or self.inputs.is_active(name)):
            # A press that began in time, not yet decided or recorded: it is the test.
            window.claimed.wait(REPORT_GRACE_S)
            if window.report is not None:
                done.wait(self.outcome_wait_s)
        if done.is_set():
            return {"ok": True, **box[0]}
        return {"ok": False, "error": f"no press of {name} within {timeout:g} s"}

    def _sim_press(self, request: dict) -> dict:
        if not self.config.simulated:
            return {"ok": False, "error": "sim press needs gpio.pin_factory = 'mock'"}
        name = request.get("input")
        hold = request.get("hold", 0.2)
        if name not in self.contacts:
            return {"ok": False, "error": f"no input {name!r}; inputs: {sorted(self.contacts)}"}
        if not isinstance(hold, int | float) or not 0 <= hold <= MAX_SIM_HOLD_S:
            return {"ok": False,
                    "error": f"hold must be a number of seconds, 0 to {MAX_SIM_HOLD_S}"}
        spec = self.config.inputs[name]
        waiter = self._waiters.expect(name)
        # A whole press: down, held, up, and up long enough to be a release rather than
        # bounce, so that the next simulated press is a new one.
        self.contacts[name].press_for(float(hold), self.stop_event)
        self.stop_event.wait(spec.bounce_ms / 1000)
        done, box = waiter
        if not done.wait(max(spec.min_press_ms, spec.hold_ms) / 1000 + self.outcome_wait_s):
            self._waiters.cancel(name, waiter)
            return {"ok": False, "error": "the press was not decided in time (see the daemon log)"}
        return {"ok": True, "input": name, "hold": hold, **box[0]}

