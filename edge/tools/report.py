"""``guardpost report --month YYYY-MM``: the monthly record the authorities ask for.

Police and education departments require each campus one-key alarm to be tested at least
once a month. This report says, for one calendar month in the site's time zone: the alarm
tests run and passed with each stage's latency, the alarms with the time the platform
took to acknowledge them, resets, faults and restores (and faults still open at the end
of the month), the SMS second path, and the time the device was online.

It reads the outbox read-only (:class:`edge.store.reader.OutboxReader`, SQLite
``mode=ro``): a report never blocks or changes the device. Delivered events older than
``storage.keep_days`` are pruned, so the report says when a month starts before the
oldest event it still has.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from edge.contract.events import Identity, utc_iso, utc_now
from edge.store.reader import OutboxReader
from edge.store.rows import EventRow

REPORT_SCHEMA = "guardpost/report@1"
ONLINE_GRACE_S = 120  # the newest session counts as still up if seen this recently


def month_bounds(month: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC bounds of a calendar month of the site's local time."""
    # strptime alone takes "2026-1" and " 2026-11": a report's name must be exact.
    try:
        if not re.fullmatch(r"\d{4}-\d{2}", month):
            raise ValueError
        first = datetime.strptime(month, "%Y-%m")
        start = first.replace(tzinfo=zone)
        following = (first.replace(day=28) + timedelta(days=4)).replace(day=1, tzinfo=zone)
        return start.astimezone(UTC), following.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: 9999-12 has no following month
        raise ValueError(f"month must be YYYY-MM (e.g. 2026-11), not {month!r}") from None


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "min": None, "median": None, "max": None}
    return {"count": len(values), "min": round(min(values), 3),
            "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def _parse(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp) if stamp else None


@dataclass
class MonthlyReport:
    site_id: str
    device_id: str
    location: str
    month: str
    timezone: str
    period_start: str
    period_end: str
    generated_at: str
    complete: bool = True
    note: str | None = None
    tests: list[dict] = field(default_factory=list)
    test_summary: dict = field(default_factory=dict)
    alarms: list[dict] = field(default_factory=list)
    alarm_summary: dict = field(default_factory=dict)
    resets: list[dict] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)   # faults and restores, in order
    open_faults: list[dict] = field(default_factory=list)
    sms: list[dict] = field(default_factory=list)
    online: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"schema": REPORT_SCHEMA, **asdict(self)}


