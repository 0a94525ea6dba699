"""Cameras with real video: OpenCV decodes files written at test time, the camera daemon
runs as a process, snapshots travel through the real broker."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from drivers.camera import Snapshot
from drivers.camera.testcard import frame_number, write_video
from edge.contract.events import Identity, utc_iso, utc_now
from edge.runtime.control import request
from edge.store.outbox import Outbox
from edge.store.snapshots import SnapshotStore
from edge.tools.localbroker import free_port
from tests.support.daemons import poll_until
from tests.support.platform import PlatformStandIn
from tests.test_alarm_path import online, press

FPS = 20.0


def camera_section(source, **overrides) -> dict:
    spec = {"source": str(source), "rate": 5.0, "pre_seconds": 2.0, "post_count": 5,
            "width": 0, "loop": True, "check_interval_s": 0.2, "fault_after_s": 0.4,
            "restore_after_s": 0.6, "stale_after_s": 1.5, "frozen_after_s": 1.0}
    return spec | overrides


def camera_status(config) -> dict:
    return request(config.storage.runtime_dir / "camera.ctl", {"op": "status"})["cameras"]


@pytest.fixture
def counter_video(tmp_path):
    return write_video(tmp_path / "gate.avi", [("counter", 30.0)], fps=FPS)


def snapshots_of(police, event_id: str) -> list[tuple[dict, bytes, float]]:
    return sorted((s for s in police.snapshots if s[0]["event_id"] == event_id),
                  key=lambda s: (s[0]["camera"], s[0]["index"]))


def test_an_alarm_brings_the_seconds_before_and_after_the_press(make_config, daemons, platform,
                                                                counter_video):
    path, config = make_config(cameras={"gate-outside": camera_section(counter_video)})
    police = platform(config, ack=True)
    daemons("button", path)
    daemons("uplink", path)
    daemons("camera", path)
    online(police)
    # The ring must hold the whole pre-alarm window (2 s) before the press.
    poll_until(lambda: camera_status(config)["gate-outside"]["frames_read"] > 2.5 * FPS,
               what="2.5 s of video read")

    event = press(config)

    police.wait_for(lambda p: len(snapshots_of(p, event["id"])) >= 15, timeout=30,
                    what="the alarm's snapshots")
    mine = snapshots_of(police, event["id"])
    phases = [d["phase"] for d, _, _ in mine]
    assert phases.count("post") == 5 and phases.count("pre") in (10, 11)  # 2 s at 5/s
    assert phases == sorted(phases, key=lambda phase: phase == "post")  # pre first
    assert all(d["offset_s"] <= 0 for d, _, _ in mine if d["phase"] == "pre")
    assert all(d["offset_s"] > 0 for d, _, _ in mine if d["phase"] == "post")
    assert [d["index"] for d, _, _ in mine] == list(range(len(mine)))
    numbers = [frame_number(jpeg) for _, jpeg, _ in mine]
    # The right moments, in order, about 1/rate (4 frames) apart.
    gaps = [b - a for a, b in itertools.pairwise(numbers)]
    assert all(1 <= gap <= 8 for gap in gaps), (numbers, gaps)
    alarm = next(m for m in police.messages if m.leaf == "event/alarm")
    assert alarm.at < min(at for _, _, at in mine)  # the alarm itself went first


def test_a_camera_in_trouble_raises_faults_and_restores(make_config, daemons, platform,
                                                        tmp_path):
    video = write_video(tmp_path / "trouble.avi", [
        ("counter", 2.0), ("black", 2.0), ("counter", 2.0), ("covered", 2.0),
        ("counter", 2.0), ("frozen", 3.0), ("counter", 30.0)], fps=FPS)
    path, config = make_config(cameras={"gate-inside": camera_section(video, loop=False)})
    police = platform(config)
    daemons("uplink", path)
    daemons("camera", path)
    online(police)
    expected = [("fault", "black"), ("restore", "black"), ("fault", "covered"),
                ("restore", "covered"), ("fault", "frozen"), ("restore", "frozen")]

    def story(p):
        events = [e for e in p.events() if e["kind"] in ("fault", "restore")]
        return [(e["kind"], e["detail"]["problem"]) for e in events]

    police.wait_for(lambda p: len(story(p)) >= 6, timeout=60, what="three faults and restores")
    assert story(police) == expected
    faults = [e for e in police.events() if e["kind"] in ("fault", "restore")]
    assert {e["code"] for e in faults} == {330}
    assert [e["qualifier"] for e in faults] == [1, 3, 1, 3, 1, 3]
    assert all(e["detail"]["camera"] == "gate-inside" for e in faults)


def test_a_camera_that_cannot_be_opened_is_a_fault(make_config, daemons, platform, tmp_path):
    path, config = make_config(cameras={"gate-outside": camera_section(
        tmp_path / "unplugged.avi")})
    police = platform(config)
    daemons("uplink", path)
    camera = daemons("camera", path)
    online(police)
    [fault] = police.wait_for(lambda p: p.events("fault"), timeout=30, what="the stale fault")
    assert fault["detail"]["problem"] == "stale" and fault["detail"]["frame_age_s"] is None
    assert "cannot open" in camera.log()
    assert camera_status(config)["gate-outside"]["fault"] == "stale"


# -- the spool's disk budget ---------------------------------------------------------------

def _snapshot(camera: str, size: int) -> Snapshot:
    return Snapshot(camera, b"\xff\xd8" + b"x" * (size - 2), time.monotonic(), time.time(),
                    320, 240)


def test_under_disk_pressure_the_least_precious_snapshots_go_first(tmp_path):
    with Outbox(tmp_path / "outbox.db", Identity("s", "d", "gate")) as outbox:
        store = SnapshotStore(outbox, tmp_path / "spool", budget_bytes=10_000)
        when = utc_now()

        def add(event_id: str, kind: str, count: int) -> list[int]:
            return [store.write(_snapshot("cam", 1000), event_id=event_id, event_kind=kind,
                                event_time=when, idx=i, phase="pre") for i in range(count)]

        delivered = add("old-alarm", "alarm", 3)
        store.mark_sent(delivered)
        test = add("a-test", "test", 3)
        alarm = add("live-alarm", "alarm", 4)
        assert store.used_bytes() == 10_000 and store.enforce_budget() == 0

        add("another-alarm", "alarm", 2)          # 2,000 over: delivered ones go first
        assert store.enforce_budget() == 2
        remaining = {row[0] for row in outbox.db.execute("SELECT id FROM snapshots")}
        assert delivered[:2] and not set(delivered[:2]) & remaining
        assert delivered[2] in remaining

        add("third-alarm", "alarm", 3)            # 3,000 over: the last delivered, then tests
        assert store.enforce_budget() == 3
        remaining = {row[0] for row in outbox.db.execute("SELECT id FROM snapshots")}
        assert delivered[2] not in remaining and set(test[:2]).isdisjoint(remaining)
        assert test[2] in remaining and set(alarm) <= remaining  # no real alarm touched

        add("fourth-alarm", "alarm", 3)           # only then the oldest undelivered alarms
        assert store.enforce_budget() == 3
        remaining = {row[0] for row in outbox.db.execute("SELECT id FROM snapshots")}
        assert test[2] not in remaining and set(alarm[:2]).isdisjoint(remaining)
        assert store.used_bytes() <= 10_000
        on_disk = list((tmp_path / "spool").rglob("*.jpg"))
        assert len(on_disk) == len(remaining)     # the files went with their rows


def test_snapshots_over_mqtt_3_1_1_carry_their_description_in_front(broker, make_config,
                                                                    daemons, counter_video):
    path, config = make_config(broker={"protocol": "3.1.1"},
                               cameras={"gate-outside": camera_section(counter_video)})
    police = PlatformStandIn(broker.host, broker.port, config.topic_prefix, ack=True,
                             protocol=paho.MQTTv311, client_id="platform-311").start()
    try:
        daemons("button", path)
        daemons("uplink", path)
        daemons("camera", path)
        online(police)
        poll_until(lambda: camera_status(config)["gate-outside"]["frames_read"] > FPS,
                   what="a second of video")
        event = press(config)
        police.wait_for(lambda p: len(snapshots_of(p, event["id"])) >= 6, timeout=30,
                        what="snapshots over MQTT 3.1.1")
    finally:
        police.stop()
    assert not police.schema_problems
    description, jpeg, _ = snapshots_of(police, event["id"])[0]
    assert jpeg.startswith(b"\xff\xd8") and description["camera"] == "gate-outside"


# -- an RTSP camera on loopback ------------------------------------------------------------

RTSP_SERVER = Path(__file__).parent / "support" / "rtsp_server.py"


def _gstreamer_rtsp_available() -> bool:
    return subprocess.run(["/usr/bin/python3", "-c", "import gi; gi.require_version("
                           "'GstRtspServer', '1.0'); from gi.repository import GstRtspServer"],
                          capture_output=True).returncode == 0


class RtspCamera:
    """GStreamer's RTSP server in a process of its own; stop() is the camera unplugged."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"rtsp://127.0.0.1:{port}/camera"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["/usr/bin/python3", str(RTSP_SERVER), str(self.port)],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        assert self.process.stdout.readline().strip() == "READY"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.mark.skipif(not _gstreamer_rtsp_available(),
                    reason="needs Debian's GStreamer RTSP server (.ci/setup installs it)")
