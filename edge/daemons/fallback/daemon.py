"""The fallback daemon (``guardpost run fallback``): the second path, SMS through a 4G modem.

Professional alarm transmitters use two paths, so that one failed network never silences an
alarm. For every new alarm (not its repeats) this daemon starts a clock when the button
daemon wakes it; if the police platform has not acknowledged the alarm within
``fallback.ack_timeout_s`` (10 s), or at once while the uplink is not connected or the
platform is known to be offline (its presence, :mod:`edge.contract.presence`), it sends
an SMS to the duty numbers:

    watching --(platform acknowledged in time)--> acknowledged   (no SMS)
        \\--(timeout, or uplink down)--> due --(every number sent or given up)--> sent
                                          \\--(every number given up)--> failed

- Once per alarm and number, not once per retry of the uplink. Each number's result is
  on disk before the next number is tried: a daemon killed mid-batch goes on where it was.
- A number the network refuses is tried again every ``retry_s``; after ``max_attempts``
  refusals it is given up (logged, and recorded in the alarm's row). A modem that cannot
  send at all (no SIM, no network, unplugged) counts for nothing: the alarm is tried
  again, after pauses doubling from ``retry_s`` to 5 minutes, for as long as the platform
  has not acknowledged it.
- Rate-limited (``max_sms_per_hour``): alarms due beyond the limit wait and go together in
  the next SMS, never dropped.
- When an SMS has gone, a ``fallback`` event (Contact ID 354, failure to communicate)
  records to whom, the modem's answers and the text, and travels to the platform right
  behind the alarm once the network is back: the platform learns that the second path
  was used.

Every timer here is on the monotonic clock (class 9 of issue 11): NTP's first sync at
boot steps a Pi's wall clock by hours, and neither the acknowledgement timeout nor a
pause between tries may move with it. The rows keep the monotonic deadlines with the
boot they belong to (:mod:`edge.store.sms`); after a reboot a wait starts again from
the restart, with no more than was left of it.

It owns the modem's serial port (:mod:`.modem_port`): SIM state, registration and
signal are read every ``modem.status_interval_s`` and recorded for ``guardpost status``
and the self-test's ``modem`` check (a missing SIM or no registration is a fault there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from drivers.modem import Modem
from edge import __version__
from edge.config import Config
from edge.contract.events import ContactId, EventDraft, EventKind, utc_iso, utc_now
from edge.daemons.fallback.modem_port import ModemPort, sms_text
from edge.daemons.uplink.linkstate import read_link_state
from edge.runtime.clock import boot_id, clock_synchronised
from edge.runtime.daemon import Daemon
from edge.runtime.sdnotify import Watchdog
from edge.runtime.wake import wake
from edge.store.outbox import LockTimeout, Outbox
from edge.store.sms import SmsRow

log = logging.getLogger(__name__)

MAX_WAIT_S = 5.0  # the loop looks again at least this often (uplink state, modem status)
MAX_PAUSE_S = 300.0  # the longest pause between tries while the modem cannot send at all
# A number's result as the `fallback` event tells it (docs/schemas/event.schema.json).
NOTICE_FIELDS = ("state", "references", "parts", "error", "at")


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


class FallbackDaemon(Daemon):
    name = "fallback"
    alarm_path = True  # records or delivers alarms: may write from the alarm reserve

    def __init__(self, config: Config, *, clock: Callable[[], datetime] = utc_now,
                 monotonic: Callable[[], float] = time.monotonic,
                 open_modem: Callable[[], Modem] | None = None):
        super().__init__(config)
        self.clock = clock  # the wall clock: timestamps only
        self.monotonic = monotonic  # every timer
        self._boot = boot_id()
        self.port = ModemPort(config, clock, heartbeat=self._ping,
                              changed=lambda: self.save_state(self._outbox),
                              open_modem=open_modem)
        self.passes = 0  # decisions made (each pass of the loop), for tests to wait on
        self._held_back = 0  # alarms waiting for the hourly SMS limit, as last logged
        self._outbox: Outbox | None = None
        self._next_decision = MAX_WAIT_S

    @property
    def modem_status(self) -> dict:
        return self.port.status

    @property
    def status_reads(self) -> int:
        return self.port.status_reads

    def state(self) -> dict:
        """The modem's last reading and the refused PIN, for ``guardpost status``, the
        self-test and the next start."""
        return {"daemon": self.name, "version": __version__, "modem": self.port.status,
                "port": str(self.config.modem.port), "pin_rejected": self.port.pin_rejected,
                "checked_at": self.port.checked_at}

    # -- main loop ---------------------------------------------------------------------

    def start(self, stack: contextlib.ExitStack) -> str:
        cfg = self.config
        if cfg.fallback is None:
            # Installed everywhere, configured where there is a modem: idle, not failed.
            log.info("no [fallback] in the configuration: the SMS path is off")
            return "no [fallback] configured: idle"
        outbox = self._outbox = self.open_outbox(stack)
        stack.callback(self.port.close)
        saved = outbox.daemons.all().get(self.name)
        if saved:
            self.port.pin_rejected = json.loads(saved[0]).get("pin_rejected")
        self._start_watching(outbox)
        self.every(cfg.modem.status_interval_s, self._read_modem_status, first_in=0)
        log.info("fallback ready: modem %s, SMS to %d duty number(s) after %g s without "
                 "acknowledgement", cfg.modem.port, len(cfg.fallback.duty_numbers),
                 cfg.fallback.ack_timeout_s)
        return f"SMS to {len(cfg.fallback.duty_numbers)} duty number(s)"

    def step(self) -> int | None:
        if self._outbox is None:
            return None  # idle: no [fallback]
        try:
            self._start_watching(self._outbox)
            self._next_decision = self._settle(self._outbox, self.watchdog)
        except LockTimeout as err:
            # Another writer held the outbox too long: nothing was decided; the next pass
            # decides it all again.
            log.warning("the outbox is busy, deciding again shortly: %s", err)
            self._next_decision = 1.0
        self.passes += 1
        return None

    def next_wakeup(self) -> float | None:
        return None if self._outbox is None else min(MAX_WAIT_S, self._next_decision)

    # -- the alarms ----------------------------------------------------------------------

    def _start_watching(self, outbox: Outbox) -> None:
        """A row for every new alarm (not a repeat). At the very first start the history
        is not news: only alarms of the last hour still unacknowledged are watched."""
        timeout_s = self.config.fallback.ack_timeout_s
        seen = outbox.counter("fallback_seen")
        last = outbox.last_seq()
        if seen is not None and seen >= last:
            return  # nothing new: no write (this runs every few seconds, on an SD card)
        with outbox.transaction():
            if seen is None:
                first = outbox.oldest_open_alarm_since(self.clock() - timedelta(hours=1))
                start = first - 1 if first is not None else last
            else:
                start = seen
            wall, mono = self.clock(), self.monotonic()
            for row in outbox.events_after(start, ("alarm",)):
                committed = _parse(row.committed_at)
                # The alarm's age, read once, now (the button wakes this daemon as it
                # commits): from here on the wait runs on the monotonic clock. A wall
                # clock stepped since the commit counts for no more than the whole wait.
                age = min(max(0.0, (wall - committed).total_seconds()), timeout_s)
                outbox.sms.watch(row.id, committed_at=row.committed_at,
                                 due_at=utc_iso(committed + timedelta(seconds=timeout_s)),
                                 boot_id=self._boot, due_mono=mono + timeout_s - age,
                                 remaining_s=timeout_s - age)
            outbox.set_counter("fallback_seen", max(last, start))

    def _delivery_possible(self) -> tuple[bool, str]:
        """What the uplink says of its link right now (its link-state file, refreshed every
        half second and on every change, which also wakes this daemon): whether an alarm
        can reach the platform, and if not why. A missing or stale file or a dead uplink
        process is not connected; a platform whose presence says offline cannot take it."""
        reading = read_link_state(self.config.storage.runtime_dir)
        if reading.can_deliver:
            return True, ""
        return False, ("platform offline" if reading.connected else "uplink down")

    def _settle(self, outbox: Outbox, watchdog: Watchdog) -> float:
        """Decide every open alarm; send what is due. Returns how long until the next
        decision is due (seconds)."""
        now = self.clock()
        uplink_up, down_reason = self._delivery_possible()
        rows = outbox.sms.open()
        due: list[str] = []
        wait = MAX_WAIT_S
        if not rows:
            return wait
        event_states = outbox.event_states(row.event_id for row in rows)
        told_uplink = False
        with outbox.transaction():
            mono = self.monotonic()
            for row in rows:
                event_id, event_state = row.event_id, event_states.get(row.event_id)
                if event_state is None:
                    continue  # its alarm is no longer in the outbox
                if event_state == "acknowledged":
                    if row.state == "watching":
                        outbox.sms.set_state(event_id, "acknowledged")
                    else:  # the police have it now: the retries can stop
                        noticed = self._report(outbox, [event_id])
                        outbox.sms.set_state(event_id, "sent")
                        outbox.sms.add_reason(event_id, "; acknowledged before every number"
                                                        " was reached")
                        told_uplink = told_uplink or noticed
                    continue
                due_mono, next_attempt = self._timers(outbox, row, now, mono)
                if row.state == "watching":
                    left = due_mono - mono
                    if left > 0 and uplink_up:
                        wait = min(wait, left)
                        continue
                    reason = (down_reason if not uplink_up else
                              f"no acknowledgement within {self.config.fallback.ack_timeout_s:g} s")
                    outbox.sms.set_state(event_id, "due", reason=reason)
                if next_attempt is not None and next_attempt > mono:
                    wait = min(wait, next_attempt - mono)
                    continue
                due.append(event_id)
        if told_uplink:
            wake(self.config.storage.runtime_dir, "uplink")
        if due:
            watchdog.ping()
            wait = min(wait, self._send(outbox, due, now))
        return max(0.0, wait)

    def _timers(self, outbox: Outbox, row: SmsRow, now: datetime,
                mono: float) -> tuple[float, float | None]:
        """The row's deadline and next try on this boot's monotonic clock. A row of an
        earlier boot (or written before the timers were monotonic) starts its wait again
        from now, with what was left of it, and may be tried at once."""
        if row.boot_id == self._boot and row.due_mono is not None:
            return row.due_mono, row.next_attempt_mono
        timeout_s = self.config.fallback.ack_timeout_s
        left = row.remaining_s
        if left is None:
            left = (_parse(row.due_at) - now).total_seconds()
        due_mono = mono + min(max(0.0, left), timeout_s)
        outbox.sms.restart_timer(row.event_id, boot_id=self._boot, due_mono=due_mono)
        return due_mono, None

    def _sent_last_hour(self, outbox: Outbox, now: datetime) -> int:
        """SMS sent in the last hour: one per number and sending (an SMS that covered
        several alarms is recorded in each of their rows, and counted once). A send
        "in the future" (the wall clock stepped back since) does not count: a step of
        the clock may let an SMS more through, never hold an alarm's back for hours."""
        since = now - timedelta(hours=1)
        sent: set[tuple[str, str]] = set()
        # sent_at is a row's latest SMS, so no row with a send in the hour is skipped.
        for recipients in outbox.sms.results_sent_since(utc_iso(since)):
            for number, entry in recipients.items():
                sent.update((number, at) for at in entry.get("sent", [])
                            if since <= _parse(at) <= now)
        return len(sent)

    def _send(self, outbox: Outbox, event_ids: list[str], now: datetime) -> float:
        """One SMS, covering every due alarm, to every number that has not had it.

        Each number's result is on disk before the next number is tried: a daemon killed
        mid-batch (the watchdog, a SIGKILL at stop) neither sends to a number twice nor
        forgets the others, and its hourly count and attempts stand."""
        fb = self.config.fallback
        records = outbox.sms.recipients(event_ids)
        numbers = [n for n in fb.duty_numbers if any(
            records[e].get(n, {}).get("state") not in ("sent", "stopped") for e in event_ids)]
        budget = fb.max_sms_per_hour - self._sent_last_hour(outbox, now)
        if numbers and budget <= 0:
            if self._held_back != len(event_ids):  # said once per change, not every pass
                log.warning("SMS rate limit (%d per hour) reached: %d alarm(s) wait",
                            fb.max_sms_per_hour, len(event_ids))
            self._held_back = len(event_ids)
            if any(e.get("reported") is False for r in records.values() for e in r.values()):
                self._finish(outbox, event_ids, None)  # a batch cut short is told
            return 60.0
        self._held_back = 0
        first = outbox.event(event_ids[0])
        text = sms_text(self.config, first, json.loads(first.payload)["code"], len(event_ids))
        outcome = None  # what this sending came to: "tried", or "unable" to send at all
        for number in numbers[:budget]:
            result = self.port.send(number, text)
            self._record(outbox, event_ids, number, result, text,
                         new_round=outcome is None and result["state"] != "unable")
            self._ping()
            if result["state"] == "unable":
                outcome = "unable"  # the others would meet the same modem: wait for it
                break
            outcome = "tried"
        return self._finish(outbox, event_ids, outcome)

    def _record(self, outbox: Outbox, event_ids: list[str], number: str, result: dict,
                text: str, *, new_round: bool) -> None:
        """One number's result, in every alarm's row that had not reached it, durably.

        Only a refusal of the message counts towards ``max_attempts`` (then the number
        is given up); a modem that cannot send at all counts only towards the pause
        before the next try."""
        fb = self.config.fallback
        state = result["state"]
        details = {k: v for k, v in result.items() if k != "state"}
        with outbox.transaction():
            for eid, recipients in outbox.sms.recipients(event_ids).items():
                entry = recipients.get(number, {})
                if entry.get("state") in ("sent", "stopped"):
                    continue  # it had this alarm from an earlier SMS, or was given up
                counts = {"sent": entry.get("sent", []), "refusals": entry.get("refusals", 0),
                          "unable": 0 if state != "unable" else entry.get("unable", 0) + 1}
                if state == "sent":
                    counts["sent"] = [*counts["sent"], result["at"]]
                elif state == "refused":
                    counts["refusals"] += 1
                given_up = state == "refused" and counts["refusals"] >= fb.max_attempts
                # The latest result replaces the last one's details; "reported": not yet
                # told to the platform by a `fallback` event.
                recipients[number] = {
                    "state": "sent" if state == "sent" else "stopped" if given_up else "failed",
                    **counts, **details, "reported": False}
                outbox.sms.record(eid, recipients, text=text,
                                  sent_at=result["at"] if state == "sent" else None)
                if given_up:
                    log.error("alarm %s: giving up on %s after %d refusals (last: %s)", eid,
                              number, counts["refusals"], result.get("error"))
                    outbox.sms.add_reason(
                        eid, f"; gave up on {number} after {counts['refusals']} refusals")
            if new_round:
                outbox.sms.count_attempt(event_ids)

    def _finish(self, outbox: Outbox, event_ids: list[str], outcome: str | None) -> float:
        """The end of a sending: the platform is told, and each alarm is decided: done
        when every number has it or was given up, else tried again after ``retry_s``,
        or, while the modem cannot send at all, after ever longer pauses. Returns the
        seconds until the next try."""
        fb = self.config.fallback
        finished: list[str] = []
        wait = fb.retry_s
        with outbox.transaction():
            noticed = self._report(outbox, event_ids)
            for eid, recipients in outbox.sms.recipients(event_ids).items():
                states = [recipients.get(n, {}).get("state") for n in fb.duty_numbers]
                if all(state in ("sent", "stopped") for state in states):
                    outbox.sms.set_state(eid, "sent" if "sent" in states else "failed")
                    finished.append(eid)
                    continue
                if outcome is None:
                    continue  # nothing was tried (the hourly limit): the plan stands
                if outcome == "unable":
                    streak = max(1, *(recipients.get(n, {}).get("unable", 0)
                                       for n in fb.duty_numbers))
                    wait = min(fb.retry_s * 2 ** (streak - 1), max(fb.retry_s, MAX_PAUSE_S))
                outbox.sms.plan_next_attempt(
                    eid, at=utc_iso(self.clock() + timedelta(seconds=wait)),
                    mono=self.monotonic() + wait, boot_id=self._boot)
        if noticed:
            wake(self.config.storage.runtime_dir, "uplink")
        for eid in finished:
            log.info("SMS path for alarm %s finished", eid)
        return wait

    def _report(self, outbox: Outbox, event_ids: list[str]) -> bool:
        """Inside a transaction: if an SMS went, a `fallback` event with every result for
        these alarms not yet told to the platform (this sending's, or those of one cut
        short by a kill). True if one was written."""
        untold: dict[str, dict] = {}
        covered: list[str] = []
        text = None
        for eid in event_ids:
            row = outbox.sms.get(eid)
            fresh = {n: e for n, e in row.results().items() if e.get("reported") is False}
            if fresh:
                covered.append(eid)
                untold.update(fresh)
                text = text or row.text
        if not any(e["state"] == "sent" for e in untold.values()):
            return False
        notice = outbox.append(EventDraft(
            kind=EventKind.FALLBACK, code=ContactId.FAILURE_TO_COMMUNICATE,
            occurred_at=self.clock(), clock_synced=clock_synchronised(),
            boot_id=boot_id(), detail={
                "path": "sms", "event_ids": covered,
                "recipients": {n: {k: v for k, v in e.items() if k in NOTICE_FIELDS}
                               | {"state": "sent" if e["state"] == "sent" else "failed"}
                               for n, e in untold.items()},
                "text": text}))
        for eid in covered:
            recipients = outbox.sms.get(eid).results()
            for entry in recipients.values():
                entry.pop("reported", None)
            outbox.sms.record(eid, recipients, notice_event_id=notice.id)
        return True

    def _ping(self) -> None:
        """After each exchange with the modem and each number: a batch of SMS, each
        part taking up to modem.sms_timeout_s, must not look like a hung daemon."""
        self.watchdog.ping(force=True)

    def _read_modem_status(self) -> None:
        self.port.read_status()
        self.save_state(self._outbox)