class _Reader:
    def __init__(self, store: OutboxReader, zone: ZoneInfo, start: datetime, end: datetime):
        self.store, self.zone, self.start, self.end = store, zone, start, end

    def local(self, stamp: str | None) -> str | None:
        moment = _parse(stamp)
        return moment.astimezone(self.zone).strftime("%Y-%m-%d %H:%M:%S") if moment else None

    # -- tests -------------------------------------------------------------------------

    def tests(self) -> tuple[list[dict], dict]:
        rows = self.store.tests_requested_between(self.start, self.end)
        tests = [{"test_id": r.id, "requested_at": self.local(r.requested_at),
                  "trigger": r.trigger, "method": r.method or None, "code": r.code,
                  "covers_wiring": r.method == "relay", "result": r.state,
                  "failed_stage": r.failed_stage, "reason": r.reason,
                  "edge_to_commit_ms": r.edge_to_commit_ms,
                  "commit_to_sent_ms": r.commit_to_sent_ms,
                  "sent_to_ack_ms": r.sent_to_ack_ms, "total_ms": r.total_ms}
                 for r in rows]
        passed = [t for t in tests if t["result"] == "passed"]
        relay_passed = [t for t in passed if t["covers_wiring"]]
        summary = {
            "run": sum(1 for t in tests if t["result"] in ("passed", "failed")),
            "passed": len(passed),
            "failed": sum(1 for t in tests if t["result"] == "failed"),
            "not_finished": sum(1 for t in tests if t["result"] in ("requested", "running")),
            "by_trigger": {k: sum(1 for t in tests if t["trigger"] == k)
                           for k in ("schedule", "manual", "platform")},
            "by_method": {k: sum(1 for t in tests if t["method"] == k)
                          for k in ("relay", "software")},
            "latency_ms": {stage: _stats([t[f"{stage}_ms"] for t in passed
                                          if t[f"{stage}_ms"] is not None])
                           for stage in ("edge_to_commit", "commit_to_sent", "sent_to_ack",
                                         "total")},
            "monthly_test_done": bool(relay_passed),
        }
        if relay_passed:
            summary["requirement"] = "met: a test through the real wiring passed"
        elif passed:
            summary["requirement"] = ("NOT met by a wiring test: only software tests passed "
                                      "(they do not cover the button's wiring)")
        else:
            summary["requirement"] = "NOT met: no alarm test passed this month"
        return tests, summary

    # -- events ------------------------------------------------------------------------

    def events(self, kinds: tuple[str, ...]) -> list[EventRow]:
        return self.store.events_between(kinds, self.start, self.end)

    def alarms(self) -> tuple[list[dict], dict]:
        rows = self.events(("alarm",))
        firsts = [r for r in rows if r.repeat_of is None]
        repeats: dict[str, int] = {}
        for r in rows:
            if r.repeat_of is not None:
                repeats[r.repeat_of] = repeats.get(r.repeat_of, 0) + 1
        alarms = []
        for r in firsts:
            ack = _parse(r.acknowledged_at)
            alarms.append({
                "event_id": r.id, "seq": r.seq, "input": r.input, "code": r.code,
                "occurred_at": self.local(r.occurred_at),
                "acknowledged_at": self.local(r.acknowledged_at),
                "acknowledged_by": r.acknowledged_by,
                "time_to_ack_s": round((ack - _parse(r.occurred_at)).total_seconds(), 3)
                if ack else None,
                "repeats": repeats.get(r.id, 0)})
        ack_times = [a["time_to_ack_s"] for a in alarms if a["time_to_ack_s"] is not None]
        summary = {
            "alarms": len(alarms), "repeats": sum(1 for r in rows if r.repeat_of),
            "by_input": {name: sum(1 for a in alarms if a["input"] == name)
                         for name in sorted({a["input"] for a in alarms})},
            "unacknowledged": sum(1 for a in alarms if a["acknowledged_at"] is None),
            "time_to_ack_s": _stats(ack_times),
        }
        return alarms, summary

    def resets(self) -> list[dict]:
        return [{"event_id": r.id, "input": r.input, "occurred_at": self.local(r.occurred_at),
                 "alarm_id": json.loads(r.payload).get("detail", {}).get("alarm_id"),
                 "by": json.loads(r.payload).get("detail", {}).get("by")}
                for r in self.events(("reset",))]

    @staticmethod
    def _subject(row: EventRow) -> str:
        detail = json.loads(row.payload).get("detail", {})
        return detail.get("check") or (f"camera {detail['camera']}" if "camera" in detail
                                       else str(row.code))

    def faults(self) -> tuple[list[dict], list[dict]]:
        listed = []
        for r in self.events(("fault", "restore")):
            detail = json.loads(r.payload).get("detail", {})
            listed.append({"kind": r.kind, "code": r.code, "subject": self._subject(r),
                           "occurred_at": self.local(r.occurred_at),
                           "summary": detail.get("summary") or detail.get("problem")
                           or detail.get("reason")})
        # Open at the end of the month: the last word on a subject, up to then, is a fault
        # (the fault may have been raised in an earlier month).
        last: dict[tuple, dict] = {}
        for r in self.store.events_before(("fault", "restore"), self.end):
            last[(r.code, self._subject(r))] = r
        still = [{"code": r.code, "subject": subject, "since": self.local(r.occurred_at)}
                 for (_, subject), r in last.items() if r.kind == "fault"]
        return listed, still

    def sms(self) -> list[dict]:
        out = []
        for r in self.events(("fallback",)):
            detail = json.loads(r.payload).get("detail", {})
            out.append({"occurred_at": self.local(r.occurred_at),
                        "alarms": detail.get("event_ids", []),
                        "recipients": {n: v.get("state")
                                       for n, v in detail.get("recipients", {}).items()}})
        return out

    # -- time online -------------------------------------------------------------------

    def online(self, now: datetime) -> dict:
        """Time connected to the broker, within the part of the month that has passed
        and since the device's first connection (a device installed mid-month)."""
        until = min(self.end, now)
        sessions = self.store.sessions()
        first = min((_parse(x.connected_at) for x in sessions), default=self.start)
        since = max(self.start, first)
        period = max(0.0, (until - since).total_seconds())
        intervals, disconnections = [], 0
        for index, s in enumerate(sessions):
            begin = _parse(s.connected_at)
            current = (not s.disconnected_at and index == len(sessions) - 1
                       and (now - _parse(s.last_seen_at)).total_seconds() <= ONLINE_GRACE_S)
            if current:
                end = now
            else:
                # Ended cleanly, or unseen (a crash, a power cut: its last sign of life).
                end = _parse(s.disconnected_at or s.last_seen_at)
                disconnections += self.start <= end < self.end
            begin, end = max(begin, self.start), min(end, until)
            if end > begin:
                intervals.append((begin, end))
        total, reach = 0.0, None
        for begin, end in sorted(intervals):  # the union: overlapping sessions count once
            if reach is not None:
                begin = max(begin, reach)
            if end > begin:
                total += (end - begin).total_seconds()
            reach = end if reach is None else max(reach, end)
        return {"seconds": round(total, 3), "period_seconds": round(period, 3),
                "since": self.local(utc_iso(since)),
                "percent": round(100 * total / period, 3) if period else None,
                "sessions": len(intervals), "disconnections": disconnections}