def test_an_rtsp_camera_that_drops_out_is_a_fault_and_its_return_a_restore(make_config, daemons,
                                                                          platform):
    camera = RtspCamera(free_port())
    camera.start()
    try:
        path, config = make_config(cameras={"gate-outside": camera_section(
            camera.url, loop=False, stale_after_s=1.0, black_below=0, covered_below=0,
            frozen_after_s=600)})
        police = platform(config)
        daemons("uplink", path)
        daemons("camera", path)
        online(police)
        poll_until(lambda: camera_status(config)["gate-outside"]["frames_read"] > 10,
                   timeout=30, what="frames over RTSP")
        camera.stop()  # unplugged
        [fault] = police.wait_for(lambda p: p.events("fault"), timeout=30, what="the fault")
        assert fault["detail"]["problem"] == "stale"
        camera.start()  # back
        [restore] = police.wait_for(lambda p: p.events("restore"), timeout=60,
                                    what="the restore")
        assert restore["detail"]["camera"] == "gate-outside"
        assert camera_status(config)["gate-outside"]["connected"]
    finally:
        camera.stop()


def test_snapshots_taken_during_an_outage_arrive_when_it_ends(broker, make_config, daemons,
                                                              platform, counter_video):
    path, config = make_config(cameras={"gate-outside": camera_section(counter_video)})
    police = platform(config, ack=True)
    daemons("button", path)
    uplink = daemons("uplink", path)
    daemons("camera", path)
    online(police)
    poll_until(lambda: camera_status(config)["gate-outside"]["frames_read"] > 2.5 * FPS,
               what="2.5 s of video read")
    broker.stop()
    uplink.wait_for_line("disconnected from the broker")
    event = press(config)
    with Outbox(config.storage.database, config.identity) as outbox:
        poll_until(lambda: outbox.db.execute(
            "SELECT count(*) FROM snapshots WHERE event_id = ? AND state = 'queued'",
            (event["id"],)).fetchone()[0] >= 15, timeout=30, what="15 snapshots spooled")
    broker.start()
    police.wait_for(lambda p: len(snapshots_of(p, event["id"])) >= 15, timeout=60,
                    what="the snapshots after the outage")
    assert [d["index"] for d, _, _ in snapshots_of(police, event["id"])][:15] == list(range(15))


