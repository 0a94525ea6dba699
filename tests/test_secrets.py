"""Secrets never leave, and message contents cannot forge log lines (issue 13, first part)."""

from __future__ import annotations

import logging

from drivers.camera.source import _redact
from edge.runtime.logs import OneLineFormatter, escape_controls


def test_a_camera_password_is_never_shown():
    assert _redact("rtsp://admin:s3cr@t@10.0.0.5:554/Streaming/101") == \
        "rtsp://admin:***@10.0.0.5:554/Streaming/101"
    assert _redact("rtsp://10.0.0.5/a@b") == "rtsp://10.0.0.5/a@b"
    assert _redact("/dev/video0") == "/dev/video0"


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
