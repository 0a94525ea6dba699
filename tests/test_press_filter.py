"""The timing rules of a press, on exact timestamps (no clocks, no threads)."""

from hypothesis import given
from hypothesis import strategies as st

from drivers.gpio.press_filter import PressFilter


def feed(flt: PressFilter, edges, *, expire_at=(), level_at_expiry=True):
    """Feed (time, active) edges; call expire() at the given times; collect decisions."""
    outcomes = []
    timeline = sorted([(t, "edge", a) for t, a in edges] + [(t, "expire", None) for t in expire_at],
                      key=lambda item: item[0])
    for t, what, active in timeline:
        result = (flt.edge(t, active) if what == "edge"
                  else flt.expire(t, level_at_expiry))
        if result is not None:
            outcomes.append(result)
    return outcomes


def test_a_20_ms_press_is_accepted_when_its_release_arrives():
    flt = PressFilter(min_press=0.010)
    [outcome] = feed(flt, [(1.000, True), (1.020, False)])
    assert outcome.accepted and outcome.started == 1.000
    assert abs(outcome.duration - 0.020) < 1e-9


def test_a_2_ms_glitch_is_ignored_with_the_reason():
    flt = PressFilter(min_press=0.010)
    [outcome] = feed(flt, [(1.000, True), (1.002, False)])
    assert not outcome.accepted
    assert "glitch of 2.0 ms" in outcome.reason


def test_a_held_press_is_accepted_at_its_deadline_and_never_repeats():
    flt = PressFilter(min_press=0.010)
    assert flt.edge(1.000, True) is None
    assert flt.deadline == 1.010
    assert flt.expire(1.005, still_active=True) is None  # too early
    outcome = flt.expire(1.011, still_active=True)
    assert outcome.accepted and outcome.started == 1.000
    # Held for minutes: no more decisions, whatever is called.
    assert flt.deadline is None
    assert flt.expire(100.0, still_active=True) is None
    assert flt.edge(50.0, True) is None  # a spurious duplicate edge while held
    assert flt.edge(200.0, False) is None  # the release itself is not news


def test_edges_delivered_late_still_count_by_their_timestamps():
    """Under load both edges of a 20 ms press may reach the worker together, long after."""
    flt = PressFilter(min_press=0.010)
    # The deadline passes while the release edge is not yet known: the level read at
    # expiry says released, so the filter waits for the edge instead of guessing.
    assert flt.edge(1.000, True) is None
    assert flt.expire(1.300, still_active=False) is None
    [outcome] = feed(flt, [(1.020, False)])
    assert outcome.accepted and outcome.duration == 1.020 - 1.000


def test_hold_time_guards_against_accidental_presses():
    flt = PressFilter(min_press=0.010, hold=1.5)
    [short] = feed(flt, [(0.0, True), (0.4, False)])
    assert not short.accepted and "before the hold time of 1500 ms" in short.reason
    [held] = feed(flt, [(10.0, True)], expire_at=[11.5])
    assert held.accepted and held.duration == 1.5


def test_zero_threshold_accepts_on_the_activating_edge():
    flt = PressFilter(min_press=0.0)
    [outcome] = feed(flt, [(5.0, True)])
    assert outcome.accepted and outcome.duration == 0.0
    assert feed(flt, [(5.001, False), (5.002, True)])[0].started == 5.002


def test_a_lost_release_edge_does_not_wedge_the_input():
    flt = PressFilter(min_press=0.010)
    flt.edge(1.000, True)
    flt.edge(2.000, True)  # the release in between was lost
    [outcome] = feed(flt, [(2.030, False)])
    assert outcome.accepted and outcome.started == 2.000


# -- property: the filter agrees with the definition of a press ----------------------

durations_ms = st.integers(min_value=0, max_value=60)


@given(threshold_ms=st.integers(min_value=0, max_value=20),
       activations=st.lists(st.tuples(durations_ms, st.integers(min_value=1, max_value=60)),
                            max_size=30),
       check_deadlines=st.booleans())
def test_every_activation_at_least_the_threshold_long_is_one_press(threshold_ms, activations,
                                                                   check_deadlines):
    """Whatever the sequence of activations (length, gap), exactly those lasting at least
    the threshold are accepted, once each, whether decided at the deadline or on release."""
    flt = PressFilter(min_press=threshold_ms / 1000)
    t = 0.0
    accepted = []
    expected = []
    for held_ms, gap_ms in activations:
        start, end = t, t + held_ms / 1000
        expected.append(held_ms >= threshold_ms)
        decisions = []
        if (result := flt.edge(start, True)) is not None:
            decisions.append(result)
        deadline = flt.deadline
        if check_deadlines and deadline is not None and deadline <= end:
            result = flt.expire(deadline, still_active=True)
            decisions += [result] if result is not None else []
        if (result := flt.edge(end, False)) is not None:
            decisions.append(result)
        assert len(decisions) <= 1
        accepted.append(bool(decisions) and decisions[0].accepted)
        t = end + gap_ms / 1000
    assert accepted == expected