# -- review fixes: each one a behaviour a reviewer found missing --------------------------


def test_a_still_scene_with_sensor_noise_is_not_frozen_a_repeated_frame_is():
    import numpy as np

    from drivers.camera import assess

    rng = np.random.default_rng(3)
    scene = rng.integers(60, 200, (240, 320, 3), dtype=np.uint8)  # a quiet gate at night

    def noisy():
        noise = rng.integers(-2, 3, scene.shape)
        return np.clip(scene.astype(int) + noise, 0, 255).astype(np.uint8)

    check, digest = assess(noisy(), None)
    assert check.identical is None
    for _ in range(5):
        check, digest = assess(noisy(), digest)
        assert check.identical is False  # the thumbnails differ by far less than 0.5
    frame = noisy()
    _, digest = assess(frame, digest)
    check, _ = assess(frame.copy(), digest)
    assert check.identical is True


def test_an_event_too_old_for_snapshots_is_passed_once_not_read_forever(make_config, tmp_path):
    from datetime import timedelta

    from edge.contract.events import ContactId, EventDraft, EventKind
    from edge.daemons.camera import LATE_EVENT_S, CameraDaemon

    _, config = make_config()
    daemon = CameraDaemon(config)
    with Outbox(config.storage.database, config.identity) as outbox:
        cursor = daemon._initial_cursor(outbox)
        late = outbox.commit_event(EventDraft(
            kind=EventKind.ALARM, code=ContactId.PANIC, boot_id="b", clock_synced=True,
            occurred_at=utc_now() - timedelta(seconds=LATE_EVENT_S + 60), input="gate"))
        store = SnapshotStore(outbox, config.storage.spool_dir, 10_000_000)
        assert daemon._start_jobs(outbox, store, cursor) == late.seq
        assert outbox.db.execute("SELECT value FROM counters WHERE name = 'camera_seen'"
                                 ).fetchone()[0] == late.seq


