"""Secrets never leave, and message contents cannot forge log lines (issue 13, first part)."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import UTC, datetime

from drivers.camera.source import _redact
from edge.runtime.logs import OneLineFormatter, escape_controls
from tests.support.daemons import poll_until


def test_a_camera_password_is_never_shown():
    assert _redact("rtsp://admin:s3cr@t@10.0.0.5:554/Streaming/101") == \
        "rtsp://admin:***@10.0.0.5:554/Streaming/101"
    assert _redact("rtsp://10.0.0.5/a@b") == "rtsp://10.0.0.5/a@b"
    assert _redact("/dev/video0") == "/dev/video0"


def test_a_backend_error_quoting_the_camera_url_is_scrubbed(caplog):
    """OpenCV's backends put the URL they were given into their errors (GStreamer's
    'no element "rtsp://..."', the image sequence reader's 'can't find starting number'):
    such an error becomes the camera's last_error (status, stored state) and a log line."""
    import cv2

    from drivers.camera.source import CameraSource

    url = "rtsp://admin:p%40ss-S3CRET@10.0.0.5:554/Streaming/101"

    class BackendQuotingTheUrl(CameraSource):
        def _open(self):
            raise cv2.error(f"can't open {url} (decoded: {url.replace('%40', '@')})")

    source = BackendQuotingTheUrl("gate", url, rate=1, keep_seconds=1)
    with caplog.at_level(logging.DEBUG):
        source.start()
        try:
            poll_until(lambda: source.last_error, what="the camera's error")
        finally:
            source.close()
    assert "opening failed: error: can't open rtsp://admin:***@10.0.0.5" in caplog.text
    assert "(decoded: rtsp://admin:***@10.0.0.5" in caplog.text
    assert "S3CRET" not in source.last_error and "S3CRET" not in caplog.text


def test_a_newline_in_a_message_cannot_start_a_log_line_of_its_own():
    record = logging.LogRecord("uplink", logging.INFO, __file__, 1,
                               "platform acknowledged event %s (%s)",
                               ("e1", "desk\n2026-12-03 INFO    uplink: forged"), None)
    line = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "desk\\n2026" in line
    assert escape_controls("a\u2028b\rc\x00") == "a\\u2028b\\rc\\x00"


def test_a_traceback_keeps_its_lines():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = OneLineFormatter("%(message)s").format(record)
    assert text.startswith("failed\nTraceback")


SECRET = "GPSECRET7f3a9c"  # recognizable, and in no other text


def _leaks(text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    return SECRET.encode() in data


def test_a_planted_secret_leaves_in_no_log_output_state_or_message(make_config, daemons,
                                                                   platform, tmp_path):
    """The camera's RTSP password and the broker password, planted in a device's
    configuration: after the daemons have run (the camera failing to open, a fault raised
    and sent, the health checks stored) and every command that shows the device has been
    asked, the secret is nowhere: not in a log line, a command's output, the outbox or any
    file beside it, nor in a message the platform received."""
    from edge.tools.localbroker import free_port

    password_file = tmp_path / "mqtt-password"
    password_file.write_text(f"{SECRET}-mqtt\n")
    camera = f"rtsp://viewer:{SECRET}-rtsp@127.0.0.1:{free_port()}/Streaming/101"
    path, config = make_config(
        broker={"username": "gate-1", "password_file": str(password_file)},
        cameras={"gate": {"source": camera, "stale_after_s": 1, "fault_after_s": 0,
                          "check_interval_s": 0.5}},
        health={"interval_s": 5})
    police = platform(config)
    running = [daemons(name, path) for name in ("button", "uplink", "camera", "selftest")]
    police.wait_for(lambda p: [e for e in p.events() if e.get("code") == 330], timeout=60)

    outputs = {}
    for command in (["status", "--json"], ["status"], ["queue", "--json"],
                    ["config", "check", str(path)],
                    ["doctor", "--json", "--press-timeout", "0.2", "--ack-timeout", "0.5"],
                    ["report", "--month", datetime.now(UTC).strftime("%Y-%m"),
                     "--format", "json"]):
        result = subprocess.run([sys.executable, "-m", "edge", *command, "--config", str(path)],
                                capture_output=True, text=True, timeout=120)
        outputs[" ".join(command)] = result.stdout + result.stderr
    for daemon in running:
        daemon.stop()

    assert "cannot open rtsp://viewer:***@" in running[2].log()  # the camera did try
    leaked = [name for name, text in outputs.items() if _leaks(text)]
    leaked += [f"log of {d.name}" for d in running if _leaks(d.log())]
    leaked += [str(p) for p in (tmp_path / "state").rglob("*") if p.is_file()
               and _leaks(p.read_bytes())]
    leaked += [m.topic for m in police.messages if _leaks(m.payload)]
    assert not leaked, leaked
