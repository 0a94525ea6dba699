"""Cameras with real video: OpenCV decodes files written at test time, the camera daemon
runs as a process, snapshots travel through the real broker."""

from __future__ import annotations

import itertools

import pytest

from edge.control import request
from tests.support.daemons import poll_until
from tests.support.video import frame_number, write_video
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
