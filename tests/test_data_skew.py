"""asyncopd.data_skew: the length measures on hand-computed histograms, through the Driver with a real drop, and
across a checkpoint (state round trip)."""

import math

import pytest

from asyncopd.data_skew import SCALARS, LengthSkew
from asyncopd.driver import Driver
from asyncopd.rollout import Trajectory
from asyncopd.scheduler import Scheduler, SchedulerConfig
from asyncopd.trace import Recorder


def skew_of(trained, dropped=(), staleness=0) -> LengthSkew:
    s = LengthSkew()
    for n in trained:
        s.on_trained(n, staleness)
    for n in dropped:
        s.on_dropped(n)
    return s


def test_dropping_the_long_one_hand_computed():
    # generated 10 10 20 40, the 40 dropped: F_gen = .5 .75 1 and F_trained = 2/3 1 1 at 10, 20, 40
    s = skew_of([10, 10, 20], [40]).summary()
    assert s["len_generated_mean"] == 20 and s["len_trained_mean"] == pytest.approx(40 / 3)
    assert s["length_w1"] == pytest.approx((2 / 3 - 1 / 2) * 10 + (1 - 3 / 4) * 20)   # = 20 − 40/3: dominance
    assert s["length_ks"] == pytest.approx(0.25) and s["length_bias"] == pytest.approx(-1 / 3)
    assert s["drop_rate"] == 0.25 and s["wasted_token_frac"] == 0.5
    assert (s["len_generated_p50"], s["len_generated_p90"], s["len_trained_p90"]) == (10, 40, 20)


def test_dropping_the_short_half_hand_computed():
    # generated 1..6, trained 4 5 6: F_gen − F_trained = 1/6 2/6 3/6 1/3 1/6 0, steps of 1 token apart
    s = skew_of([4, 5, 6], [1, 2, 3]).summary()
    assert s["length_w1"] == pytest.approx(9 / 6) and s["length_ks"] == pytest.approx(0.5)
    assert s["length_bias"] == pytest.approx(5 / 3.5 - 1) and s["wasted_token_frac"] == pytest.approx(6 / 21)
    empty = LengthSkew().summary()
    assert all(math.isnan(empty[k]) for k in SCALARS) and empty["staleness_by_length"] == {}


def test_driver_counts_a_drop_and_survives_a_checkpoint():
    cfg = SchedulerConfig(batch_size=1, max_staleness=1, on_stale="drop")
    d = Driver(Scheduler(cfg), Recorder(lambda: 0.0))
    assert d.admit() == (0, 0) and d.admit() == (1, 0)      # η = 1, B = 1: two in flight
    d.done(Trajectory.fake(0, 5, 0))
    d.stepped(d.next_batch(), 0.0)                          # version 1
    assert d.admit() == (2, 1)
    d.done(Trajectory.fake(2, 7, 1))
    d.stepped(d.next_batch(), 0.0)                          # version 2: uid 1 (version 0) is now 2 > η stale
    assert d.done(Trajectory.fake(1, 50, 0)) == [1]         # the long one finishes late and is dropped
    s = d.summary()
    assert (s["drop_rate"], s["wasted_token_frac"], s["len_trained_mean"]) == (1 / 3, 50 / 62, 6)
    assert s["staleness_by_length"] == {"[4, 8)": 0.0}      # both trained at staleness 0
    restored = Driver(Scheduler(cfg), Recorder(lambda: 0.0))
    restored.restore(d.state())
    assert restored.summary() == s
