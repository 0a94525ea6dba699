"""The duty-desk screen (Textual): alarms on top, the devices, the tests and faults, and
a status line. Keys: ``a`` acknowledge the selected alarm, ``o`` open its snapshot, ``f``
filter by school, ``q`` quit.

The screen only reads the model (:class:`edge.console.fleet.Fleet`); the client's thread
feeds it. The tables are redrawn every second (the lost-device rule is judged then, on
the monotonic clock) and at once when an alarm arrives (with the terminal's bell).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import UTC
from typing import ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Footer, Input, Static
from textual.widgets.data_table import CellDoesNotExist, RowDoesNotExist

from edge.console.fleet import AckState, Alarm, Fleet, Link

REFRESH_S = 1.0
MAX_DEVICE_ROWS = 300   # lost and offline first; the online rest is counted, not listed


def _clock(alarm: Alarm) -> str:
    return alarm.received_at.astimezone(UTC).strftime("%H:%M:%S")


def _waited(alarm: Alarm) -> str:
    """How long it waited on the device (its own figure, MQTT 5), else from the press to
    here when the device's clock was synchronised."""
    if alarm.held_s is not None:
        return f"{alarm.held_s:.1f} s on device"
    return "clock not synced" if alarm.waited_s is None else f"{alarm.waited_s:.1f} s"


def _ack(alarm: Alarm) -> str:
    text = {AckState.UNACKNOWLEDGED: "NOT ACKNOWLEDGED", AckState.SENDING: "sending ack",
            AckState.ACKNOWLEDGED: "acknowledged"}[alarm.ack]
    return text + (f" x{alarm.acks_sent}" if alarm.acks_sent > 1 else "")


def _verified(alarm: Alarm) -> str:
    if alarm.verified is None:
        return "not checked"
    return "signed" if alarm.verified else f"NOT VERIFIED: {alarm.problem or ''}"[:60]


def _heard(device, link: Link, now: float) -> str:
    """For a device that is not online: since when, and why. Online ones say nothing (a
    column that changes every second for thousands of rows costs the screen)."""
    if link is Link.ONLINE:
        return ""
    if device.last_heard is None:
        return "never heard" + (f" ({device.offline_reason})" if device.offline_reason else "")
    since = f"heard {now - device.last_heard:.0f} s ago"
    return since + (f" ({device.offline_reason})" if device.offline_reason else "")


