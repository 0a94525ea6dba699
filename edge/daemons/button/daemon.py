"""The button daemon (``guardpost run button``): the first link of the alarm path.

It owns all GPIO. A press travels:

    pin edge (gpiozero thread) -> PanicInputs worker: glitch/hold filter
      -> recorder thread: AlarmLatch.press commits the event durably (synchronous=FULL)
      -> wake the uplink -> buzzer chirp "recorded" -> status LED fast blink
    uplink marks it sent / acknowledged -> wakes us -> LED slow blink / steady + two chirps

The recorder never drops a press: if the commit fails (disk full, database locked for
too long), the press stays in memory, the LED shows the fault pattern, and the commit
is retried every second until it succeeds.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpiozero import DigitalInputDevice

from drivers.gpio import Indicators, PanicInputs, PressReport, open_pin_factory
from drivers.gpio.outputs import LedPattern
from drivers.gpio.sim import SimulatedContact, wire_test_relay
from edge import __version__
from edge.config import Config
from edge.contract.events import ContactId, Event, EventDraft, EventKind, utc_iso, utc_now
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.button.testpulse import RelayWindow, finger_after_pulse
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.control import ControlServer
from edge.runtime.instance import only_instance
from edge.runtime.sdnotify import Watchdog, notify
from edge.runtime.wake import Waker, wake
from edge.store.outbox import ACKNOWLEDGED, QUEUED, Outbox

log = logging.getLogger(__name__)

FEEDBACK_POLL_S = 2.0      # the LED is refreshed at least this often, wake-ups or not
STATE_EVERY_S = 60.0       # how often the daemon records that it is alive
RETRY_RECORD_S = 1.0
COMMIT_STUCK_S = 2.0       # a commit taking longer than this shows the fault pattern
MAX_SIM_HOLD_S = 60.0
MAX_TEST_PRESS_WAIT_S = 120
OUTCOME_WAIT_S = 10.0  # for the recorder to commit a press (it retries a failing disk)
JUDGE_EVERY_S = 0.001  # how often the input's edges after a test pulse are looked at
JUDGE_FOR_AT_MOST_S = 2.0  # then the input's level decides (a contact chattering on)


@dataclass(frozen=True)
class TestSpec:
    """A press to be recorded as a test (never an alarm), and how."""

    code: ContactId
    detail: dict


Waiter = tuple[threading.Event, list]


def _new_waiter() -> Waiter:
    return threading.Event(), []


def _tell(waiter: Waiter, outcome: dict) -> None:
    done, box = waiter
    box.append(outcome)
    done.set()


def _wait(waiter: Waiter, deadline: float) -> dict | None:
    done, box = waiter
    return box[0] if done.wait(max(0.0, deadline - time.monotonic())) else None


@dataclass(frozen=True)
class _AcceptedPress:
    report: PressReport
    occurred_at: datetime
    test: TestSpec | None = None  # a test press, not an alarm
    waiter: Waiter | None = None  # told the outcome of this press alone (not by input)


class _OutcomeWaiters:
    """Lets a ``sim press`` request wait for the decision about the press it caused."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, list[Waiter]] = collections.defaultdict(list)

    def expect(self, input_name: str) -> Waiter:
        waiter = _new_waiter()
        with self._lock:
            self._waiting[input_name].append(waiter)
        return waiter

    def cancel(self, input_name: str, waiter) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiting[input_name].remove(waiter)

    def resolve(self, input_name: str, outcome: dict) -> None:
        """Hand the outcome to those waiting for this input, and for any input ("*")."""
        with self._lock:
            waiters = self._waiting.pop(input_name, []) + self._waiting.pop(ANY_INPUT, [])
        for waiter in waiters:
            _tell(waiter, outcome)


ANY_INPUT = "*"


def _event_summary(event: Event) -> dict:
    d = event.draft
    return {"id": event.id, "seq": event.seq, "kind": d.kind.value, "code": int(d.code),
            "repeat_of": d.repeat_of, "repeat": d.repeat}


