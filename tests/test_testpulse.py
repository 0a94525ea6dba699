"""Judging the panic input after the alarm test's relay pulse, from its raw edges.

Times in milliseconds after the relay was let go; release 15 ms, bounce 5 ms, a finger
must be on the button for 10 ms (min_press_ms) after the release time to count.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.daemons.button.testpulse import LATE_EDGE_S, finger_after_pulse

RELEASED = 1000.0  # monotonic seconds at which the relay was let go
RELEASE, BOUNCE, NEED = 0.015, 0.005, 0.010


def judge(edges_ms: list[tuple[float, bool]], now_ms: float, **overrides) -> bool | None:
    edges = [(RELEASED + ms / 1000, level) for ms, level in edges_ms]
    options = {"release": RELEASE, "bounce": BOUNCE, "need": NEED} | overrides
    return finger_after_pulse(edges, RELEASED, now=RELEASED + now_ms / 1000, **options)


def settled(edges_ms, **overrides) -> bool | None:
    """The verdict once everything has happened."""
    return judge(edges_ms, 1000.0, **overrides)


def test_the_relay_alone_is_no_finger_once_the_input_has_stayed_open():
    opens = [(2.0, False)]
    assert judge(opens, 3.0) is None  # open for 1 ms: the filter may still merge
    assert judge(opens, 2.0 + 5.0 + LATE_EDGE_S * 1000 + 0.1) is False


def test_the_relay_chattering_as_it_opens_is_no_finger():
    chatter = [(2.0, False), (3.0, True), (5.0, False), (6.0, True), (8.0, False)]
    assert settled(chatter) is False


def test_a_finger_holding_on_past_the_pulse_is_one_after_the_release_time_and_min_press():
    assert judge([], 20.0) is None            # 5 ms past the release time: not yet
    assert judge([], 25.0) is True            # 10 ms past it
    assert judge([(40.0, False)], 1000.0) is True  # however long after the test looks


def test_a_tap_the_filter_takes_for_bounce_of_the_test_press_is_a_finger():
    # The relay opens at 2 ms; the finger lands at 4 ms (a 2 ms gap, within the 5 ms
    # bounce: the press filter merges it) and lifts at 40 ms.
    assert settled([(2.0, False), (4.0, True), (40.0, False)]) is True


def test_a_press_after_the_filter_saw_the_release_is_left_to_the_filter():
    # Open for 7 ms, more than the bounce: the filter reports this press on its own (an
    # alarm); the test must not record it a second time.
    assert settled([(2.0, False), (9.0, True), (200.0, False)]) is False


def test_activity_shorter_than_min_press_after_the_release_time_is_a_glitch():
    # Merged with the relay's chatter, but active for only 3 ms past the release time.
    assert settled([(2.0, False), (4.0, True), (18.0, False)]) is False
    # With min_press_ms = 0, any activity past the release time is a finger.
    assert settled([(2.0, False), (4.0, True), (18.0, False)], need=0.0) is True


def test_a_tap_ending_within_the_release_time_cannot_be_told_from_the_relay():
    # The limit of any test relay, and why release_ms should be no longer than needed.
    assert settled([(2.0, False), (4.0, True), (14.0, False)]) is False


_edge_times = st.lists(st.floats(min_value=0.0, max_value=200.0, allow_nan=False), max_size=12,
                       unique=True).map(sorted)


@settings(max_examples=300, deadline=None)
@given(_edge_times, st.floats(min_value=0.0, max_value=300.0),
       st.floats(min_value=0.0, max_value=300.0))
def test_a_verdict_once_given_never_changes(times, first, later):
    # Edges alternate open/closed from the relay's own opening; whatever comes later,
    # the answer given at one moment is the answer at every later one.
    edges = [(t, i % 2 == 1) for i, t in enumerate(times)]
    first, later = sorted((first, later))
    verdict = judge(edges, first)
    if verdict is not None:
        assert judge(edges, later) == verdict
    assert settled(edges) is not None  # and a verdict always comes
