"""A guard pressing the gate button at a steady rate, through the button daemon's control
socket (``guardpost sim press``), from a thread of its own.

Every press is recorded with what became of it. Only a press the device answered with
its event (id and seq, once the event was durable) is a committed alarm that the judge
must find at the platform; the others are counted apart: the device refused it or was
not there to take it (its socket absent: no edge was ever made), or the answer never
came (the daemon died with the press in hand: it may or may not have been committed).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edge.runtime.control import ControlUnavailable, request

CONFIRMED = "confirmed"      # durable: its event id and seq came back
IGNORED = "ignored"          # the device decided it was not a press (reason given)
REFUSED = "refused"          # the daemon answered with an error
UNREACHABLE = "unreachable"  # no button daemon listening: the press was never made
UNANSWERED = "unanswered"    # the connection closed or timed out without an answer


@dataclass(frozen=True)
class Press:
    number: int
    sent_at: float           # time.monotonic()
    answered_at: float       # time.monotonic(): for a confirmed press, when it was durable
    outcome: str
    event_id: str | None = None
    seq: int | None = None
    detail: str = ""


class Presser:
    """``with Presser(device.control) as presser:`` presses every ``interval_s``."""

    def __init__(self, control: Path, *, interval_s: float = 0.1, input_name: str = "gate",
                 hold_s: float = 0.02, answer_timeout_s: float = 20.0):
        self.control = Path(control)
        self.interval_s = interval_s
        self.input_name = input_name
        self.hold_s = hold_s
        self.answer_timeout_s = answer_timeout_s
        self.presses: list[Press] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presser", daemon=True)

    def __enter__(self) -> Presser:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.answer_timeout_s + 5)

    # -- pressing --------------------------------------------------------------------

    def _run(self) -> None:
        number = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            number += 1
            press = self._press(number)
            with self._cond:
                self.presses.append(press)
                self._cond.notify_all()
            # A steady rate: the next press is due one interval after this one was; a
            # press that took longer is followed at once, with no burst to catch up.
            next_at = max(next_at + self.interval_s, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

    def _press(self, number: int) -> Press:
        sent = time.monotonic()
        message = {"op": "press", "input": self.input_name, "hold": self.hold_s}
        try:
            reply = request(self.control, message, timeout=self.answer_timeout_s)
        except ControlUnavailable as err:
            # Before the request was sent (no socket, refused) the press never happened;
            # after it, the daemon went away with it.
            outcome = UNANSWERED if "without a reply" in str(err) else UNREACHABLE
            return Press(number, sent, time.monotonic(), outcome, detail=str(err))
        except (TimeoutError, OSError, ValueError) as err:  # reset, timeout, a torn line
            return Press(number, sent, time.monotonic(), UNANSWERED,
                         detail=f"{type(err).__name__}: {err}")
        answered = time.monotonic()
        if not reply.get("ok"):
            return Press(number, sent, answered, REFUSED, detail=str(reply.get("error")))
        if not reply.get("accepted"):
            return Press(number, sent, answered, IGNORED, detail=str(reply.get("reason")))
        event = reply["event"]
        return Press(number, sent, answered, CONFIRMED, event["id"], event["seq"],
                     detail=json.dumps(event))

    # -- what happened ---------------------------------------------------------------

    def snapshot(self) -> list[Press]:
        with self._cond:
            return list(self.presses)

    def confirmed(self) -> list[Press]:
        return [p for p in self.snapshot() if p.outcome == CONFIRMED]

    def outcomes(self) -> Counter:
        return Counter(p.outcome for p in self.snapshot())

    def wait_confirmed(self, count: int, *, after: int = 0, timeout: float = 60.0) -> None:
        """Until ``count`` presses numbered above ``after`` were confirmed (the device
        records presses again after an injection)."""
        def enough() -> bool:
            return sum(1 for p in self.presses
                       if p.number > after and p.outcome == CONFIRMED) >= count

        with self._cond:
            if not self._cond.wait_for(enough, timeout):
                recent = self.presses[-5:]
                raise AssertionError(f"{count} presses after press {after} were not confirmed "
                                     f"within {timeout:.0f} s; the last ones: {recent}")

    @property
    def last_number(self) -> int:
        with self._cond:
            return self.presses[-1].number if self.presses else 0