class ButtonDaemon:
    """Reads the panic inputs, commits alarms, drives the LED and buzzer."""

    name = "button"

    def __init__(self, config: Config):
        self.config = config
        self.identity = config.identity
        self._accepted: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters = _OutcomeWaiters()
        self._unrecorded = 0
        self._commit_started: float | None = None  # monotonic; set while a commit runs
        self._recorder: threading.Thread | None = None
        # Set by `guardpost doctor` (time.monotonic(), the clock of the local pin
        # factories' edge timestamps): the next press that begins after it is a test.
        self._test_press_asked_at: float | None = None
        self._relay_window: RelayWindow | None = None
        self._relay_lock = threading.Lock()  # one alarm test at a time
        # The recorder's "recorded" feedback and the main loop's refresh from the outbox
        # take turns, so the guard never hears the chirp after the LED has moved on.
        self._feedback_lock = threading.Lock()
        self.outcome_wait_s = OUTCOME_WAIT_S
        self.supervision: dict[str, DigitalInputDevice] = {}
        self._announced_acks: set[str] | None = None  # None until the first refresh
        self._stop = threading.Event()
        self._waker: Waker | None = None
        self.indicators: Indicators | None = None
        self.inputs: PanicInputs | None = None
        self.contacts: dict[str, SimulatedContact] = {}
        self._started_at = utc_now()
        self.ready = threading.Event()  # set with READY=1, for in-process users

    # -- lifecycle -------------------------------------------------------------------

    def wake(self) -> None:
        if self._waker is not None:
            self._waker.wake()

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set; returns (an exit code) after releasing every pin."""
        self._stop = stop
        cfg = self.config
        self._recorder = recorder = threading.Thread(target=self._record_loop, name="recorder",
                                                     daemon=True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(only_instance(cfg.storage.runtime_dir, self.name))
            factory = open_pin_factory(cfg.gpio.pin_factory, cfg.gpio.chip)
            stack.callback(factory.close)
            outbox = stack.enter_context(Outbox(cfg.storage.database, self.identity,
                                                checkpoint=False))
            latch = AlarmLatch(outbox, cfg.inputs)
            relay = cfg.outputs.test_relay
            if cfg.simulated and relay is not None:
                # The fake's wiring: the relay's contact across the panic input's.
                wire_test_relay(factory, relay.pin, relay.active_high,
                                lambda: self.contacts.get(cfg.test_input))
            self.indicators = Indicators(factory, cfg.outputs)
            stack.callback(self.indicators.close)
            # Closed in reverse: the inputs stop first, then the recorder commits
            # whatever presses they had already accepted.
            recorder.start()
            stack.callback(self._stop_recorder, recorder)
            self.inputs = PanicInputs(factory, cfg.inputs, on_report=self._on_report,
                                      on_edge=self._on_edge)
            stack.callback(self.inputs.close)
            if cfg.simulated:
                self.contacts = {name: SimulatedContact(self.inputs.pin(name), spec.contact,
                                                        spec.pull)
                                 for name, spec in cfg.inputs.items()}
            self._waker = stack.enter_context(contextlib.closing(
                Waker(cfg.storage.runtime_dir, self.name)))
            self._open_supervision(factory, stack)
            self.inputs.start()
            control = ControlServer(cfg.storage.runtime_dir / "button.ctl", self._handle_control)
            control.start()
            stack.callback(control.close)

            self._refresh_feedback(outbox, latch)
            self._save_state(outbox)
            self.ready.set()
            notify("READY=1", f"STATUS=watching {len(cfg.inputs)} panic input(s)")
            log.info("button daemon ready: %s, inputs %s", cfg.gpio.pin_factory,
                     ", ".join(f"{n}=GPIO{s.pin}" for n, s in cfg.inputs.items()))
            next_state = utc_now() + timedelta(seconds=STATE_EVERY_S)
            watchdog = Watchdog()
            while not stop.is_set():
                watchdog.ping()
                self._waker.wait(min(FEEDBACK_POLL_S, watchdog.interval or FEEDBACK_POLL_S))
                if stop.is_set():
                    break
                self._refresh_feedback(outbox, latch)
                if not recorder.is_alive():
                    # Exit so that the service manager starts a working daemon again.
                    log.critical("stopping: the recorder thread has died")
                    return 1
                if utc_now() >= next_state:
                    self._save_state(outbox)
                    next_state = utc_now() + timedelta(seconds=STATE_EVERY_S)
            notify("STOPPING=1")
            log.info("button daemon stopping")
        return 0

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

    def _stop_recorder(self, recorder: threading.Thread) -> None:
        self._accepted.put(None)
        recorder.join(10)
        if recorder.is_alive():
            log.critical("recorder did not finish; %d press(es) may not be recorded",
                         self._unrecorded)

    # -- presses ---------------------------------------------------------------------

    def _on_report(self, report: PressReport) -> None:
        """PanicInputs worker thread: hand accepted presses to the recorder."""
        if not report.accepted:
            self._waiters.resolve(report.input, {
                "accepted": False, "reason": report.reason, "edge_ticks": report.edge_ticks,
                "duration_ms": round(report.duration * 1000, 3)})
            return
        occurred_at = utc_now() - timedelta(seconds=report.age)
        window = self._relay_window
        if window is not None and window.claims(report):
            # The alarm test's press: recorded as the test at once, like an alarm, so its
            # latency is the real one. If the input is still held when the pulse is
            # over, a person is pressing: the thread that pulsed the relay then records
            # the alarm too.
            window.occurred_at = occurred_at
            window.report = report
            self._accepted.put(_AcceptedPress(report, occurred_at, test=window.test,
                                              waiter=window.outcome))
            return
        # Decided here, once, for the first press that *began* after the doctor asked:
        # a press already under way, or queued for recording, stays an alarm.
        asked = self._test_press_asked_at
        test = None
        if asked is not None and report.edge_ticks >= asked:
            self._test_press_asked_at = None
            test = TestSpec(ContactId.MANUAL_TEST, {
                "purpose": "commissioning", "covers_wiring": True,
                "held_ms": round(report.duration * 1000, 1)})
        self._accepted.put(_AcceptedPress(report, occurred_at, test=test))

    def _record_loop(self) -> None:
        """Recorder thread: commit each accepted press, in order, retrying until it sticks."""
        cfg = self.config
        backlog: collections.deque[_AcceptedPress] = collections.deque()
        stopping = False
        with Outbox(cfg.storage.database, self.identity, checkpoint=False) as outbox:
            latch = AlarmLatch(outbox, cfg.inputs)
            while not (stopping and not backlog):
                try:
                    item = self._accepted.get(timeout=RETRY_RECORD_S if backlog else None)
                except queue.Empty:
                    item = False
                if item is None:
                    stopping = True
                elif item:
                    backlog.append(item)
                while backlog:
                    press = backlog[0]
                    self._commit_started = time.monotonic()
                    try:
                        if press.test is not None:
                            event = self._record_test_press(outbox, press)
                        else:
                            event = latch.press(press.report.input, press.occurred_at,
                                                press.report.duration)
                    except Exception:
                        self._commit_started = None
                        self._unrecorded = len(backlog)
                        log.critical("could not record a press of %s (%d waiting); retrying",
                                     press.report.input, len(backlog), exc_info=True)
                        if self.indicators:
                            self.indicators.show(LedPattern.FAULT)
                        if stopping:
                            # The process is ending and the disk refuses: all that is
                            # left is to put each press in the journal for a person.
                            for lost in backlog:
                                log.critical("NOT RECORDED: press of %s at %s",
                                             lost.report.input, utc_iso(lost.occurred_at))
                            return
                        break
                    self._commit_started = None
                    backlog.popleft()
                    self._unrecorded = len(backlog)
                    try:
                        self._recorded(press, event)
                    except Exception:  # feedback failing must not stop the recording
                        log.exception("feedback for %s failed", event.id)

    def _record_test_press(self, outbox: Outbox, press: _AcceptedPress) -> Event:
        """A press that is a test (Contact ID 601/602, through the real wiring): the
        installer's commissioning press or the test relay's pulse. Never an alarm, and
        it does not latch."""
        return outbox.commit_event(EventDraft(
            kind=EventKind.TEST, code=press.test.code, occurred_at=press.occurred_at,
            clock_synced=clock_synchronised(), boot_id=boot_id(), input=press.report.input,
            detail=press.test.detail))

    def _recorded(self, press: _AcceptedPress, event: Event) -> None:
        cfg = self.config
        wake(cfg.storage.runtime_dir, "uplink")
        if cfg.fallback is not None and event.kind == EventKind.ALARM:
            wake(cfg.storage.runtime_dir, "fallback")  # starts the acknowledgement clock
        if cfg.cameras:
            wake(cfg.storage.runtime_dir, "camera")  # the snapshots of before the press
        with self._feedback_lock:
            log.info("%s recorded: input %s, seq %d, id %s%s", event.kind.value.upper(),
                     press.report.input, event.seq, event.id,
                     f", repeat {event.draft.repeat} of {event.draft.repeat_of}"
                     if event.draft.repeat_of else "")
            if self.indicators is not None:
                mode = cfg.inputs[press.report.input].mode
                if mode != "silent":
                    self.indicators.chirp(1)
                if event.kind == EventKind.ALARM:
                    self.indicators.show(LedPattern.FAST_BLINK)
                    if mode == "audible" and cfg.outputs.siren and not event.draft.repeat_of:
                        self.indicators.sound_siren(cfg.outputs.siren.sound_for_s)
        outcome = {"accepted": True, "input": press.report.input, "reason": press.report.reason,
                   "edge_ticks": press.report.edge_ticks,
                   "duration_ms": round(press.report.duration * 1000, 3),
                   "event": _event_summary(event)}
        if press.waiter is not None:
            _tell(press.waiter, outcome)
        else:
            self._waiters.resolve(press.report.input, outcome)
        self.wake()

    # -- feedback --------------------------------------------------------------------

    def _refresh_feedback(self, outbox: Outbox, latch: AlarmLatch) -> None:
        """Set the LED from the latest event of each latched input, as the outbox has it."""
        if self.indicators is None:
            return
        with self._feedback_lock:
            self._refresh_feedback_locked(outbox, latch)

    def _refresh_feedback_locked(self, outbox: Outbox, latch: AlarmLatch) -> None:
        if self._recorder is not None and not self._recorder.is_alive():
            log.critical("the recorder thread has died: presses are not being recorded")
            self.indicators.show(LedPattern.FAULT)
            return
        started = self._commit_started
        if started is not None and time.monotonic() - started > COMMIT_STUCK_S:
            # A commit that hangs (a failing SD card, a writer holding the lock) must
            # not look like a recorded alarm.
            log.critical("an alarm commit has been waiting for %.0f s",
                         time.monotonic() - started)
            self.indicators.show(LedPattern.FAULT)
            return
        if self._unrecorded:
            self.indicators.show(LedPattern.FAULT)
            return
        latches = latch.latches()
        states = outbox.event_states(lt.last_event_id for lt in latches.values())
        if self._announced_acks is None:
            # At start, acknowledgements that arrived before are not news: no chirps.
            self._announced_acks = {i for i, state in states.items() if state == ACKNOWLEDGED}
        if not latches:
            self.indicators.show(LedPattern.OFF)
            self.indicators.silence_siren()  # the alarm was reset
            self._announced_acks.clear()
            return
        seen = [states.get(lt.last_event_id, QUEUED) for lt in latches.values()]
        if QUEUED in seen:
            pattern = LedPattern.FAST_BLINK
        elif all(state == ACKNOWLEDGED for state in seen):
            pattern = LedPattern.STEADY
        else:
            pattern = LedPattern.SLOW_BLINK
        for name, lt in latches.items():
            newly_acknowledged = (states.get(lt.last_event_id) == ACKNOWLEDGED
                                  and lt.last_event_id not in self._announced_acks)
            if newly_acknowledged:
                self._announced_acks.add(lt.last_event_id)
                log.info("police platform acknowledged the alarm on %s", name)
                if self.config.inputs.get(name) and self.config.inputs[name].mode != "silent":
                    self.indicators.chirp(2)
        self.indicators.show(pattern)

    def _status(self) -> dict:
        inputs = {}
        for name, spec in self.config.inputs.items():
            inputs[name] = {"pin": spec.pin, "mode": spec.mode,
                            "active": self.inputs.is_active(name) if self.inputs else None}
        return {
            "daemon": self.name, "version": __version__, "pid": os.getpid(),
            "started_at": utc_iso(self._started_at), "pin_factory": self.config.gpio.pin_factory,
            "led": self.indicators.pattern.value if self.indicators else None,
            "unrecorded_presses": self._unrecorded, "inputs": inputs,
            "test_press_pending": self._test_press_asked_at is not None,
            "test_relay": ({"input": self.config.test_input,
                            "pin": self.config.outputs.test_relay.pin}
                           if self.config.outputs.test_relay else None),
            "wiring": self.wiring(),
        }

    def _save_state(self, outbox: Outbox) -> None:
        try:
            outbox.set_daemon_state(self.name, json.dumps(self._status()))
        except Exception:
            log.exception("could not record the daemon state")

    # -- control socket --------------------------------------------------------------

    def _handle_control(self, request: dict, client_alive) -> dict:
        op = request["op"]
        if op == "ping":
            return {"ok": True}
        if op == "status":
            return {"ok": True, **self._status()}
        if op == "press":
            return self._sim_press(request)
        if op == "test-press":
            return self._await_test_press(request, client_alive)
        if op == "relay-test":
            return self._relay_test(request)
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _await_test_press(self, request: dict, client_alive) -> dict:
        """Wait for the installer to press a panic input; that press is recorded as a
        test (601), not an alarm. The request ends, and any later press is an alarm
        again, when the press came, the time is up, or the doctor went away (Ctrl-C)."""
        timeout = request.get("timeout", 30)
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TEST_PRESS_WAIT_S:
            return {"ok": False, "error": "timeout must be a number of seconds, "
                                          f"up to {MAX_TEST_PRESS_WAIT_S}"}
        deadline = time.monotonic() + timeout
        waiter = self._waiters.expect(ANY_INPUT)
        self._test_press_asked_at = time.monotonic()
        try:
            while time.monotonic() < deadline and client_alive():
                done, box = waiter
                if not done.wait(min(0.25, max(0.0, deadline - time.monotonic()))):
                    continue
                outcome = box[0]
                if outcome.get("event", {}).get("kind") == "test":
                    return {"ok": True, **outcome}
                waiter = self._waiters.expect(ANY_INPUT)  # a glitch, or an alarm under way
        finally:
            self._test_press_asked_at = None
            self._waiters.cancel(ANY_INPUT, waiter)
        return {"ok": False, "error": f"no press within {timeout:g} s"}

    def _relay_test(self, request: dict) -> dict:
        """The end-to-end alarm test: pulse the test relay wired across the panic input
        and record the press it causes as a test (601/602).

        Only the press whose first edge coincides with the pulse is the test, and only if
        the input is released when the pulse ends. A press already under way, a latched
        input, or a button still held after the pulse are a person's: never swallowed.
        The answer names the stage that failed: ``edge`` (the input did not see the
        pulse, or a person pressed) or ``committed``.
        """
        cfg = self.config
        relay = self.indicators.test_relay if self.indicators else None
        name = cfg.test_input
        if relay is None or name is None:
            return {"ok": False, "stage": "edge", "error": "no test relay is configured"}
        code = request.get("code", int(ContactId.PERIODIC_TEST))
        if code not in (ContactId.MANUAL_TEST, ContactId.PERIODIC_TEST):
            return {"ok": False, "stage": "edge", "error": "code must be 601 or 602"}
        detail = request.get("detail", {})
        if not isinstance(detail, dict):
            return {"ok": False, "stage": "edge", "error": "detail must be an object"}
        if not self._relay_lock.acquire(blocking=False):
            return {"ok": False, "stage": "edge", "error": "another alarm test is running"}
        try:
            return self._pulse_and_judge(relay, name, TestSpec(ContactId(code), {
                **detail, "method": "relay", "covers_wiring": True,
                "pulse_ms": cfg.outputs.test_relay.pulse_ms}))
        finally:
            self._relay_lock.release()

    def _pulse_and_judge(self, relay, name: str, test: TestSpec) -> dict:
        if self.inputs.is_active(name):
            return {"ok": False, "stage": "edge",
                    "error": f"input {name} is active (a press under way): not tested"}
        with Outbox(self.config.storage.database, self.identity, checkpoint=False) as outbox:
            if name in AlarmLatch(outbox, self.config.inputs).latches():
                return {"ok": False, "stage": "edge",
                        "error": f"input {name} is latched by an alarm: reset it first"}
        pulse_s = self.config.outputs.test_relay.pulse_ms / 1000
        window = self._relay_window = RelayWindow(name, time.monotonic(), test)
        try:
            relay.on()
            self._stop.wait(pulse_s)
        finally:
            released = time.monotonic()  # before off(): its edge must not predate it
            relay.off()
        held = self._finger_after_pulse(window, released)
        self._relay_window = None
        report = window.report
        if report is None:
            return {"ok": False, "stage": "edge",
                    "error": f"input {name} did not see the relay pulse "
                             "(relay, wiring or input fault)"}
        alarm = None
        if held:
            # Never swallowed: the same activation, now a person's press, is an alarm,
            # stamped with the edge it began with. Queued before anything is waited for,
            # so a slow commit of the test cannot keep it from the recorder.
            alarm = _AcceptedPress(report, window.occurred_at, waiter=_new_waiter())
            self._accepted.put(alarm)
        deadline = time.monotonic() + self.outcome_wait_s
        outcome = _wait(window.outcome, deadline)
        if outcome is None:
            log.error("alarm test: the test press was not recorded within %g s (the outbox "
                      "is not taking writes)%s", self.outcome_wait_s,
                      "; the held button's ALARM is queued behind it" if alarm else "")
            answer = {"ok": False, "stage": "committed",
                      "error": "the test press was not recorded in time (see the daemon log)"}
        else:
            answer = {"ok": True, "input": name, "edge_ticks": report.edge_ticks,
                      "occurred_at": utc_iso(window.occurred_at), **outcome}
        if alarm is not None:
            recorded = _wait(alarm.waiter, deadline)
            answer.update(ok=False, stage="edge", alarm=(recorded or {}).get("event"),
                          error=f"input {name} was still held after the pulse: a person "
                                "pressed the button; recorded as an ALARM")
        return answer

    def _finger_after_pulse(self, window: RelayWindow, released: float) -> bool:
        """Judge the input's edges after the pulse (see :mod:`edge.daemons.button.testpulse`) until
        they tell: a person's finger, or the relay alone."""
        spec = self.config.inputs[window.input]
        relay = self.config.outputs.test_relay
        give_up = released + relay.release_ms / 1000 + JUDGE_FOR_AT_MOST_S
        while True:
            now = time.monotonic()
            finger = finger_after_pulse(
                window.edges, released, release=relay.release_ms / 1000,
                bounce=spec.bounce_ms / 1000, need=spec.min_press_ms / 1000, now=now)
            if finger is not None:
                return finger
            if now > give_up:
                return self.inputs.is_active(window.input)
            time.sleep(JUDGE_EVERY_S)

    def _on_edge(self, name: str, ticks: float, active: bool) -> None:
        """Pin driver's thread: raw edges, for an alarm test under way."""
        window = self._relay_window
        if window is not None:
            window.saw_edge(name, ticks, active)

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
        self.contacts[name].press_for(float(hold), self._stop)
        self._stop.wait(spec.bounce_ms / 1000)
        done, box = waiter
        if not done.wait(max(spec.min_press_ms, spec.hold_ms) / 1000 + 10):
            self._waiters.cancel(name, waiter)
            return {"ok": False, "error": "the press was not decided in time (see the daemon log)"}
        return {"ok": True, "input": name, "hold": hold, **box[0]}
