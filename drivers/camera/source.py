"""One camera, read continuously on its own thread.

OpenCV's ``VideoCapture`` opens an RTSP URL, a V4L2 device (``/dev/video0``) or a file.
Every frame is read (so that an RTSP stream never lags behind in a buffer); a frame is
JPEG-encoded only when the snapshot rate asks for one, into a ring that always covers
the pre-alarm window. A stream that fails or ends is reopened with a growing delay; a
file source plays at its own frame rate, as a live camera would (and loops if asked),
which is how the simulation and the tests feed real video through the real path.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

REOPEN_MIN_S = 0.5
REOPEN_MAX_S = 30.0


@dataclass(frozen=True)
class Snapshot:
    """A JPEG taken from the stream."""

    camera: str
    jpeg: bytes
    captured_monotonic: float
    captured_wall: float  # Unix time, from the source's wall_clock
    width: int
    height: int


def encode_jpeg(frame: np.ndarray, width: int, quality: int, max_bytes: int) -> tuple[bytes,
                                                                                       int, int]:
    """Shrink to ``width`` (keeping the aspect; 0, or a wider width than the camera's, = as
    is: enlarging adds bytes, not detail) and encode, lowering the quality until the JPEG
    fits ``max_bytes`` (the broker's packet limit)."""
    height, current = frame.shape[:2]
    if width and width < current:
        height = round(frame.shape[0] * width / current)
        frame = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    else:
        width = current
    while True:
        ok, buffer = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("OpenCV could not encode the frame as JPEG")
        if len(buffer) <= max_bytes or quality <= 20:
            return buffer.tobytes(), width, height
        # Too big: aim straight at the limit (size grows roughly with quality), then step.
        aimed = int(quality * max_bytes / len(buffer) * 0.9)
        quality = max(20, min(quality - 10, aimed))


RING_MARGIN_S = 10.0
# The ring lives in RAM. 120 s at 10 pictures/s of up to 250 KB would be 300 MB per camera
# on a board with 1-2 GB: past this many bytes the oldest pictures go first (the window
# before the press shortens; the daemon warns of it at start).
RING_MAX_BYTES = 64 * 1024 * 1024


class CameraSource:
    """Reads ``source`` until :meth:`close`; thread-safe accessors for the daemon."""

    def __init__(self, name: str, source: str, *, rate: float, keep_seconds: float,
                 width: int = 0, jpeg_quality: int = 80, max_jpeg_bytes: int = 250_000,
                 loop: bool = False, timeout_s: float = 10.0,
                 max_ring_bytes: int = RING_MAX_BYTES,
                 wall_clock: Callable[[], float] = time.time):
        self.name = name
        self.wall_clock = wall_clock  # a snapshot's capture time (the device's one clock)
        self.source = source
        self.interval = 1.0 / rate
        self.width = width
        self.jpeg_quality = jpeg_quality
        self.max_jpeg_bytes = max_jpeg_bytes
        self.loop = loop
        # OpenCV waits 30 s by default for a stream that went silent; a camera that drops
        # out should be reopened sooner than that.
        self.timeout_ms = int(timeout_s * 1000)
        # Beyond `keep_seconds`: the press's edge can lie seconds before the daemon hears
        # of it (a button's hold_ms, a slow commit, other cameras written first).
        self.capacity = max(1, int((keep_seconds + RING_MARGIN_S) * rate) + 2)
        self.max_ring_bytes = max_ring_bytes
        self._ring: collections.deque[Snapshot] = collections.deque()
        self._ring_bytes = 0
        self._lock = threading.Lock()
        self._new_snapshot = threading.Condition(self._lock)
        self._latest: np.ndarray | None = None
        self._latest_at: float | None = None  # monotonic
        self._next_snapshot_at = 0.0
        self.connected = False
        self.last_error: str | None = None
        self.frames_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera:{name}", daemon=True)

    # -- what the daemon uses ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._new_snapshot:
            self._new_snapshot.notify_all()
        self._thread.join(timeout)

    def latest(self) -> tuple[np.ndarray | None, float | None]:
        """The last frame read and its age in seconds (None, None before the first)."""
        with self._lock:
            if self._latest_at is None:
                return None, None
            return self._latest, time.monotonic() - self._latest_at

    def snapshots_between(self, start: float, end: float) -> list[Snapshot]:
        """Ring snapshots captured in [start, end] (``time.monotonic()`` seconds: a clock
        step by NTP must not move the window away from the pictures)."""
        with self._lock:
            return [s for s in self._ring if start <= s.captured_monotonic <= end]

    def snapshots_after(self, after_monotonic: float) -> list[Snapshot]:
        with self._lock:
            return [s for s in self._ring if s.captured_monotonic > after_monotonic]

    def wait_for_snapshot(self, after_monotonic: float, timeout: float) -> bool:
        """Block until a snapshot newer than ``after_monotonic`` exists, or timeout."""
        with self._new_snapshot:
            return self._new_snapshot.wait_for(
                lambda: self._stop.is_set() or any(
                    s.captured_monotonic > after_monotonic for s in self._ring), timeout)

    # -- the reader thread ---------------------------------------------------------------

    def _open(self) -> cv2.VideoCapture | None:
        timeouts = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, self.timeout_ms,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, self.timeout_ms]
        if self.source.startswith("/dev/video"):
            capture = cv2.VideoCapture(self.source, cv2.CAP_V4L2)
        else:
            capture = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, timeouts)
        if not capture.isOpened():
            capture.release()
            return None
        return capture

    def _is_file(self) -> bool:
        return os.path.isfile(self.source)

    def _run(self) -> None:
        delay = REOPEN_MIN_S
        while not self._stop.is_set():
            try:
                capture = self._open()
            except Exception as err:  # cv2.error from a backend: treated as "cannot open"
                # Its text may quote the URL, password and all: no traceback, scrubbed.
                capture = None
                self._failed(f"opening failed: {type(err).__name__}: {err}")
            if capture is None:
                self._failed(f"cannot open {_redact(self.source)}")
                self._stop.wait(delay)
                delay = min(REOPEN_MAX_S, delay * 2)
                continue
            self.connected, delay = True, REOPEN_MIN_S
            log.info("camera %s: reading %s", self.name, _redact(self.source))
            try:
                self._read_stream(capture)
            except Exception as err:  # an OpenCV or encoder surprise: reopen, never die
                self._failed(f"reading failed: {type(err).__name__}: {err}")
            finally:
                capture.release()
                self.connected = False
            if self._stop.is_set():
                return
            if self._is_file() and self.loop:
                continue  # play the file again, at once
            self._failed("the stream ended or stopped delivering frames")
            self._stop.wait(delay)
            delay = min(REOPEN_MAX_S, delay * 2)

    def _failed(self, reason: str) -> None:
        """Record why the camera gives no picture (shown by `status`, stored, logged),
        with the source's password taken out wherever the reason quotes it."""
        reason = _scrub(reason, self.source)
        if reason != self.last_error:
            log.warning("camera %s: %s", self.name, reason)
        self.last_error = reason

    def _read_stream(self, capture: cv2.VideoCapture) -> None:
        pace = None
        if self._is_file():  # a file plays in real time, like a camera
            fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
            pace = 1.0 / fps
        started = time.monotonic()
        count = 0
        while not self._stop.is_set():
            ok, frame = capture.read()
            if not ok or frame is None:
                return
            count += 1
            now, wall = time.monotonic(), self.wall_clock()
            self.frames_read += 1
            self.last_error = None
            with self._lock:
                self._latest, self._latest_at = frame, now
            if now >= self._next_snapshot_at:
                self._next_snapshot_at += self.interval
                if self._next_snapshot_at <= now:  # fell behind (start, a stall): no burst
                    self._next_snapshot_at = now + self.interval
                self._take_snapshot(frame, now, wall)
            if pace is not None:
                self._stop.wait(max(0.0, started + count * pace - time.monotonic()))

    def _take_snapshot(self, frame: np.ndarray, monotonic: float, wall: float) -> None:
        jpeg, width, height = encode_jpeg(frame, self.width, self.jpeg_quality,
                                          self.max_jpeg_bytes)
        with self._new_snapshot:
            self._ring.append(Snapshot(self.name, jpeg, monotonic, wall, width, height))
            self._ring_bytes += len(jpeg)
            while len(self._ring) > 1 and (len(self._ring) > self.capacity
                                           or self._ring_bytes > self.max_ring_bytes):
                self._ring_bytes -= len(self._ring.popleft().jpeg)
            self._new_snapshot.notify_all()

    def ring_usage(self) -> tuple[int, int]:
        """(pictures, bytes) held in memory now."""
        with self._lock:
            return len(self._ring), self._ring_bytes


def _redact(source: str) -> str:
    """rtsp://user:password@host/... -> rtsp://user:***@host/... for the logs."""
    if "://" not in source:
        return source
    scheme, rest = source.split("://", 1)
    # The last "@" before the path ends the credentials (a password may hold one).
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return source
    credentials, _, host = authority.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def _scrub(text: str, source: str) -> str:
    """``text`` with the password of ``source`` replaced, also percent-decoded or
    encoded (a backend's message may quote the URL in either form)."""
    redacted = _redact(source)
    if redacted == source:
        return text
    text = text.replace(source, redacted)
    password = source.split("://", 1)[1].partition("/")[0].rpartition("@")[0]
    password = password.split(":", 1)[1] if ":" in password else ""
    for form in {password, urllib.parse.unquote(password), urllib.parse.quote(password)}:
        if form:
            text = text.replace(form, "***")
    return text
