"""The benchmark's rate estimator: answers that come in whole batches are rated without a batch's error."""

from __future__ import annotations

import math

from bench.loadgen import steady_rate


def bursts(rate: float, batch: int, phase: float, seconds: float) -> list[float]:
    """End times of answers coming ``batch`` at once, ``rate`` answers/s on average, the first burst at ``phase`` s."""
    gap = batch / rate
    return [phase + k * gap for k in range(int(seconds / gap) + 1) for _ in range(batch)]


def test_bursts_of_a_batch_are_rated_within_half_a_percent_wherever_the_window_falls() -> None:
    rate, batch, window = 42.0, 16, 10.0  # about 26 bursts in the window, as in the overload benchmark's capacity windows
    counted, fitted = [], []
    for step in range(40):  # the window's edges at 40 places between two bursts
        phase = step / 40 * batch / rate
        ends = bursts(rate, batch, phase, window + 2.0)
        fitted.append(steady_rate(ends, 1.0, 1.0 + window))
        counted.append(sum(1 for e in ends if 1.0 <= e < 1.0 + window) / window)
    assert max(abs(r / rate - 1) for r in fitted) < 0.005
    # the plain count is off by up to a whole burst (16 answers of 420): what the slope is for
    assert max(abs(r / rate - 1) for r in counted) > 0.02


def test_a_steady_stream_is_rated_at_its_rate_and_a_silent_half_halves_it() -> None:
    ends = [k / 100 for k in range(1, 1000)]  # 100 answers/s from 0 to 10 s
    assert math.isclose(steady_rate(ends, 2.0, 8.0), 100.0, rel_tol=0.01)
    first_half = [e for e in ends if e < 5.0]
    assert math.isclose(steady_rate(first_half, 2.0, 8.0), 50.0, rel_tol=0.02)  # answers missing lower it, as a count would


def test_no_answers_is_zero_and_an_empty_window_is_not_a_number() -> None:
    assert steady_rate([], 0.0, 10.0) == 0.0
    assert steady_rate([0.5, 20.0], 1.0, 10.0) == 0.0  # both outside the window
    assert math.isnan(steady_rate([1.0], 5.0, 5.0))
