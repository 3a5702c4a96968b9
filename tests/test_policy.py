"""The batching policy alone: a pure function of hand-made queues and the clock, with no event
loop and no model (tests/test_batching.py runs it inside the real scheduler)."""

from __future__ import annotations

import pytest

from optim.scheduler.policy import POLICIES, DurationPolicy, FifoPolicy, Limits, PolicyName, QueuedWindow

LIMITS = Limits(max_batch_size=4, max_wait=0.05, max_batch_audio=240.0)


def test_every_setting_value_names_a_policy():
    from typing import get_args

    assert set(POLICIES) == set(get_args(PolicyName)) == {"duration", "fifo"}


@pytest.mark.parametrize("policy", [DurationPolicy(), FifoPolicy()])
def test_nothing_queued_means_nothing_to_wait_for(policy):
    choice = policy.choose({"a": [], "b": []}, now=10.0, limits=LIMITS, seconds_per_window=0.5)
    assert choice.batch == [] and choice.wait is None


@pytest.mark.parametrize("policy", [DurationPolicy(), FifoPolicy()])
def test_a_young_partial_batch_waits_until_the_oldest_deadline(policy):
    queue = [QueuedWindow(10.0, enqueued=1.00), QueuedWindow(12.0, enqueued=1.02)]
    choice = policy.choose({"a": queue}, now=1.03, limits=LIMITS, seconds_per_window=0.5)
    assert choice.batch == [] and choice.wait == pytest.approx(0.02)  # 1.00 + 0.05 - 1.03
    overdue = policy.choose({"a": queue}, now=1.05, limits=LIMITS, seconds_per_window=0.5)
    assert overdue.key == "a" and set(overdue.batch) == set(queue)


@pytest.mark.parametrize("policy", [DurationPolicy(), FifoPolicy()])
def test_a_full_queue_runs_at_once(policy):
    young = [QueuedWindow(5.0, enqueued=1.0) for _ in range(4)]
    choice = policy.choose({"a": young}, now=1.0, limits=LIMITS, seconds_per_window=0.5)
    assert choice.key == "a" and len(choice.batch) == 4


def test_duration_fills_with_the_nearest_lengths_fifo_with_the_oldest():
    seed = QueuedWindow(20.0, enqueued=0.0)
    queue = [seed, QueuedWindow(3.0, 0.01), QueuedWindow(4.0, 0.02), QueuedWindow(19.0, 0.03), QueuedWindow(21.0, 0.04)]
    limits = Limits(max_batch_size=3, max_wait=0.0)
    by_duration = DurationPolicy().choose({"a": queue}, now=1.0, limits=limits, seconds_per_window=0.5)
    fifo = FifoPolicy().choose({"a": queue}, now=1.0, limits=limits, seconds_per_window=0.5)
    assert [w.padded_seconds for w in by_duration.batch] == [20.0, 19.0, 21.0]
    assert [w.padded_seconds for w in fifo.batch] == [20.0, 3.0, 4.0]


def test_fair_queueing_lets_a_new_request_ahead_of_a_long_file_that_was_served():
    """The long file's next window arrived first, but its request already had 10 windows; at
    0.5 s a window the short request's window has the better priority. FIFO keeps arrival order."""
    long_file = QueuedWindow(30.0, enqueued=0.0, served=10)
    short = QueuedWindow(8.0, enqueued=1.0)
    queues = {"long": [long_file], "short": [short]}
    limits = Limits(max_batch_size=1, max_wait=0.0)
    assert DurationPolicy().choose(queues, now=2.0, limits=limits, seconds_per_window=0.5).batch == [short]
    assert FifoPolicy().choose(queues, now=2.0, limits=limits, seconds_per_window=0.5).batch == [long_file]
    # without credit for past compute the long file goes first under both
    assert DurationPolicy().choose(queues, now=2.0, limits=limits, seconds_per_window=0.0).batch == [long_file]


def test_a_batch_stays_within_its_padded_audio_budget():
    """rows × longest window ≤ max_batch_audio: three 30-s windows fit in 90 s, a fourth does not."""
    queue = [QueuedWindow(30.0, enqueued=i * 0.01) for i in range(6)]
    choice = DurationPolicy().choose({"a": queue}, now=1.0, limits=Limits(8, 0.0, 90.0), seconds_per_window=0.5)
    assert len(choice.batch) == 3


def test_a_batch_comes_from_one_queue():
    """Windows of different model references or tasks never share a forward pass."""
    a = [QueuedWindow(10.0, enqueued=0.0), QueuedWindow(10.0, enqueued=0.5)]
    b = [QueuedWindow(10.0, enqueued=0.1)]
    choice = DurationPolicy().choose({"a": a, "b": b}, now=1.0, limits=LIMITS, seconds_per_window=0.5)
    assert choice.key == "a" and choice.batch == a


@pytest.mark.parametrize("policy", [DurationPolicy(), FifoPolicy()])
def test_a_leading_window_runs_before_the_rest_of_its_request(policy):
    """A streamed file's first window (leading) is never batched with the file's later windows,
    nor run beside them in another lane: they wait until it has run. Other requests' windows may
    still join it."""
    streamed, other = object(), object()
    leading = QueuedWindow(28.0, enqueued=0.0, request=streamed, leading=True)
    rest = [QueuedWindow(28.0, enqueued=0.0, request=streamed) for _ in range(5)]  # a full batch on their own
    short = QueuedWindow(9.0, enqueued=0.01, request=other)
    limits = Limits(max_batch_size=4, max_wait=0.05, max_batch_audio=240.0)
    # young: the rest would make a full queue, but they are held behind the leading window, which waits for company
    young = policy.choose({"a": [*rest, leading]}, now=0.01, limits=limits, seconds_per_window=0.5)
    assert young.batch == [] and young.wait == pytest.approx(0.04)
    first = policy.choose({"a": [*rest, leading, short]}, now=0.1, limits=limits, seconds_per_window=0.5)
    assert first.batch[0] is leading and set(first.batch) == {leading, short}
    # while it runs (the scheduler says so) they still wait, and others' windows may run
    running = policy.choose({"a": [*rest, short]}, now=0.1, limits=limits, seconds_per_window=0.5, leading_running={streamed})
    assert running.batch == [short]
    assert policy.choose({"a": rest}, now=0.1, limits=limits, seconds_per_window=0.5, leading_running={streamed}).wait is None
    # once it has run the rest batch as usual
    then = policy.choose({"a": rest}, now=0.1, limits=limits, seconds_per_window=0.5)
    assert len(then.batch) == 4 and set(then.batch) <= set(rest)
    # a request with no leading window is not held: a plain file's windows batch together at once
    plain = [QueuedWindow(28.0, enqueued=0.0, request=other) for _ in range(4)]
    assert len(policy.choose({"a": plain}, now=0.0, limits=limits, seconds_per_window=0.5).batch) == 4


def test_a_leading_window_waits_its_turn_among_requests():
    """Leading is about its own request's windows, not a priority over others': an older request's
    window still seeds first (duration policy, fair-queueing) and the leading one may join it."""
    streamed = object()
    older = QueuedWindow(30.0, enqueued=0.0)
    leading = QueuedWindow(30.0, enqueued=1.0, request=streamed, leading=True)
    rest = [QueuedWindow(30.0, enqueued=1.0, request=streamed) for _ in range(3)]
    choice = DurationPolicy().choose({"a": [older, *rest, leading]}, now=2.0, limits=LIMITS, seconds_per_window=0.5)
    assert choice.batch == [older, leading]