def build_report(database: str | Path, month: str, zone: ZoneInfo,
                 *, identity: Identity, now: datetime | None = None,
                 keep_days: int = 90) -> MonthlyReport:
    """The report of ``month`` (YYYY-MM, local time of ``zone``) from the outbox, whose
    delivered events are kept ``keep_days`` (storage.keep_days)."""
    start, end = month_bounds(month, zone)
    now = now or utc_now()
    with OutboxReader(database) as store:
        reader = _Reader(store, zone, start, end)
        report = MonthlyReport(
            site_id=identity.site_id, device_id=identity.device_id, location=identity.location,
            month=month, timezone=str(zone), period_start=utc_iso(start),
            period_end=utc_iso(end), generated_at=utc_iso(now))
        if start < now - timedelta(days=keep_days):
            report.complete = False
            report.note = (f"delivered events older than {keep_days} days are pruned "
                           "(storage.keep_days): this month may be incomplete")
        if start > now:
            report.note = "this month has not begun"
        report.tests, report.test_summary = reader.tests()
        report.alarms, report.alarm_summary = reader.alarms()
        report.resets = reader.resets()
        report.faults, report.open_faults = reader.faults()
        report.sms = reader.sms()
        report.online = reader.online(now)
        return report


# -- rendering -----------------------------------------------------------------------------


