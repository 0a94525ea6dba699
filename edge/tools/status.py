"""``guardpost queue`` and ``guardpost status``: what the device knows about itself.

Everything comes from the outbox database and the button daemon's control socket, so
these commands work while the daemons run and tell the truth when they do not: a
daemon's recorded state older than its own reporting interval is shown as stale,
never as "OK".
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

from edge.config import Config
from edge.contract.events import Priority, utc_now
from edge.contract.presence import describe
from edge.daemons.button.latch import AlarmLatch
from edge.daemons.selftest.alarmtest import latest_test
from edge.runtime.control import ControlUnavailable, request
from edge.store import salvage
from edge.store.outbox import STATES, Outbox, QueueSummary
from edge.store.reserve import MIB, SpaceReserve, alarms_per_reserve
from edge.store.trouble import free_bytes

PRIORITY_NAMES = [p.name.lower() for p in Priority]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def queue_text(summary: QueueSummary) -> str:
    width = max(len(n) for n in PRIORITY_NAMES) + 2
    lines = ["state".ljust(14) + "".join(n.rjust(width) for n in PRIORITY_NAMES)
             + "total".rjust(width)]
    for state in STATES:
        row = summary.counts.get(state, {})
        lines.append(state.ljust(14) + "".join(str(row.get(n, 0)).rjust(width)
                                               for n in PRIORITY_NAMES)
                     + str(sum(row.values())).rjust(width))
    if summary.oldest_unsent_seq is None:
        lines.append("oldest unsent: none (everything has reached the broker)")
    else:
        lines.append(f"oldest unsent: seq {summary.oldest_unsent_seq}, committed "
                     f"{summary.oldest_unsent_committed_at}, "
                     f"waiting {_age(summary.oldest_unsent_age_s)}")
    lines.append(f"last sequence number: {summary.last_seq}")
    return "\n".join(lines)


def queue_json(summary: QueueSummary) -> str:
    return json.dumps(asdict(summary) | {"unsent": summary.unsent}, indent=2)


def stale_after(config: Config) -> float:
    # The uplink records its state at every heartbeat and at every reconnect attempt
    # (at most reconnect_max apart); three missed reports mean it is not running.
    return 3 * max(config.uplink.heartbeat_interval, config.uplink.reconnect_max)


def collect_status(config: Config, outbox: Outbox) -> dict:
    """Everything ``guardpost status`` shows, as one dictionary."""
    now = utc_now()
    latches = AlarmLatch(outbox, config.inputs).latches()
    event_states = outbox.event_states(
        [lt.alarm_id for lt in latches.values()] + [lt.last_event_id for lt in latches.values()])
    status: dict = {
        "device": {"site_id": config.device.site_id, "device_id": config.device.device_id,
                   "location": config.device.location, "config": config.fingerprint()},
        "alarm": {name: {"alarm_id": lt.alarm_id, "latched_at": lt.latched_at,
                         "repeats": lt.repeats,
                         "alarm_state": event_states.get(lt.alarm_id, "pruned"),
                         "latest_state": event_states.get(lt.last_event_id, "pruned")}
                  for name, lt in latches.items()},
        "outbox": outbox.backlog(now),
        "storage": storage_status(config, outbox),
    }
    try:
        button = request(config.storage.runtime_dir / "button.ctl", {"op": "status"}, timeout=3)
        status["button"] = {"running": True, **{k: v for k, v in button.items() if k != "ok"}}
    except (ControlUnavailable, OSError) as err:
        status["button"] = {"running": False, "error": str(err)}
    states = outbox.daemons.all()
    if "uplink" in states:
        raw, updated = states["uplink"]
        age = (now - datetime.fromisoformat(updated)).total_seconds()
        uplink = json.loads(raw) | {"updated_at": updated, "report_age_s": round(age, 1)}
        uplink["stale"] = age > stale_after(config)
        status["uplink"] = uplink
    else:
        status["uplink"] = {"stale": True, "error": "the uplink has never run"}
    if "selftest" in states:
        raw, updated = states["selftest"]
        age = (now - datetime.fromisoformat(updated)).total_seconds()
        selftest = json.loads(raw)
        status["selftest"] = {
            "checks": selftest.get("checks", {}), "checked_at": selftest.get("checked_at"),
            "last_test": latest_test(outbox), "next_test": selftest.get("next_test"),
            "schedule": selftest.get("schedule"), "report_age_s": round(age, 1),
            # Records after every run, or a test; three missed runs: not running.
            "stale": age > 3 * config.health.interval_s + config.alarm_test.ack_timeout_s}
    else:
        status["selftest"] = {"stale": True, "error": "the self-test daemon has never run"}
    if config.fallback is not None:
        if "fallback" in states:
            raw, updated = states["fallback"]
            status["fallback"] = json.loads(raw) | {"updated_at": updated}
        else:
            status["fallback"] = {"error": "the fallback daemon has never run"}
    if config.cameras:
        try:
            camera = request(config.storage.runtime_dir / "camera.ctl", {"op": "status"},
                             timeout=3)
            status["camera"] = {"running": True, "cameras": camera["cameras"]}
        except (ControlUnavailable, OSError) as err:
            status["camera"] = {"running": False, "error": str(err)}
    return status


def storage_status(config: Config, outbox: Outbox) -> dict:
    """The disk and the outbox's history: the alarm reserve, damaged files moved aside
    and not yet read back, the epoch and what was lost before it."""
    reserve = SpaceReserve.of(config.storage)
    held = reserve.held()
    return {"epoch": outbox.epoch, "free_mb": round(free_bytes(outbox.path.parent) / MIB, 1),
            "reserve_mb": round(held / MIB, 2), "reserve_size_mb": reserve.size // MIB,
            "reserve_alarms": alarms_per_reserve(held),
            "disk_full": reserve.drawn(),
            "damaged_pending": [p.name for p in salvage.pending(outbox.path)],
            "lost_history": outbox.lost_history()}


def healthy(status: dict) -> bool:
    uplink = status["uplink"]
    camera = status.get("camera", {"running": True, "cameras": {}})
    cameras_ok = camera["running"] and not any(c["fault"] for c in camera["cameras"].values())
    selftest = status.get("selftest", {})
    checks_ok = not selftest.get("stale") and not any(
        c.get("fault") for c in selftest.get("checks", {}).values())
    storage = status["storage"]
    return (status["button"]["running"] and not uplink.get("stale")
            and not storage["disk_full"] and not storage["damaged_pending"]
            and bool(uplink.get("connected")) and status["outbox"]["queued"] == 0
            and cameras_ok and checks_ok)


def status_text(status: dict) -> str:
    d = status["device"]
    lines = [f"device   {d['site_id']}/{d['device_id']}  ({d['location']})  config {d['config']}"]
    if status["alarm"]:
        for name, a in status["alarm"].items():
            lines.append(f"ALARM    {name}: latched since {a['latched_at']}, {a['repeats']} "
                         f"repeat(s); alarm {a['alarm_state']}, latest {a['latest_state']}"
                         "  (clear with: guardpost reset)")
    else:
        lines.append("alarm    none latched")
    b = status["button"]
    if b["running"]:
        inputs = ", ".join(f"{n}{'(ACTIVE)' if i['active'] else ''}"
                           for n, i in b["inputs"].items())
        lines.append(f"button   running (pid {b['pid']}, {b['pin_factory']}), LED {b['led']}, "
                     f"inputs: {inputs}")
        if b.get("unrecorded_presses"):
            lines.append(f"         {b['unrecorded_presses']} press(es) NOT YET RECORDED (see log)")
    else:
        lines.append(f"button   NOT RUNNING ({b['error']})")
    st = status["storage"]
    lines.append(f"storage  {st['free_mb']:,.1f} MB free, alarm reserve {st['reserve_mb']:.1f} "
                 f"of {st['reserve_size_mb']} MB (about {st['reserve_alarms']} alarms), "
                 f"epoch {st['epoch']}")
    if st["disk_full"]:
        lines.append("         DISK FULL: alarms are recorded from the reserve; pictures wait")
    for name in st["damaged_pending"]:
        lines.append(f"         DAMAGED outbox moved aside, being read back: {name}")
    if st["lost_history"]:
        lost = st["lost_history"]
        span = (f"seq {lost['lost_from_seq']}-{lost['lost_to_seq']} lost, "
                if "lost_from_seq" in lost else "")
        lines.append(f"         history before this epoch: {span}{lost['reason']}")
    u = status["uplink"]
    if "broker" not in u:
        lines.append(f"uplink   NOT RUNNING ({u.get('error')})")
    else:
        state = "connected" if u["connected"] else "disconnected"
        if u["stale"]:
            state = f"STALE: last report {u['report_age_s']:.0f} s ago (not running?); was {state}"
        line = f"uplink   {state} to {u['broker']} (MQTT {u['protocol']}"
        line += ", TLS)" if u["tls"] else ")"
        line += f", session {u['session']}"
        if u.get("connected_at") and u["connected"]:
            line += f", since {u['connected_at']}"
        lines.append(line)
        if u["connected"] and "platform" in u:
            platform = u["platform"]
            text = describe(platform)
            if platform.get("state") == "offline":
                text = f"OFFLINE: {text}; alarms go by SMS at once"
            elif platform.get("state") == "unknown":
                text += " (no presence published: alarms go by SMS after the ack timeout)"
            lines.append(f"platform {text}")
        if u.get("last_error"):
            lines.append(f"         last error: {u['last_error']}")
    if "camera" in status:
        camera = status["camera"]
        if not camera["running"]:
            lines.append(f"camera   NOT RUNNING ({camera['error']})")
        for name, c in camera.get("cameras", {}).items():
            age = "no frame" if c["frame_age_s"] is None else f"frame {c['frame_age_s']:.1f} s old"
            state = f"FAULT: {c['fault']}" if c["fault"] else "ok"
            lines.append(f"camera   {name}: {state}, "
                         f"{'connected' if c['connected'] else 'DISCONNECTED'}, {age}")
    if "fallback" in status:
        f = status["fallback"]
        modem = f.get("modem")
        if modem is None:
            lines.append(f"modem    NOT RUNNING ({f.get('error')})")
        elif not modem.get("present"):
            lines.append(f"modem    NOT ANSWERING on {f.get('port')}: {modem.get('error')}")
        else:
            signal = (f"{modem['signal_dbm']} dBm (CSQ {modem['signal_csq']})"
                      if modem.get("signal_dbm") is not None else "signal unknown")
            problems = f"  PROBLEM: {'; '.join(modem['problems'])}" if modem["problems"] else ""
            lines.append(f"modem    {modem.get('model') or 'present'} on {f.get('port')}: SIM "
                         f"{modem.get('sim')}, network {modem.get('registration') or '-'}"
                         f"{' (' + modem['operator'] + ')' if modem.get('operator') else ''}, "
                         f"{signal}{problems}")
    lines.extend(_selftest_lines(status.get("selftest")))
    o = status["outbox"]
    lines.append(f"outbox   {o['queued']} unsent, {o['sent_unacknowledged']} awaiting the "
                 f"platform's acknowledgement, oldest unsent {_age(o['oldest_unsent_age_s'])}, "
                 f"last seq {o['last_seq']}")
    return "\n".join(lines)


def _selftest_lines(selftest: dict | None) -> list[str]:
    if selftest is None:
        return []
    if "checks" not in selftest:
        return [f"checks   NOT RUNNING ({selftest.get('error')})"]
    lines = []
    if selftest["stale"]:
        lines.append(f"checks   STALE: last run {selftest['report_age_s']:.0f} s ago "
                     "(self-test daemon not running?)")
    for name, check in selftest["checks"].items():
        if check["ok"] is None:
            state = "n/a  "
        elif check.get("fault"):
            state = "FAULT"
        else:
            state = "ok   " if check["ok"] else "fail "  # failing, not yet a fault
        lines.append(f"check    {name:<16} {state} {check['summary']}")
    test = selftest.get("last_test")
    if test:
        how = "relay" if test.get("covers_wiring") else "software, not covering the wiring"
        if test["result"] == "passed":
            lines.append(f"test     last alarm test PASSED at {test.get('at')} ({how}), "
                         f"{test['stages_ms'].get('total')} ms to the platform")
        else:
            lines.append(f"test     last alarm test FAILED at {test.get('at')} ({how}): stage "
                         f"{test.get('failed_stage')}: {test.get('reason')}")
    else:
        lines.append("test     no alarm test yet")
    if selftest.get("next_test"):
        lines.append(f"         next scheduled {selftest['next_test']} "
                     f"(schedule '{selftest.get('schedule')}')")
    return lines
