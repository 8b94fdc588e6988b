"""The admission policy on a fake clock: waiting requests go in at once while the running streams have slack, a
stream near its playback deadline gets only the rows its slack leaves room for (a long prompt is prefilled
across steps), the oldest waiting request gets rows within max_defer + 1 steps whatever the slack, a step
admits as many prompts as its rows hold, grouped by length class, and the step-time estimates follow the
measured steps. Expected values are worked out by hand from the rules."""

import pytest

from csm_jax.schedule import Scheduler


def _learn(s: Scheduler, step_s: float, row_s: float, cost: int = 256) -> None:
    """Pipelined steps as the engine reports them: the time between two step ends is one generation step plus
    the prefill dispatched with the earlier one (none, then `cost` rows, then none)."""
    t = 0.0
    s.step_done(t, 0, measured=False)
    for previous, now in ((0, cost), (cost, 0), (0, 0)):
        t += step_s + row_s * previous
        s.step_done(t, now, measured=True)


def test_step_time_estimates():
    s = Scheduler(smoothing=1.0)  # the last measurement only: exact values
    _learn(s, step_s=0.1, row_s=0.001)
    assert s.step_s == pytest.approx(0.1)
    assert s.row_s == pytest.approx(0.001)
    # An idle wait is not a step: a long gap with measured=False teaches nothing.
    s.step_done(100.0, 0, measured=False)
    s.step_done(100.1, 0, measured=True)
    assert s.step_s == pytest.approx(0.1)
    # Moving average: a quarter of the new measurement.
    a = Scheduler(smoothing=0.25)
    a.step_done(0.0, 0, measured=False)
    a.step_done(1.0, 0, measured=True)
    a.step_done(1.2, 0, measured=True)
    assert a.step_s == pytest.approx(0.75 * 1.0 + 0.25 * 0.2)


def test_no_streams_admits_at_once_oldest_first():
    s = Scheduler(max_count=4, max_rows=1024)
    assert s.admit(0.0, [("a", 20), ("b", 25), ("c", 30)]) == [("a", 20), ("b", 25), ("c", 30)]
    assert s.admit(0.0, []) == []
    assert s.deferrals == 0


def test_stream_near_its_deadline_prefills_a_big_prompt_across_steps():
    s = Scheduler(max_count=4, max_rows=1024, max_defer=4)
    _learn(s, step_s=0.1, row_s=0.001)  # a 512-row prefill costs ~0.51 s
    s.delivered("running", now=10.0, seconds=0.32)  # first audio at 10.0: 0.32 s of it
    # At 10.05 its slack is 0.27 s: one step (0.1) + at most 170 rows fit. Of a 500-row prompt, 160 rows (five
    # 32-row pieces) go in now, the rest waits.
    assert s.budget(10.05) == pytest.approx((0.27 - 0.1) / 0.001)
    assert s.admit(10.05, [("long", 500)]) == [("long", 160)]
    # With plenty of slack (more audio delivered) the remaining 340 rows go in at once.
    s.delivered("running", now=10.1, seconds=2.0)
    assert s.admit(10.1, [("long", 340)]) == [("long", 340)]
    # Slack under one step plus a 32-row piece: nothing this step.
    s.delivered("late", now=12.0, seconds=0.12)
    assert s.budget(12.0) == pytest.approx(20)
    assert s.admit(12.0, [("long", 340)]) == [] and s.passed == 1


def test_the_oldest_prompt_goes_on_within_the_slack():
    s = Scheduler(max_count=4, max_rows=1024)
    _learn(s, step_s=0.1, row_s=0.001)
    s.delivered("running", now=0.0, seconds=0.32)
    # Slack 0.32 at t=0: room for 220 rows; the 500-row head gets 192 (six pieces), the 40-row one waits (its
    # group, 64 padded rows, would bring the step to 256).
    assert s.admit(0.0, [("long", 500), ("short", 40)]) == [("long", 192)]
    assert s.passed == 0
    # Next step (the engine lists the partly prefilled prompt first), room for 420 rows: the head's other 308
    # rows (320 padded) and the short one in its own length class (64) go in together: 384 rows.
    s.delivered("running", now=0.0, seconds=0.2)
    assert s.budget(0.0) == pytest.approx(420)
    assert s.admit(0.0, [("long", 308), ("short", 40)]) == [("long", 308), ("short", 40)]
    assert s.groups([308, 40]) == [([0], 320), ([1], 64)] and s.cost([308, 40]) == 384