def render_json(report: MonthlyReport) -> str:
    return json.dumps(report.as_dict(), ensure_ascii=False, indent=2) + "\n"


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _duration(seconds: float) -> str:
    """Hours for a month; minutes for a device installed an hour ago (not "0.00 h")."""
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _table(title: str, headers: tuple, rows: list[tuple], empty: str) -> list[str]:
    lines = ["", f"## {title}", ""]
    if not rows:
        return [*lines, empty]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def render_markdown(report: MonthlyReport) -> str:
    t, a, o = report.test_summary, report.alarm_summary, report.online
    lat = t["latency_ms"]["total"]
    lines = [
        f"# 一键报警装置月度记录 Monthly record — {report.month}",
        "",
        f"**{report.location}** — site `{report.site_id}`, device `{report.device_id}`; "
        f"{report.timezone}; generated {report.generated_at}",
        "",
    ]
    if report.note:
        lines += [f"> Note: {report.note}", ""]
    online = "-" if o["percent"] is None else f"{o['percent']:.2f} %"
    lines += [
        "| 项目 Item | 数值 Value |",
        "|---|---|",
        f"| 报警测试 Alarm tests run / passed / failed | {t['run']} / {t['passed']} / "
        f"{t['failed']} |",
        f"| 月度测试要求 Monthly test requirement | {t['requirement']} |",
        f"| 测试总时延 Test latency, edge to platform ack (ms) min / median / max | "
        f"{_ms(lat['min'])} / {_ms(lat['median'])} / {_ms(lat['max'])} |",
        f"| 报警 Alarms (repeats) | {a['alarms']} ({a['repeats']}) |",
        f"| 未确认报警 Unacknowledged alarms | {a['unacknowledged']} |",
        f"| 确认时间 Time to acknowledgement (s) median / max | "
        f"{_s(a['time_to_ack_s']['median'])} / {_s(a['time_to_ack_s']['max'])} |",
        f"| 复位 Resets | {len(report.resets)} |",
        f"| 故障 / 恢复 Faults / restores | "
        f"{sum(1 for f in report.faults if f['kind'] == 'fault')} / "
        f"{sum(1 for f in report.faults if f['kind'] == 'restore')} |",
        f"| 月末未恢复故障 Faults open at month end | {len(report.open_faults)} |",
        f"| 短信通道 Alarms sent by SMS | {sum(len(s['alarms']) for s in report.sms)} |",
        f"| 在线时间 Time online | {online} ({_duration(o['seconds'])} of "
        f"{_duration(o['period_seconds'])} since {o['since']}, {o['disconnections']} "
        "disconnection(s)) |",
    ]
    lines += _table("报警测试 Alarm tests", (
        "time", "trigger", "method", "code", "result", "edge→commit", "commit→broker",
        "broker→ack", "total (ms)", "failed stage / reason"), [
        (x["requested_at"], x["trigger"],
         (x["method"] or "-") + (" (wiring not covered)" if x["method"] == "software" else ""),
         x["code"], x["result"], _ms(x["edge_to_commit_ms"]), _ms(x["commit_to_sent_ms"]),
         _ms(x["sent_to_ack_ms"]), _ms(x["total_ms"]),
         f"{x['failed_stage']}: {x['reason']}" if x["result"] == "failed" else "")
        for x in report.tests], "No alarm test this month.")
    lines += _table("报警 Alarms", (
        "time", "input", "code", "acknowledged", "by", "time to ack (s)", "repeats"), [
        (x["occurred_at"], x["input"], x["code"], x["acknowledged_at"] or "NOT ACKNOWLEDGED",
         x["acknowledged_by"] or "", _s(x["time_to_ack_s"]), x["repeats"])
        for x in report.alarms], "No alarm this month.")
    lines += _table("故障与恢复 Faults and restores", ("time", "kind", "code", "what", "summary"), [
        (x["occurred_at"], x["kind"], x["code"], x["subject"], x["summary"] or "")
        for x in report.faults], "No fault this month.")
    if report.open_faults:
        lines += ["", "Open at the end of the month: " + "; ".join(
            f"{f['subject']} ({f['code']}) since {f['since']}" for f in report.open_faults)]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("section", "time", "kind", "code", "input_or_subject", "result", "method",
               "trigger", "edge_to_commit_ms", "commit_to_sent_ms", "sent_to_ack_ms",
               "total_ms", "acknowledged_at", "acknowledged_by", "time_to_ack_s", "detail")


def render_csv(report: MonthlyReport) -> str:
    """One row per item, with a ``section`` column, so it opens in a spreadsheet."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    t, a, o = report.test_summary, report.alarm_summary, report.online
    for key, value in (("tests_run", t["run"]), ("tests_passed", t["passed"]),
                       ("tests_failed", t["failed"]), ("requirement", t["requirement"]),
                       ("alarms", a["alarms"]), ("repeats", a["repeats"]),
                       ("unacknowledged", a["unacknowledged"]),
                       ("resets", len(report.resets)), ("online_seconds", o["seconds"]),
                       ("online_percent", o["percent"]),
                       ("disconnections", o["disconnections"])):
        writer.writerow({"section": "summary", "kind": key, "detail": value})
    for x in report.tests:
        writer.writerow({"section": "test", "time": x["requested_at"], "kind": "test",
                         "code": x["code"], "result": x["result"], "method": x["method"],
                         "trigger": x["trigger"], **{k: x[k] for k in (
                             "edge_to_commit_ms", "commit_to_sent_ms", "sent_to_ack_ms",
                             "total_ms")},
                         "detail": (f"{x['failed_stage']}: {x['reason']}"
                                    if x["result"] == "failed" else "")})
    for x in report.alarms:
        writer.writerow({"section": "alarm", "time": x["occurred_at"], "kind": "alarm",
                         "code": x["code"], "input_or_subject": x["input"],
                         "acknowledged_at": x["acknowledged_at"],
                         "acknowledged_by": x["acknowledged_by"],
                         "time_to_ack_s": x["time_to_ack_s"],
                         "detail": f"repeats={x['repeats']}"})
    for x in report.faults:
        writer.writerow({"section": x["kind"], "time": x["occurred_at"], "kind": x["kind"],
                         "code": x["code"], "input_or_subject": x["subject"],
                         "detail": x["summary"] or ""})
    return out.getvalue()
