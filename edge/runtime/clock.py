"""The device's one wall clock, and the facts about time that every event records.

Every wall-clock reading of Guardpost comes from here: :func:`wall_now` (an aware UTC
datetime), :func:`wall_ns` and :func:`wall_time` (Unix time), and
:func:`clock_synchronised` (whether NTP has set the clock). Timers, deadlines and
intervals never read the wall clock: they use ``time.monotonic()``, which no step of the
wall clock moves.

A Raspberry Pi has no real-time clock: until NTP has synchronised after boot, the wall
clock may be far off, and NTP's first sync steps it by hours or years. Each event
therefore says whether the kernel considered the clock synchronised when it was
stamped, and which boot it came from, so the platform can correct or flag the time
(SIA DC-09 receivers check a timestamp against a window of about 40 s in the past to
20 s in the future; the device stamps and flags, and never rejects anything itself).

**Simulation only** (like gpiozero's mock pin factory): with ``GUARDPOST_SIM_CLOCK``
set to a file's path, every reading here is moved by the file's ``offset_s`` and
:func:`clock_synchronised` answers its ``synced`` (``{"offset_s": 86400, "synced":
true}``; a missing file or key: no offset, the kernel's answer). Tests step the clock of
real daemon processes forwards and backwards with it. The file is looked at with one
``stat`` per reading and parsed only when it changed (write it whole, by rename); with
the variable unset (every real device) a reading costs one attribute test more than
``datetime.now``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

SIM_CLOCK_ENV = "GUARDPOST_SIM_CLOCK"

_TIME_ERROR = 5  # adjtimex(2): clock not synchronised (STA_UNSYNC set)
_TIMEX_SIZE = 512  # larger than struct timex on every Linux ABI; only `modes` is read


@functools.cache
def _adjtimex():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    func = libc.adjtimex
    func.argtypes = [ctypes.c_void_p]
    func.restype = ctypes.c_int
    return func


# -- the wall clock ---------------------------------------------------------------------


def wall_now() -> datetime:
    """Now, as an aware UTC datetime: every event's, row's and message's time."""
    sim = _simulation()
    if sim is None:
        return datetime.now(UTC)
    return datetime.now(UTC) + timedelta(seconds=sim.reading().offset_s)


def wall_ns() -> int:
    """Now, in nanoseconds of Unix time (the time part of event ids)."""
    sim = _simulation()
    if sim is None:
        return time.time_ns()
    return time.time_ns() + round(sim.reading().offset_s * 1e9)


def wall_time() -> float:
    """Now, in seconds of Unix time (a camera frame's capture time)."""
    sim = _simulation()
    if sim is None:
        return time.time()
    return time.time() + sim.reading().offset_s


def clock_synchronised() -> bool:
    """True when the kernel's clock discipline reports synchronised time (or, under
    simulation, when the simulation file says so).

    This is what ``timedatectl``'s "System clock synchronized" reads, and it works for
    systemd-timesyncd, chrony and ntpd alike. A read-only call (modes = 0) needs no
    privilege.
    """
    sim = _simulation()
    if sim is not None and (synced := sim.reading().synced) is not None:
        return synced
    return _kernel_synchronised()


def _kernel_synchronised() -> bool:
    try:
        buffer = ctypes.create_string_buffer(_TIMEX_SIZE)
        state = _adjtimex()(buffer)
    except (OSError, AttributeError) as err:  # not Linux, or no libc symbol
        _warn_once(f"adjtimex unavailable ({err}): events say clock_synced=false")
        return False
    if state == -1:
        # A seccomp filter (systemd's SystemCallFilter=) or an odd kernel: say so once
        # rather than stamp every event "not synchronised" in silence.
        _warn_once(f"adjtimex failed ({os.strerror(ctypes.get_errno())}): events say "
                   "clock_synced=false")
        return False
    return state != _TIME_ERROR


@functools.cache
def _warn_once(message: str) -> None:
    log.warning("%s", message)


@functools.cache
def boot_id() -> str:
    """The kernel's random id of this boot (changes at every power cycle)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# -- the simulation hook ---------------------------------------------------------------


class _Reading:
    __slots__ = ("key", "offset_s", "synced")

    def __init__(self, key: tuple, offset_s: float, synced: bool | None):
        self.key, self.offset_s, self.synced = key, offset_s, synced


class SimulatedClock:
    """The offset and synced flag a test wrote to a file (``GUARDPOST_SIM_CLOCK``).

    Each reading stats the file (about a microsecond) and parses it only when its
    inode, size or modification time changed, so a test that rewrites it sees every
    process follow at its very next reading, with no cache to wait out."""

    _NONE = _Reading(None, 0.0, None)

    def __init__(self, path: str):
        self.path = path
        self._reading = self._NONE
        self._lock = threading.Lock()  # one parse at a time; readers never wait on it

    def reading(self) -> _Reading:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._NONE
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        current = self._reading
        if current.key == key:
            return current
        with self._lock:
            if self._reading.key != key:
                self._reading = self._parse(key)
            return self._reading

    def _parse(self, key: tuple) -> _Reading:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            synced = doc.get("synced")
            reading = _Reading(key, float(doc.get("offset_s", 0.0)),
                               None if synced is None else bool(synced))
        except (OSError, ValueError, TypeError, AttributeError) as err:
            # A file written in place can be read half-written: keep the last reading
            # and look again at the next one (the key is not recorded).
            log.warning("simulated clock %s unreadable (%s): keeping the last reading",
                        self.path, err)
            return self._reading
        log.info("simulated clock: offset %+.3f s, synced %s", reading.offset_s,
                 "(kernel)" if reading.synced is None else reading.synced)
        return reading


@functools.cache
def _simulation() -> SimulatedClock | None:
    """The simulated clock if ``GUARDPOST_SIM_CLOCK`` names one (read once, at the first
    reading, never at import)."""
    path = os.environ.get(SIM_CLOCK_ENV)
    if not path:
        return None
    log.warning("the wall clock is SIMULATED (%s=%s): for tests only", SIM_CLOCK_ENV, path)
    return SimulatedClock(path)