class ConsoleApp(App):
    TITLE = "Guardpost duty desk"
    CSS = """
    #alarms { height: 2fr; border: round red; }
    #lower { height: 3fr; }
    #devices { width: 3fr; height: 100%; border: round $primary; }
    #notices { width: 2fr; height: 100%; border: round $secondary; }
    #filter { display: none; }
    #filter.shown { display: block; }
    #status { height: 1; background: $boost; }
    """
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("a", "acknowledge", "Acknowledge"),
        Binding("o", "open_snapshot", "Open snapshot"),
        Binding("f", "filter", "Filter by school"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, fleet: Fleet, client=None, *, broker: str = "",
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.fleet, self.client, self.broker, self.clock = fleet, client, broker, clock
        self.site_filter: str | None = None
        self.bells = 0
        self._shown: dict[str, list[tuple[str, tuple]]] = {}  # table id -> rows drawn

    def compose(self) -> ComposeResult:
        with Vertical():
            yield DataTable(id="alarms", cursor_type="row", zebra_stripes=True)
            with Horizontal(id="lower"):
                yield DataTable(id="devices", cursor_type="row")
                yield DataTable(id="notices", cursor_type="row")
            yield Input(placeholder="school (site id, or part of it); empty: every school",
                        id="filter")
            yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        alarms = self.query_one("#alarms", DataTable)
        alarms.border_title = "Alarms"
        alarms.add_columns("time", "school", "gate", "device", "waited", "acknowledgement",
                           "signature", "snapshots")
        devices = self.query_one("#devices", DataTable)
        devices.border_title = "Devices"
        devices.add_columns("state", "school", "device", "gate", "heard")
        notices = self.query_one("#notices", DataTable)
        notices.border_title = "Tests and faults"
        notices.add_columns("time", "school", "device", "kind", "code", "what")
        self.refresh_tables()
        self.set_interval(REFRESH_S, self.refresh_tables)
        alarms.focus()

    # -- called from the client's thread (through call_from_thread) -------------------

    def alarm_arrived(self, alarm: Alarm) -> None:
        self.bells += 1
        self.bell()
        self.refresh_tables()

    # -- drawing ----------------------------------------------------------------------

    def refresh_tables(self) -> None:
        now = self.clock()
        self._fill(self.query_one("#alarms", DataTable), [
            (a.event_id, (_clock(a), a.site_id, a.location or "", a.device_id, _waited(a),
                          _ack(a), _verified(a), str(len(a.snapshots))))
            for a in self.fleet.alarm_list(self.site_filter)])
        devices = self.fleet.device_list(now, self.site_filter)
        shown = devices[:MAX_DEVICE_ROWS]
        self._fill(self.query_one("#devices", DataTable), [
            (f"{d.site_id}/{d.device_id}",
             (link.value.upper() if link is not Link.ONLINE else link.value, d.site_id,
              d.device_id, d.location or "",
              _heard(d, link, now)))
            for d, link in shown])
        hidden = len(devices) - len(shown)
        self.query_one("#devices", DataTable).border_subtitle = (
            f"and {hidden} more online" if hidden else "")
        self._fill(self.query_one("#notices", DataTable), [
            (n.event_id, (_clock(n), n.site_id, n.device_id, n.kind, str(n.code or ""),
                          n.summary)) for n in self.fleet.notice_list(self.site_filter)])
        counts = self.fleet.counts(now)
        with self.fleet.lock:
            messages, ignored = self.fleet.messages, self.fleet.ignored
            not_verified = self.fleet.not_verified
        connected = self.client is None or self.client.connected.is_set()
        self.query_one("#status", Static).update(
            f" {self.broker} {'connected' if connected else 'NOT CONNECTED'} | messages "
            f"{messages} (ignored {ignored}, not verified {not_verified}) | online "
            f"{counts['online']}  offline {counts['offline']}  lost {counts['lost']}"
            + (f" | school filter: {self.site_filter}" if self.site_filter else ""))

    def _fill(self, table: DataTable, rows: list[tuple[str, tuple]]) -> None:
        """Show ``rows`` (key, cells): the cells that changed when the rows are the same
        ones in the same order, else all of them again, keeping the selected row selected."""
        previous = self._shown.get(table.id)
        self._shown[table.id] = rows
        if previous is not None and [k for k, _ in previous] == [k for k, _ in rows]:
            for row, ((_, cells), (_, old)) in enumerate(zip(rows, previous, strict=True)):
                for column, (new, was) in enumerate(zip(cells, old, strict=True)):
                    if new != was:
                        table.update_cell_at(Coordinate(row, column), new, update_width=True)
            return
        selected = None
        if table.row_count:
            with contextlib.suppress(CellDoesNotExist):  # the cursor was out of range
                selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        for key, cells in rows:
            table.add_row(*cells, key=key)
        if selected is not None:
            with contextlib.suppress(RowDoesNotExist):  # gone (filtered out)
                table.move_cursor(row=table.get_row_index(selected), animate=False)

    # -- keys -------------------------------------------------------------------------

    def selected_alarm(self) -> str | None:
        table = self.query_one("#alarms", DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def action_acknowledge(self) -> None:
        event_id = self.selected_alarm()
        if event_id is None:
            self.notify("no alarm selected")
            return
        if self.client is None:
            self.notify("not connected to a broker", severity="error")
            return
        self.notify(self.client.acknowledge(event_id))
        self.refresh_tables()

    def action_open_snapshot(self) -> None:
        event_id = self.selected_alarm()
        snapshots = self.fleet.snapshot_of_snapshots(event_id) if event_id else []
        if not snapshots:
            self.notify("no snapshot saved for this alarm (is --snapshots given?)")
            return
        path = snapshots[-1]
        opener = shutil.which("xdg-open")
        if opener:
            subprocess.Popen([opener, str(path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
            self.notify(f"opening {path}")
        else:
            self.notify(f"snapshot: {path}", timeout=15)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.value = self.site_filter or ""
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.site_filter = event.value.strip() or None
        event.input.remove_class("shown")
        self.query_one("#alarms", DataTable).focus()
        self.refresh_tables()