def test_a_camera_fault_survives_a_restart_of_the_daemon(make_config):
    import json

    from edge.daemons.camera import CameraDaemon, _Health

    _, config = make_config(cameras={"gate": {"source": "/nonexistent.avi"}})
    with Outbox(config.storage.database, config.identity) as outbox:
        outbox.daemons.save("camera", json.dumps(
            {"cameras": {"gate": {"fault": "black", "connected": True}}}))
        daemon = CameraDaemon(config)
        daemon.health["gate"] = _Health("gate", config.cameras["gate"], time.monotonic())
        daemon._restore_faults(outbox)
    health = daemon.health["gate"]
    assert health.fault == "black"
    now = time.monotonic()
    assert health.update("black", now) is None  # still black: no second fault
    assert health.update(None, now) is None
    assert health.update(None, now + 60) == ("restore", "black")


def test_a_camera_still_dead_after_a_restart_is_not_restored_while_it_is_awaited(make_config):
    # Its fault is remembered; in the first seconds no frame has come yet. That is not a
    # good picture: no restore may go out before stale_after_s says "still stale".
    from edge.daemons.camera import _Health

    _, config = make_config(cameras={"gate": {"source": "/nonexistent.avi",
                                              "stale_after_s": 20, "restore_after_s": 5}})

    class DeadCamera:
        def latest(self):
            return None, None

    health = _Health("gate", config.cameras["gate"], started=0.0)
    health.fault = "stale"  # restored from the daemon's saved state
    changes = [health.update(health.examine(DeadCamera(), now), now)
               for now in range(0, 40, 2)]
    assert changes == [None] * 20
    assert health.fault == "stale" and health.problem == "stale"