def test_oldest_admitted_within_max_defer_steps_whatever_the_slack():
    s = Scheduler(max_count=4, max_rows=1024, max_defer=3)
    _learn(s, step_s=0.1, row_s=0.001)
    s.delivered("late", now=0.0, seconds=0.0)
    s.delivered("late", now=0.0, seconds=0.08)
    steps = []
    for k in range(10):
        now = 1.0 + 0.1 * k  # the stream is behind its playback all along (negative slack)
        assert s.slack(now) < 0
        steps.append(s.admit(now, [("head", 300), ("next", 300)]))
        if steps[-1]:
            break
    # Passed over max_defer times, then admitted (with the other request of its length class).
    assert steps == [[], [], [], [("head", 300), ("next", 300)]]
    assert s.deferrals == 3
    # The deferral count restarts for the next oldest request.
    assert s.passed == 0


def test_finished_stream_no_longer_constrains():
    s = Scheduler(max_rows=1024)
    _learn(s, step_s=0.1, row_s=0.001)
    s.delivered(7, now=0.0, seconds=0.1)
    assert s.admit(1.0, [("x", 300)]) == []
    s.finished(7)
    assert s.slack(1.0) is None
    assert s.admit(1.0, [("x", 300)]) == [("x", 300)]


def test_length_classes_group_similar_prompts():
    s = Scheduler(max_rows=4096)
    waiting = [("a", 40), ("b", 300), ("c", 50), ("d", 290), ("e", 60), ("f", 10)]
    # Three length classes: a, c, e (40, 50, 60 rows: two 32-row pieces, padded to 64), b and d (300, 290: ten
    # pieces, class 16, padded to 320) and f (10: one piece). 3 x 64 + 2 x 320 + 32 = 864 rows: all at once.
    assert s.admit(0.0, waiting) == waiting
    rows = [n for _, n in waiting]
    assert s.groups(rows) == [([0, 2, 4], 64), ([1, 3], 320), ([5], 32)]
    assert s.cost(rows) == 864
    # Within 700 rows: a (64), then b (320: 384), c and d (64 + 320 would be 768: c goes, 448; d does not),
    # e (512), f (544).
    assert Scheduler(max_rows=700).admit(0.0, waiting) == [("a", 40), ("b", 300), ("c", 50), ("e", 60), ("f", 10)]
    # A longer prompt raises its class's padded length for every prompt of the class: 33 and 64 rows cost
    # 2 x 64; with a 100-row one (class 4: 128 rows) beside them, 256 rows.
    assert s.cost([33, 64]) == 128 and s.cost([33, 64, 100]) == 256


def test_group_respects_row_and_count_caps():
    s = Scheduler(max_count=2, max_rows=256)
    assert s.max_count == 2
    # Three of one class: at most two at a step; 2 x 128 = 256 rows fit the cap.
    assert s.admit(0.0, [("a", 100), ("b", 120), ("c", 110)]) == [("a", 100), ("b", 120)]
    # A prompt over the cap goes in across steps: 256 rows now (then 256, then 188).
    assert s.admit(0.0, [("big", 700), ("small", 10)]) == [("big", 256)]
    # A cap under one piece still prefills one piece a step.
    assert Scheduler(max_rows=20).admit(0.0, [("big", 700)]) == [("big", 32)]
    # Without max_count, as many as the rows hold: 256 rows take two of the three.
    assert Scheduler(max_rows=256).admit(0.0, [("a", 100), ("b", 120), ("c", 110)]) == [("a", 100), ("b", 120)]
    with pytest.raises(ValueError, match="max_count"):
        Scheduler(max_count=0)


def test_generation_slower_than_real_time_admits_at_once():
    """When a step takes longer than the audio it makes, no deferral keeps streams on time: admit at once."""
    s = Scheduler(max_rows=1024, step_audio_s=0.32, smoothing=1.0)
    _learn(s, step_s=0.1, row_s=0.001)
    s.delivered(1, now=0.0, seconds=0.1)
    assert not s.overloaded() and s.admit(1.0, [("x", 300)]) == []
    _learn(s, step_s=0.5, row_s=0.001)
    assert s.overloaded() and s.admit(1.0, [("x", 300)]) == [("x", 300)]


def test_start_buffer_adds_to_the_slack():
    s = Scheduler(start_buffer_s=0.3)
    s.delivered(1, now=5.0, seconds=0.32)
    assert s.slack(5.1) == pytest.approx(5.0 + 0.3 + 0.32 - 5.1)
    s.delivered(2, now=5.05, seconds=0.0)  # no audio yet: not a stream
    assert list(s.streams) == [1]
