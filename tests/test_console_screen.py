"""The console's screen, driven by Textual's own harness (App.run_test / Pilot) against
the test Mosquitto and simulated devices: an alarm appears at the top with its school and
gate and rings the bell, the key ``a`` acknowledges it (the device receives the signed
ack), ``f`` filters by school. Assertions read what the screen renders."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from textual.widgets import DataTable

from edge.console.app import ConsoleApp
from edge.contract.events import EventKind
from tests.support.console import Desk, Gates


@pytest.fixture
def gates(broker):
    running = Gates(broker)
    yield running
    running.close()


def _screen_text(app) -> str:
    """What the terminal shows, as text (the SVG screenshot without its markup)."""
    svg = app.export_screenshot()
    text = re.sub(r"<[^>]+>", "", svg)
    return text.replace("&#160;", " ").replace("&amp;", "&")


def _rows(app, table_id: str) -> list[list[str]]:
    table = app.query_one(table_id, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def _until(pilot, condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def test_an_alarm_rings_shows_its_school_and_gate_and_a_acknowledges_it(broker, tmp_path,
                                                                        gates):
    north = gates.start("school-north", location="North gate")
    south = gates.start("school-south", location="South gate")
    desk = Desk(broker, tmp_path, gates.keys)
    app = ConsoleApp(desk.fleet, desk.client, broker="test broker")
    desk.client.on_alarm = lambda alarm: app.call_from_thread(app.alarm_arrived, alarm)

    async def scenario():
        async with app.run_test(size=(160, 45)) as pilot:
            await _until(pilot, lambda: len(_rows(app, "#devices")) == 2, "both devices")
            first = north.publish_event(EventKind.ALARM)
            await _until(pilot, lambda: len(_rows(app, "#alarms")) == 1, "the first alarm")
            second = south.publish_event(EventKind.ALARM)
            await _until(pilot, lambda: len(_rows(app, "#alarms")) == 2, "the second alarm")
            assert app.bells == 2
            top = _rows(app, "#alarms")[0]       # the newest unacknowledged at the top
            assert top[1:4] == ["school-south", "South gate", "gate-1"]
            assert "NOT ACKNOWLEDGED" in top and "signed" in top
            screen = _screen_text(app)
            assert "school-south" in screen and "South gate" in screen
            assert "online 2" in screen

            # The selection stays on the row the desk chose (the first alarm) when a new
            # one arrives above it: move up to the newest, then acknowledge it.
            assert app.selected_alarm() == first
            await pilot.press("up")
            assert app.selected_alarm() == second
            await pilot.press("a")
            await _until(pilot, lambda: south.counts.acks == 1, "the device's ack")
            await _until(pilot, lambda: "acknowledged" in _rows(app, "#alarms")[-1],
                         "shown acknowledged")
            rows = _rows(app, "#alarms")
            # the acknowledged one sinks below the one still waiting
            assert rows[0][1] == "school-north" and "NOT ACKNOWLEDGED" in rows[0]
            assert rows[1][1] == "school-south" and rows[1][5] == "acknowledged"
            assert north.counts.acks == 0 and south.counts.acks_refused == 0

            await pilot.press("f")
            await pilot.press(*"north")
            await pilot.press("enter")
            await _until(pilot, lambda: len(_rows(app, "#alarms")) == 1, "filtered")
            assert [r[1] for r in _rows(app, "#alarms")] == ["school-north"]
            assert [r[1] for r in _rows(app, "#devices")] == ["school-north"]
            screen = _screen_text(app)
            assert "school-south" not in screen and "school filter: north" in screen
            return first, second

    try:
        asyncio.run(scenario())
    finally:
        desk.stop()