def test_the_reader_survives_an_exception_and_reads_on(tmp_path):
    from drivers.camera import CameraSource

    video = write_video(tmp_path / "cam.avi", [("counter", 2.0)], fps=20.0)

    class FlakyEncoder(CameraSource):
        """The first snapshot's encoding blows up, as a codec surprise would."""

        failures = 1

        def _take_snapshot(self, frame, monotonic, wall):
            if self.failures:
                self.failures -= 1
                raise RuntimeError("encoder exploded")
            super()._take_snapshot(frame, monotonic, wall)

    source = FlakyEncoder("cam", str(video), rate=10.0, keep_seconds=5, width=0,
                          jpeg_quality=80, max_jpeg_bytes=250_000, loop=True, timeout_s=5)
    source.start()
    try:
        assert source.wait_for_snapshot(0.0, timeout=20)
        assert source.failures == 0 and source._thread.is_alive()
    finally:
        source.close()


def test_a_filling_disk_shrinks_the_spool_and_old_delivered_pictures_go(tmp_path):
    from datetime import timedelta

    from edge.store.snapshots import DISK_RESERVE_BYTES

    class NearlyFullDisk(SnapshotStore):
        """The outbox's disk with only a little left above the reserve."""

        def free_disk_bytes(self) -> int:
            return DISK_RESERVE_BYTES + 2_000

    with Outbox(tmp_path / "outbox.db", Identity("s", "d", "gate")) as outbox:
        store = NearlyFullDisk(outbox, tmp_path / "spool", budget_bytes=1_000_000)
        when = utc_now()
        ids = [store.write(_snapshot("cam", 1000), event_id="alarm-1", event_kind="alarm",
                           event_time=when, idx=i, phase="pre") for i in range(5)]
        store.write(_snapshot("cam", 1000), event_id="test-1", event_kind="test",
                    event_time=when, idx=0, phase="pre")
        # 6,000 bytes used, 2,000 free above the reserve: the spool may hold 8,000 now,
        # not its 1,000,000 budget; with the disk nearly full it must give way.
        assert store.effective_budget() == 8_000
        queued = store.next_queued(10, set())
        assert [q.event_id for q in queued] == ["alarm-1"] * 5 + ["test-1"]  # alarms first

        store.mark_sent(ids[:2])
        outbox.db.execute("UPDATE snapshots SET committed_at = ? WHERE id = ?",
                          (utc_iso(when - timedelta(days=91)), ids[0]))
        assert store.prune_delivered(keep_days=90) == 1
        assert not (tmp_path / "spool" / "alarm-1" / "cam-000-pre.jpg").exists()
        assert {r[0] for r in outbox.db.execute("SELECT id FROM snapshots")} == \
            set(ids[1:]) | {queued[-1].id}


def test_a_snapshot_the_disk_refuses_costs_that_picture_not_the_daemon(tmp_path):
    import errno

    from edge.daemons.camera import CameraDaemon

    class FullDisk(SnapshotStore):
        def write(self, snapshot, **where):
            raise OSError(errno.ENOSPC, "No space left on device")

    with Outbox(tmp_path / "outbox.db", Identity("s", "d", "gate")) as outbox:
        store = FullDisk(outbox, tmp_path / "spool", budget_bytes=10_000)
        assert CameraDaemon._write(store, _snapshot("cam", 1000), event_id="e", idx=0,
                                   event_kind="alarm", event_time=utc_now(),
                                   phase="pre") is False


