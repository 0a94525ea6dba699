"""The camera daemon (``guardpost run camera``): snapshots on alarm, camera health.

Each configured camera is read continuously (:class:`drivers.camera.CameraSource`), which
keeps JPEG snapshots of the last ``pre_seconds`` in memory. When the button daemon commits
an alarm (or a test) it wakes this daemon, which then, for every camera:

- writes the snapshots of the ``pre_seconds`` before the press durably to the spool and
  queues them in the outbox (behind the alarm itself: lower priority);
- keeps writing the next ``post_count`` snapshots as they are taken.

It also watches every picture, and raises a fault (Contact ID 330, with the camera and the
problem) when a camera is stale, frozen, black or covered for ``fault_after_s``, and a
restore once it has been good for ``restore_after_s``. A camera crash or a broken stream
never touches the button path: this is a process of its own.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from drivers.camera import CameraSource, PictureCheck, assess
from edge import __version__
from edge.config import CameraConfig, Config
from edge.contract.events import ContactId, EventDraft, EventKind, Qualifier, utc_iso, utc_now
from edge.runtime.access import CAMERA_ACCESS, AccessPolicy
from edge.runtime.clock import boot_id, clock_synchronised, wall_now, wall_time
from edge.runtime.control import ControlServer
from edge.runtime.daemon import Daemon
from edge.runtime.wake import wake
from edge.store.outbox import Outbox
from edge.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)

LATE_EVENT_S = 120.0     # an alarm older than this when first seen gets no snapshots
STATE_EVERY_S = 30.0


@dataclass
class _Job:
    """Snapshots still to take for one event from one camera."""

    event_id: str
    event_kind: str
    event_time: datetime
    camera: str
    next_idx: int
    post_left: int
    after_monotonic: float  # post snapshots are those taken after this
    deadline: float


STARTING = "starting"  # no frame since the daemon started, within stale_after_s


class _Health:
    """Stale / frozen / black / covered, with hysteresis so a flapping camera does not
    flood the platform."""

    def __init__(self, name: str, spec: CameraConfig, started: float):
        self.name, self.spec = name, spec
        self.started = started
        self.fingerprint: bytes | None = None
        self.examined: np.ndarray | None = None  # the last frame assessed, and its check
        self.check: PictureCheck | None = None
        self.unchanged_since: float | None = None
        self.bad_since: float | None = None
        self.good_since: float | None = None
        self.fault: str | None = None  # the problem reported, while faulted
        self.problem: str | None = None
        self.measures: dict = {}

    def examine(self, source: CameraSource, now: float) -> str | None:
        spec = self.spec
        frame, age = source.latest()
        if frame is None:
            self.measures = {"frame_age_s": None}
            return "stale" if now - self.started > spec.stale_after_s else STARTING
        self.measures = {"frame_age_s": round(age, 2)}
        if age > spec.stale_after_s:
            return "stale"
        if frame is self.examined:
            # No new frame since the last check (checks faster than a slow stream): the
            # same frame again is no evidence of a frozen picture; "stale" covers a stall.
            check = self.check
        else:
            check, self.fingerprint = assess(frame, self.fingerprint)
            self.examined, self.check = frame, check
            if check.identical:
                self.unchanged_since = self.unchanged_since or now
            else:
                self.unchanged_since = None
        self.measures |= {"brightness": round(check.brightness, 1),
                          "detail": round(check.detail, 1)}
        if check.brightness < spec.black_below:
            return "black"
        if check.detail < spec.covered_below:
            return "covered"
        if self.unchanged_since is not None and now - self.unchanged_since >= spec.frozen_after_s:
            return "frozen"
        return None

    def update(self, problem: str | None, now: float) -> tuple[str, str] | None:
        """Returns ("fault"|"restore", problem) when one is due."""
        self.problem = problem
        if problem == STARTING:
            # No frame yet, and not yet stale: neither good nor bad. Counting it as good
            # would restore, after a restart, a fault of a camera that is still dead.
            return None
        if problem is not None:
            self.good_since = None
            self.bad_since = self.bad_since or now
            if self.fault is None and now - self.bad_since >= self.spec.fault_after_s:
                self.fault = problem
                return "fault", problem
            return None
        self.bad_since = None
        self.good_since = self.good_since or now
        if self.fault is not None and now - self.good_since >= self.spec.restore_after_s:
            previous, self.fault = self.fault, None
            return "restore", previous
        return None


class CameraDaemon(Daemon):
    name = "camera"

    def __init__(self, config: Config):
        super().__init__(config)
        self.sources: dict[str, CameraSource] = {}
        self.health: dict[str, _Health] = {}
        self.jobs: list[_Job] = []
        # The platform's cmd/snapshot, from the control thread to the loop: (id, camera).
        self._requested: collections.deque[tuple[str, str | None]] = collections.deque(
            maxlen=8)

    def start(self, stack: contextlib.ExitStack) -> str:
        cfg = self.config
        # RTSP over TCP: IP cameras are behind switches and firewalls that drop UDP.
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        self._outbox = outbox = self.open_outbox(stack)
        self._store = store = SnapshotStore(outbox, cfg.storage.spool_dir,
                                            cfg.storage.spool_budget_mb * 1024 * 1024)
        orphans = store.remove_orphans()
        if orphans:
            log.info("removed %d snapshot file(s) left by an interrupted run", orphans)
        now = time.monotonic()
        for name, spec in cfg.cameras.items():
            source = CameraSource(name, spec.source, rate=spec.rate,
                                  keep_seconds=spec.pre_seconds, width=spec.width,
                                  jpeg_quality=spec.jpeg_quality,
                                  max_jpeg_bytes=spec.max_jpeg_bytes, loop=spec.loop,
                                  timeout_s=min(spec.stale_after_s, 10.0),
                                  wall_clock=wall_time)
            worst = source.capacity * spec.max_jpeg_bytes
            if worst > source.max_ring_bytes:
                log.warning(
                    "camera %s: %g s before the press at %g/s of up to %d KB may need "
                    "%d MB of memory; the ring keeps %d MB, so large pictures shorten "
                    "the window to about %.0f s", name, spec.pre_seconds, spec.rate,
                    spec.max_jpeg_bytes // 1024, worst // 2**20,
                    source.max_ring_bytes // 2**20,
                    source.max_ring_bytes / spec.max_jpeg_bytes / spec.rate)
            source.start()
            stack.callback(source.close)
            self.sources[name] = source
            self.health[name] = _Health(name, spec, now)
        control = ControlServer(cfg.storage.runtime_dir / "camera.ctl", self._handle_control,
                                AccessPolicy("camera.ctl", CAMERA_ACCESS))
        control.start()
        stack.callback(control.close)
        self._restore_faults(outbox)
        self._cursor = self._initial_cursor(outbox)
        if self.sources:
            # No camera configured: the unit runs everywhere, and costs nothing then.
            check_every = min(c.check_interval_s for c in cfg.cameras.values())
            self.every(check_every, lambda: self._check_health(outbox, time.monotonic()),
                       first_in=0)
            self.every(STATE_EVERY_S, lambda: self.save_state(outbox), first_in=0)
        log.info("camera daemon ready: %s", ", ".join(self.sources) or "no cameras")
        return f"watching {len(self.sources)} camera(s)"

    def step(self) -> int | None:
        if not self.sources:
            return None
        self._cursor = self._start_jobs(self._outbox, self._store, self._cursor)
        if self._requested and self._take_requested(self._store):
            self._store.enforce_budget()
            wake(self.config.storage.runtime_dir, "uplink")
        if self._advance_jobs(self._store):
            self._store.enforce_budget()
            wake(self.config.storage.runtime_dir, "uplink")
        return None

    def next_wakeup(self) -> float | None:
        return 0.1 if self.jobs else None  # post-alarm snapshots arrive every 1/rate s

    # -- snapshots -----------------------------------------------------------------------

    def _initial_cursor(self, outbox: Outbox) -> int:
        """Events up to now are not ours to photograph: start after the last one."""
        with outbox.transaction():
            return outbox.set_counter("camera_seen", outbox.last_seq(), only_if_missing=True)

    def _start_jobs(self, outbox: Outbox, store: SnapshotStore, cursor: int) -> int:
        rows = outbox.events_after(cursor, ("alarm", "test"))
        if not rows:
            return cursor
        for row in rows:
            cursor = row.seq  # seen, whatever comes of it: never read again
            event_time = datetime.fromisoformat(row.occurred_at)
            age = (utc_now() - event_time).total_seconds()
            if age > LATE_EVENT_S:
                log.warning("%s %s is %.0f s old: too late for its snapshots", row.kind,
                            row.id, age)
                continue
            for name, source in self.sources.items():
                self._start_job(store, source, self.config.cameras[name], row.id, row.kind,
                                event_time)
        with outbox.transaction():
            outbox.set_counter("camera_seen", cursor)
        return cursor

    def _start_job(self, store: SnapshotStore, source: CameraSource, spec: CameraConfig,
                   event_id: str, kind: str, event_time: datetime) -> None:
        # The edge's time is wall-clock (the button daemon's); the ring is kept on the
        # monotonic clock. Mapped once, now: a step of the wall clock between the pictures
        # and the press (NTP's first sync at boot) cannot shift the window.
        event_monotonic = time.monotonic() - (wall_now() - event_time).total_seconds()
        taken = store.taken(event_id, source.name)
        if taken:
            # A restart after some of this event's snapshots were written (before the
            # cursor moved past it): those stay, the numbering goes on after them.
            before = []
            log.info("camera %s: resuming %s %s after %d snapshot(s)", source.name, kind,
                     event_id, taken)
        else:
            before = source.snapshots_between(event_monotonic - spec.pre_seconds,
                                              event_monotonic)
        for idx, snapshot in enumerate(before):
            self._write(store, snapshot, event_id=event_id, event_kind=kind,
                        event_time=event_time, idx=idx, phase="pre")
        if before:
            store.enforce_budget()
            wake(self.config.storage.runtime_dir, "uplink")
        log.info("camera %s: %d snapshot(s) from before %s %s", source.name, len(before),
                 kind, event_id)
        self.jobs.append(_Job(event_id, kind, event_time, source.name, taken or len(before),
                              max(0, spec.post_count - store.taken(event_id, source.name,
                                                                   "post")),
                              event_monotonic,
                              time.monotonic() + spec.post_count / spec.rate + 10))

    @staticmethod
    def _write(store: SnapshotStore, snapshot, **where) -> bool:
        """One snapshot to the spool; a full or failing disk costs that picture, not the
        daemon (and the spool gives way to make room)."""
        try:
            store.write(snapshot, **where)
            return True
        except OSError as err:
            log.error("camera %s: snapshot %d of %s not saved: %s", snapshot.camera,
                      where["idx"], where["event_id"], err)
            with contextlib.suppress(Exception):
                store.enforce_budget()
            return False

    def _take_requested(self, store: SnapshotStore) -> int:
        """The newest picture of each camera (or the one named) for each cmd/snapshot,
        published on ``snapshot/{snapshot_id}`` like an alarm's (phase ``now``)."""
        written = 0
        while self._requested:
            snapshot_id, camera = self._requested.popleft()
            now = time.monotonic()
            for name, source in self.sources.items():
                if camera not in (None, name):
                    continue
                latest = source.snapshots_between(now - 2 * source.interval - 1, now)[-1:]
                if not latest:
                    log.warning("camera %s: no recent picture for snapshot %s", name,
                                snapshot_id)
                    continue
                written += self._write(store, latest[0], event_id=snapshot_id,
                                       event_kind="request", event_time=wall_now(), idx=0,
                                       phase="now")
        return written

    def _advance_jobs(self, store: SnapshotStore) -> int:
        written = 0
        for job in list(self.jobs):
            fresh = self.sources[job.camera].snapshots_after(job.after_monotonic)
            for snapshot in fresh[:job.post_left]:
                self._write(store, snapshot, event_id=job.event_id, event_kind=job.event_kind,
                            event_time=job.event_time, idx=job.next_idx, phase="post")
                job.next_idx += 1
                job.post_left -= 1
                job.after_monotonic = snapshot.captured_monotonic
                written += 1
            if job.post_left == 0 or time.monotonic() > job.deadline:
                if job.post_left:
                    log.warning("camera %s: %d post-alarm snapshot(s) of %s missing (no frames)",
                                job.camera, job.post_left, job.event_id)
                self.jobs.remove(job)
        return written

    # -- health --------------------------------------------------------------------------

    def _restore_faults(self, outbox: Outbox) -> None:
        """A camera in fault when the daemon stopped is still in fault: its restore is
        due once it is good again, and no second fault is raised for it."""
        saved = outbox.daemons.all().get(self.name)
        if saved is None:
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for name, camera in json.loads(saved[0])["cameras"].items():
                if name in self.health and camera.get("fault"):
                    self.health[name].fault = camera["fault"]

    def _check_health(self, outbox: Outbox, now: float) -> None:
        for name, health in self.health.items():
            change = health.update(health.examine(self.sources[name], now), now)
            if change is None:
                continue
            kind, problem = change
            detail = {"camera": name, "problem": problem, **health.measures}
            if self.config.cameras[name].label:
                detail["label"] = self.config.cameras[name].label
            event = outbox.commit_event(EventDraft(
                kind=EventKind.FAULT if kind == "fault" else EventKind.RESTORE,
                code=ContactId.PERIPHERAL_TROUBLE,
                qualifier=Qualifier.NEW if kind == "fault" else Qualifier.RESTORE,
                occurred_at=utc_now(), clock_synced=clock_synchronised(), boot_id=boot_id(),
                detail=detail))
            (log.warning if kind == "fault" else log.info)(
                "camera %s: %s (%s), seq %d", name, kind, problem, event.seq)
            wake(self.config.storage.runtime_dir, "uplink")
            self.save_state(outbox)

    def state(self) -> dict:
        cameras = {}
        for name, source in self.sources.items():
            _, age = source.latest()
            health = self.health[name]
            pictures, ring_bytes = source.ring_usage()
            cameras[name] = {"connected": source.connected, "frame_age_s": age,
                             "ring": {"pictures": pictures, "bytes": ring_bytes},
                             "frames_read": source.frames_read, "fault": health.fault,
                             "problem": health.problem, "last_error": source.last_error}
        return {"daemon": self.name, "version": __version__, "cameras": cameras,
                "snapshot_jobs": len(self.jobs)}

    # -- control socket (status, and a frame for `guardpost doctor`) ----------------------

    def _handle_control(self, request: dict, client_alive) -> dict:
        if request["op"] == "status":
            return {"ok": True, **self.state()}
        if request["op"] == "frame":
            return self._save_frames()
        if request["op"] == "snapshot":
            return self._request_snapshot(request)
        return {"ok": False, "error": f"unknown op {request['op']!r}"}

    def _request_snapshot(self, request: dict) -> dict:
        snapshot_id, camera = request.get("snapshot_id"), request.get("camera")
        if not isinstance(snapshot_id, str) or not 1 <= len(snapshot_id) <= 64:
            return {"ok": False, "error": "snapshot_id: a string is needed"}
        if camera is not None and camera not in self.sources:
            return {"ok": False, "error": f"no camera {camera!r}"}
        self._requested.append((snapshot_id, camera))
        wake(self.config.storage.runtime_dir, self.name)
        return {"ok": True, "snapshot_id": snapshot_id,
                "cameras": [camera] if camera else sorted(self.sources)}

    def _save_frames(self) -> dict:
        saved = {}
        for name, source in self.sources.items():
            frame, age = source.latest()
            if frame is None:
                saved[name] = {"ok": False, "error": source.last_error or "no frame yet"}
                continue
            path = Path(self.config.storage.spool_dir) / f"doctor-{name}.jpg"
            cv2.imwrite(str(path), frame)
            saved[name] = {"ok": True, "path": str(path), "age_s": round(age, 2),
                           "size": f"{frame.shape[1]}x{frame.shape[0]}",
                           "at": utc_iso(wall_now())}
        return {"ok": True, "cameras": saved}
