"""The monthly report: every figure checked against the events put in a real outbox."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.contract.events import ContactId, EventDraft, EventKind, Identity, Qualifier, utc_iso
from edge.store.outbox import Outbox
from edge.tools.report import build_report, month_bounds, render_csv, render_json, render_markdown
from tests.test_config import guardpost

SHANGHAI = ZoneInfo("Asia/Shanghai")
IDENTITY = Identity("test-school", "gate-1", "南门 South gate")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def commit(outbox: Outbox, kind: EventKind, code: int, when: str, *, ack_after: float | None
           = None, repeat_of: str | None = None, detail: dict | None = None,
           qualifier: Qualifier = Qualifier.NEW) -> str:
    event = outbox.commit_event(EventDraft(
        kind=kind, code=code, occurred_at=at(when), clock_synced=True, boot_id="b",
        input="gate", repeat_of=repeat_of, repeat=1 if repeat_of else 0, qualifier=qualifier,
        detail=detail or {}))
    outbox.mark_sent([event.seq], at=at(when))
    if ack_after is not None:
        outbox.mark_acknowledged([(event.id, at(when) + timedelta(seconds=ack_after),
                                   "110 desk")])
    return event.id


def add_test(outbox: Outbox, when: str, state: str, method: str = "relay", *,
             trigger: str = "schedule", total: float | None = 20.0, stage: str | None = None):
    with outbox.transaction() as conn:
        conn.execute(
            "INSERT INTO alarm_tests(id, trigger, method, code, requested_at, state,"
            " failed_stage, reason, edge_to_commit_ms, commit_to_sent_ms, sent_to_ack_ms,"
            " total_ms) VALUES (?, ?, ?, 602, ?, ?, ?, ?, ?, ?, ?, ?)",
            (f"t-{when}", trigger, method, utc_iso(at(when)), state, stage,
             "no ack" if stage else None, 10.0 if total else None, 4.0 if total else None,
             total - 14.0 if total else None, total))


def add_session(outbox: Outbox, connected: str, last_seen: str, disconnected: str | None,
                session: int):
    with outbox.transaction() as conn:
        conn.execute("INSERT INTO uplink_sessions(session, connected_at, last_seen_at,"
                     " disconnected_at) VALUES (?, ?, ?, ?)",
                     (session, utc_iso(at(connected)), utc_iso(at(last_seen)),
                      utc_iso(at(disconnected)) if disconnected else None))


@pytest.fixture
def outbox(tmp_path):
    with Outbox(tmp_path / "outbox.db", IDENTITY) as opened:
        yield opened


def test_month_bounds_are_local_time():
    start, end = month_bounds("2026-11", SHANGHAI)
    assert (start, end) == (at("2026-10-31T16:00:00"), at("2026-11-30T16:00:00"))
    assert month_bounds("2026-12", SHANGHAI)[1] == at("2026-12-31T16:00:00")
    for wrong in ("November", "2026-1", " 2026-11", "2026-11-01", "2026-13", "9999-12"):
        with pytest.raises(ValueError, match="month must be YYYY-MM"):
            month_bounds(wrong, SHANGHAI)


def test_an_outbox_whose_path_a_uri_would_misread_is_read_and_left_unchanged(tmp_path):
    # "?" and "#" end a URI's path and "%" starts an escape; a school's share may have both.
    path = tmp_path / "gate 1 #2 ?50%" / "outbox.db"
    path.parent.mkdir()
    with Outbox(path, IDENTITY) as outbox:
        commit(outbox, EventKind.ALARM, ContactId.PANIC, "2026-11-03T01:00:00", ack_after=1)
    before = path.read_bytes()
    report = build_report(path, "2026-11", SHANGHAI, identity=IDENTITY,
                          now=at("2026-12-02T00:00:00"))
    assert report.alarm_summary["alarms"] == 1
    assert path.read_bytes() == before
    assert not (tmp_path / "gate 1 ").exists()  # no stray database made at a cut path


def test_a_session_that_ended_unseen_is_a_disconnection_and_the_live_one_is_not(outbox):
    add_session(outbox, "2026-11-02T00:00:00", "2026-11-02T06:00:00", "2026-11-02T06:00:00", 1)
    # A power cut: never said goodbye; its last sign of life was in the month.
    add_session(outbox, "2026-11-03T00:00:00", "2026-11-03T05:00:00", None, 2)
    # Ended unseen after the month: not this month's disconnection.
    add_session(outbox, "2026-11-30T10:00:00", "2026-12-01T01:00:00", None, 3)
    add_session(outbox, "2026-12-01T02:00:00", "2026-12-01T23:59:30", None, 4)  # live now
    report = build_report(outbox.path, "2026-11", SHANGHAI, identity=IDENTITY,
                          now=at("2026-12-02T00:00:00"))
    assert report.online["disconnections"] == 2
    assert report.online["seconds"] == (6 + 5 + 6) * 3600  # session 3 up to 16:00 UTC
    assert "(17.00 h of 688.00 h since 2026-11-02 08:00:00, 2 disconnection(s))" in \
        render_markdown(report)


def test_a_device_installed_minutes_ago_reports_minutes_online_not_zero_hours(tmp_path):
    with Outbox(tmp_path / "new.db", IDENTITY) as outbox:
        add_session(outbox, "2026-12-01T02:00:00", "2026-12-01T02:27:00", None, 1)  # then lost
    report = build_report(tmp_path / "new.db", "2026-12", SHANGHAI, identity=IDENTITY,
                          now=at("2026-12-01T02:30:00"))
    assert "(27.0 min of 30.0 min since 2026-12-01 10:00:00, 1 disconnection(s))" in \
        render_markdown(report)


def test_every_figure_matches_the_events_in_the_database(outbox):
    # October in Shanghai: not in the November report.
    commit(outbox, EventKind.ALARM, ContactId.PANIC, "2026-10-31T15:59:00", ack_after=2)
    fault_before = commit(outbox, EventKind.FAULT, 330, "2026-10-20T00:00:00",
                          detail={"camera": "gate", "problem": "black"})
    assert fault_before
    # November (local): 17:00 UTC on 31 October is already 1 November in Shanghai.
    first = commit(outbox, EventKind.ALARM, ContactId.PANIC, "2026-10-31T17:00:00", ack_after=3)
    commit(outbox, EventKind.ALARM, ContactId.PANIC, "2026-10-31T17:00:05", repeat_of=first,
           ack_after=1)
    commit(outbox, EventKind.RESET, 465, "2026-10-31T17:10:00",
           detail={"alarm_id": first, "by": "guard Li"})
    commit(outbox, EventKind.ALARM, ContactId.SILENT_PANIC, "2026-11-10T02:00:00", ack_after=7)
    silent_unacked = commit(outbox, EventKind.ALARM, ContactId.SILENT_PANIC,
                            "2026-11-20T02:00:00")
    commit(outbox, EventKind.FAULT, 350, "2026-11-05T00:00:00",
           detail={"check": "broker", "summary": "not connected"})
    commit(outbox, EventKind.RESTORE, 350, "2026-11-05T00:20:00", qualifier=Qualifier.RESTORE,
           detail={"check": "broker", "summary": "round trip 2 ms"})
    commit(outbox, EventKind.FAULT, 307, "2026-11-25T00:00:00",
           detail={"check": "disk", "summary": "only 50 MB free"})
    commit(outbox, EventKind.FALLBACK, 354, "2026-11-20T02:00:11",
           detail={"path": "sms", "event_ids": [silent_unacked],
                   "recipients": {"+8613800138000": {"state": "sent"}}, "text": "..."})
    add_test(outbox, "2026-11-01T02:00:00", "passed", total=20.0)
    add_test(outbox, "2026-11-15T02:00:00", "failed", total=None, stage="acknowledged")
    add_test(outbox, "2026-11-16T02:00:00", "passed", "software", trigger="manual", total=30.0)
    add_test(outbox, "2026-12-01T02:00:00", "passed", total=5.0)  # December
    # Online: from before the month into it (counts from the month start), a crash
    # (ends at its last heartbeat), and the current connection.
    add_session(outbox, "2026-10-31T10:00:00", "2026-11-02T16:00:00", "2026-11-02T16:00:00", 1)
    add_session(outbox, "2026-11-03T16:00:00", "2026-11-04T16:00:00", None, 2)
    add_session(outbox, "2026-11-10T16:00:00", "2026-11-30T16:00:10", None, 3)

    now = at("2026-11-30T16:00:00") + timedelta(seconds=30)  # just after the month
    report = build_report(outbox.path, "2026-11", SHANGHAI, identity=IDENTITY, now=now)

    t = report.test_summary
    assert (t["run"], t["passed"], t["failed"]) == (3, 2, 1)
    assert t["by_trigger"] == {"schedule": 2, "manual": 1, "platform": 0}
    assert t["by_method"] == {"relay": 2, "software": 1}
    assert t["latency_ms"]["total"] == {"count": 2, "min": 20.0, "median": 25.0, "max": 30.0}
    assert t["monthly_test_done"] and t["requirement"].startswith("met")
    assert [x["failed_stage"] for x in report.tests] == [None, "acknowledged", None]
    assert report.tests[0]["requested_at"] == "2026-11-01 10:00:00"  # local time

    a = report.alarm_summary
    assert (a["alarms"], a["repeats"], a["unacknowledged"]) == (3, 1, 1)
    assert a["by_input"] == {"gate": 3}
    assert a["time_to_ack_s"] == {"count": 2, "min": 3.0, "median": 5.0, "max": 7.0}
    assert [x["repeats"] for x in report.alarms] == [1, 0, 0]
    assert report.alarms[0]["acknowledged_by"] == "110 desk"
    assert [r["by"] for r in report.resets] == ["guard Li"]
    assert [(f["kind"], f["subject"]) for f in report.faults] == [
        ("fault", "broker"), ("restore", "broker"), ("fault", "disk")]
    assert sorted(f["subject"] for f in report.open_faults) == ["camera gate", "disk"]
    assert report.sms == [{"occurred_at": "2026-11-20 10:00:11", "alarms": [silent_unacked],
                           "recipients": {"+8613800138000": "sent"}}]

    month = 30 * 86400
    # 2 days (from the month's start), 1 day (to its last heartbeat), 20 days (to the end).
    online = (2 + 1 + 20) * 86400
    assert report.online == {"seconds": float(online), "period_seconds": float(month),
                             "since": "2026-11-01 00:00:00",
                             "percent": round(100 * online / month, 3), "sessions": 3,
                             "disconnections": 2}  # session 1, and 2 unseen
    assert report.complete  # within keep_days


def test_renders_markdown_csv_and_json_and_the_command_writes_them(outbox, tmp_path,
                                                                  make_config):
    commit(outbox, EventKind.ALARM, ContactId.PANIC, "2026-11-03T01:00:00", ack_after=1.5)
    add_test(outbox, "2026-11-01T02:00:00", "passed", "software", total=12.0)
    report = build_report(outbox.path, "2026-11", SHANGHAI, identity=IDENTITY,
                          now=at("2026-12-02T00:00:00"))
    markdown = render_markdown(report)
    assert "# 一键报警装置月度记录 Monthly record — 2026-11" in markdown
    assert "NOT met by a wiring test: only software tests passed" in markdown
    assert "software (wiring not covered)" in markdown
    rows = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert {r["section"] for r in rows} == {"summary", "test", "alarm"}
    [alarm] = [r for r in rows if r["section"] == "alarm"]
    assert alarm["time_to_ack_s"] == "1.5" and alarm["time"] == "2026-11-03 09:00:00"
    assert alarm["acknowledged_by"] == "110 desk"
    document = json.loads(render_json(report))
    assert document["schema"] == "guardpost/report@1"
    assert document["alarm_summary"]["alarms"] == 1

    path, _ = make_config(storage={"database": str(outbox.path)})
    out = tmp_path / "2026-11.csv"
    written = guardpost("report", "--month", "2026-11", "--format", "csv", "-o", str(out),
                        "-c", str(path))
    assert written.returncode == 0 and out.read_text().startswith("section,time,kind")
    bad = guardpost("report", "--month", "11/2026", "-c", str(path))
    assert bad.returncode == 2 and "month must be YYYY-MM" in bad.stderr


def test_a_month_older_than_the_kept_events_says_so(outbox):
    commit(outbox, EventKind.ALARM, ContactId.PANIC, "2026-11-03T01:00:00", ack_after=1)
    report = build_report(outbox.path, "2026-08", SHANGHAI, identity=IDENTITY,
                          now=at("2026-11-20T00:00:00"))
    assert not report.complete and "pruned" in report.note


_minute = st.integers(min_value=0, max_value=40 * 1440).map(
    lambda m: at("2026-10-25T00:00:00") + timedelta(minutes=m))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_minute, st.integers(min_value=0, max_value=5 * 1440)),
                max_size=8))
def test_time_online_is_the_union_of_sessions_within_the_month(tmp_path_factory, sessions):
    path = tmp_path_factory.mktemp("online") / "outbox.db"
    now = at("2026-12-10T00:00:00")
    with Outbox(path, IDENTITY) as outbox:
        for number, (begin, length) in enumerate(sessions, start=1):
            end = begin + timedelta(minutes=length)
            add_session(outbox, begin.isoformat()[:19], end.isoformat()[:19],
                        end.isoformat()[:19], number)
    report = build_report(path, "2026-11", SHANGHAI, identity=IDENTITY, now=now)
    start, end = month_bounds("2026-11", SHANGHAI)
    minutes = set()  # brute force, minute by minute
    for begin, length in sessions:
        lo = max(begin, start)
        hi = min(begin + timedelta(minutes=length), end)
        minutes.update(range(int(lo.timestamp()) // 60, int(hi.timestamp()) // 60))
    assert report.online["seconds"] == 60 * len(minutes)
    assert 0 <= report.online["seconds"] <= report.online["period_seconds"]
