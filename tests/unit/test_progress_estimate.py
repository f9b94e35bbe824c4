"""The one progress estimate (``flows.progress.ProgressEstimator``) that the terminal and the Prefect UI show: a
rate over the batches the workers report, exponentially weighted, that does not sag between batches, falls in a
stall, and follows a run whose speed changes; measured on synthetic runs with a clock of their own
(``benchmarks/eta.py`` holds the runs and prints the figures the docs quote)."""

from __future__ import annotations

import pytest
from util import load_script

from ipaflow.flows.progress import ProgressEstimator, Snapshot, status_line

eta = load_script("benchmarks/eta.py")


def test_a_steady_run_gives_a_steady_rate_and_an_eta_that_counts_down():
    estimator = ProgressEstimator()
    assert estimator.rate(0.0) is None and estimator.eta(10, 0.0) is None
    for batch in range(11):  # 8 rows every 4 s after the first batch (which carried the pipeline's load)
        estimator.observe(8 * (batch + 1), 30.0 + 4 * batch)
    assert estimator.rate(70.0) == pytest.approx(2.0)
    assert estimator.rate(72.0) == pytest.approx(2.0)  # between batches the rate does not sag
    assert estimator.eta(100, 70.0) == pytest.approx(50.0) and estimator.eta(100, 72.0) == pytest.approx(48.0)
    assert estimator.eta(0, 72.0) == 0.0


def test_a_stall_lowers_the_rate_and_a_lower_count_is_ignored():
    estimator = ProgressEstimator()
    for batch in range(11):
        estimator.observe(8 * (batch + 1), 4.0 * batch)
    estimator.observe(40, 41.0)  # a retried shard starts its count again
    assert estimator.rate(41.0) == pytest.approx(2.0)
    stalled = estimator.rate(100.0)
    assert stalled < 1.0 and estimator.eta(100, 100.0) > 100  # nothing for a minute
    estimator.observe(88 + 8, 101.0)  # the next batch: the wait was one long interval
    after_the_stall = estimator.rate(101.0)
    assert after_the_stall < 1.0
    for batch in range(1, 6):
        estimator.observe(96 + 8 * batch, 101.0 + 4 * batch)
    assert after_the_stall < estimator.rate(121.0) < 2.0


@pytest.mark.parametrize("workers,batch", eta.SHAPES)
def test_the_eta_holds_on_a_steady_run(workers, batch):
    errors = eta.eta_errors(2000, batch, workers, eta.SPEEDS["steady"], seed=1)
    assert eta.worst(errors, 0.2, 0.91) <= 0.3 and all(e is not None for _, e in errors)


@pytest.mark.parametrize("speed", ["halves at 50%", "doubles at 50%"])
@pytest.mark.parametrize("workers,batch", eta.SHAPES)
def test_the_eta_follows_a_speed_that_changes_midway(speed, workers, batch):
    """Before the change no estimate can know it (the speed so far is all there is): the ETA is then the speed
    so far extrapolated, and within +/-30% of the time that remained again soon after the change."""
    rows, change = 2000, 0.5
    errors = eta.eta_errors(rows, batch, workers, eta.SPEEDS[speed], seed=1)
    before = [(done, error) for done, error in errors if done < change - 0.02]
    foreseeable = {"halves at 50%": lambda f: (1 - f) / (1.5 - f) - 1, "doubles at 50%": lambda f: (1 - f) / (0.75 - f) - 1}
    assert all(abs(error - foreseeable[speed](done)) <= 0.3 * (1 + foreseeable[speed](done)) for done, error in before)
    assert eta.within_from(errors, 0.3, after=change) <= 0.7


def test_the_status_line_starts_with_the_eta_and_rounds_the_percentage():
    line = status_line(Snapshot(phase="rendering", total=71, done=32, ok=30, failed=1, skipped=1, rate=3.21, eta=275,
                                elapsed=62))
    assert line == ("ETA 4m35s, rendering: 32/71 rows (45.1%), 30 ok, 1 failed, 1 skipped, 3.21 rows/s, "
                    "elapsed 1m02s")
    assert Snapshot(total=71, done=32).percent == 45.1
    assert status_line(Snapshot(phase="planning rows", elapsed=3)) == "planning rows, elapsed 3s"
    assert status_line(Snapshot(phase="rendering", total=5)).startswith("ETA ?, ")


def test_many_workers_batches_are_held_in_bounded_memory_and_read_the_same():
    """32 workers reporting a batch every 0.2 s for an hour: the estimator holds at most MAX_EVENTS batches (each
    read walks them all, every second), and reads the rate and ETA of one that keeps every batch within 1%."""
    bounded, whole = ProgressEstimator(), ProgressEstimator()
    whole.MAX_EVENTS = 10**9
    done, now = 0, 0.0
    for step in range(18_000):
        now += 0.2
        done += 8 if step < 12_000 else 4  # the speed halves two-thirds of the way
        bounded.observe(done, now)
        whole.observe(done, now)
    assert len(bounded.events) <= ProgressEstimator.MAX_EVENTS < len(whole.events)
    assert bounded.rate(now) == pytest.approx(whole.rate(now), rel=0.01)
    assert bounded.eta(50_000, now) == pytest.approx(whole.eta(50_000, now), rel=0.01)