def test_the_pictures_before_the_press_are_found_across_a_clock_step(make_config):
    # NTP's first sync at boot steps the wall clock by an hour: the pictures of the last
    # seconds carry the old wall time, the press the new one. The pre-window is kept on
    # the monotonic clock, so they are still the seconds before the press.
    from drivers.camera import CameraSource
    from edge.contract.events import ContactId, EventDraft, EventKind
    from edge.daemons.camera import CameraDaemon

    _, config = make_config(cameras={"gate": {"source": "/nonexistent.avi",
                                              "pre_seconds": 5, "post_count": 0}})
    source = CameraSource("gate", "/nonexistent.avi", rate=2.0, keep_seconds=5)
    mono, wall = time.monotonic(), time.time()
    for age in (8.0, 4.0, 2.0, 0.5):  # seconds before the press; 8 s is outside the window
        source._ring.append(Snapshot("gate", b"\xff\xd8" + bytes([int(age * 2)]),
                                     mono - age, wall - age - 3600, 320, 240))
    daemon = CameraDaemon(config)
    with Outbox(config.storage.database, config.identity) as outbox:
        event = outbox.commit_event(EventDraft(
            kind=EventKind.ALARM, code=ContactId.PANIC, boot_id="b", clock_synced=True,
            occurred_at=utc_now(), input="gate"))
        store = SnapshotStore(outbox, config.storage.spool_dir, 10_000_000)
        daemon._start_job(store, source, config.cameras["gate"], event.id, "alarm",
                          event.draft.occurred_at)
        rows = outbox.db.execute("SELECT idx, phase FROM snapshots WHERE event_id = ?"
                                 " ORDER BY idx", (event.id,)).fetchall()
    assert rows == [(0, "pre"), (1, "pre"), (2, "pre")]


def test_the_same_frame_checked_again_is_not_a_frozen_picture_new_identical_frames_are(
        make_config):
    # Checks every 2 s of a camera that sends a frame every 5 s see one frame twice: that is
    # a slow stream, not a frozen one. Frames that keep arriving with the same pixels are.
    import numpy as np

    from edge.daemons.camera import _Health

    class SlowStream:
        """What the health check reads of a source: its latest frame and that frame's age."""

        def __init__(self, frame):
            self.frame = frame

        def latest(self):
            return self.frame, 0.5

    _, config = make_config(cameras={"gate": {"source": "/nonexistent.avi",
                                              "frozen_after_s": 3, "stale_after_s": 60}})
    scene = np.random.default_rng(5).integers(40, 220, (240, 320, 3), dtype=np.uint8)
    stream = SlowStream(scene)
    health = _Health("gate", config.cameras["gate"], started=0.0)
    assert [health.examine(stream, now) for now in (0.0, 2.0, 4.0, 6.0)] == [None] * 4

    problems = []
    for now in (8.0, 10.0, 12.0):
        stream.frame = scene.copy()  # a new frame, the very same pixels
        problems.append(health.examine(stream, now))
    assert problems == [None, None, "frozen"]  # unchanged since 8 s: frozen at 11 s


def test_the_memory_ring_keeps_its_byte_limit_dropping_the_oldest_first():
    # 120 s at 10/s of big pictures would not fit a Pi's memory: the ring is capped in
    # bytes as well as in count, and the newest pictures are the ones kept.
    import numpy as np

    from drivers.camera import CameraSource

    source = CameraSource("gate", "/nonexistent.avi", rate=10.0, keep_seconds=120,
                          width=0, jpeg_quality=95, max_ring_bytes=400_000)
    rng = np.random.default_rng(9)
    for number in range(60):
        frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)  # noise: big JPEGs
        source._take_snapshot(frame, float(number), 1e9 + number)
    pictures, held = source.ring_usage()
    kept = source.snapshots_after(-1.0)
    assert held <= 400_000 and held == sum(len(s.jpeg) for s in kept)
    assert 1 < pictures < 60 and len(kept) == pictures
    assert [s.captured_monotonic for s in kept] == [float(n) for n in range(60 - pictures, 60)]

    small = CameraSource("gate", "/nonexistent.avi", rate=1.0, keep_seconds=3)
    for number in range(30):
        small._take_snapshot(np.zeros((24, 32, 3), np.uint8), float(number), 1e9 + number)
    assert small.ring_usage()[0] == small.capacity == 15  # (3 + 10 s margin) * 1/s + 2
