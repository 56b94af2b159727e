"""Canary routing (weight, sticky keys, random split) and the automatic canary guard."""

from __future__ import annotations

import hashlib
import random

import pytest

from service.control.routing import CanaryGuard, GuardPolicy, bucket_of, choose_slot

WEIGHTS = (1, 5, 10, 25, 50, 75, 90, 99)


# --- bucket_of ---------------------------------------------------------------------------------

def test_bucket_of_is_the_first_8_sha256_bytes_mod_100() -> None:
    # sha256("user-42") starts 6d894aa3ee802549; 0x6d894aa3ee802549 % 100 == 29
    assert hashlib.sha256(b"user-42").hexdigest()[:16] == "6d894aa3ee802549"
    assert 0x6D894AA3EE802549 % 100 == 29
    assert bucket_of("user-42") == 29
    assert bucket_of("alice") == 7  # sha256 starts 2bd806c97f0e00af


def test_bucket_of_is_stable_across_calls_and_in_range() -> None:
    keys = [f"key-{i}" for i in range(500)]
    first = [bucket_of(k) for k in keys]
    assert first == [bucket_of(k) for k in keys]
    assert all(0 <= b < 100 for b in first)
    assert len(set(first)) > 90  # spread over (nearly) every bucket, not a constant


# --- choose_slot edge cases --------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, "user-42", "alice"])
def test_no_canary_is_always_stable_whatever_the_weight(key: str | None) -> None:
    rng = random.Random(0)
    for weight in (0, 1, 50, 99, 100):
        assert choose_slot(weight, False, key, rng) == "stable"


@pytest.mark.parametrize("key", [None, "user-42", "alice"])
def test_weight_0_is_always_stable_and_100_always_canary(key: str | None) -> None:
    rng = random.Random(1)
    assert {choose_slot(0, True, key, rng) for _ in range(200)} == {"stable"}
    assert {choose_slot(-5, True, key, rng) for _ in range(200)} == {"stable"}
    assert {choose_slot(100, True, key, rng) for _ in range(200)} == {"canary"}
    assert {choose_slot(150, True, key, rng) for _ in range(200)} == {"canary"}


def test_keyed_choice_follows_the_bucket() -> None:
    # bucket_of("user-42") == 29: canary exactly when the weight is above 29
    assert choose_slot(29, True, "user-42") == "stable"
    assert choose_slot(30, True, "user-42") == "canary"
    assert choose_slot(8, True, "alice") == "canary"  # bucket 7
    assert choose_slot(7, True, "alice") == "stable"


def test_keyed_choice_is_deterministic_and_ignores_the_rng() -> None:
    keys = [f"user-{i}" for i in range(300)]
    for weight in WEIGHTS:
        expected = [choose_slot(weight, True, k) for k in keys]
        for seed in range(3):
            rng = random.Random(seed)
            assert [choose_slot(weight, True, k, rng) for k in keys] == expected
        if 5 <= weight <= 95:
            assert {"canary", "stable"} == set(expected)


def test_keyed_choice_is_sticky_over_repeated_requests() -> None:
    for key in ("user-42", "alice", "session-abc"):
        for weight in WEIGHTS:
            assert len({choose_slot(weight, True, key) for _ in range(50)}) == 1


def test_raising_the_weight_never_moves_a_canary_key_back_to_stable() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    for key in keys:
        slots = [choose_slot(w, True, key) for w in range(101)]
        first_canary = slots.index("canary")  # weight 100 is always canary, so this exists
        assert slots[:first_canary] == ["stable"] * first_canary
        assert slots[first_canary:] == ["canary"] * (101 - first_canary)
        assert first_canary == bucket_of(key) + 1


def test_empty_key_counts_as_no_key() -> None:
    # '' is falsy: the choice is random, not the (fixed) bucket of '' (52)
    rng = random.Random(3)
    assert {choose_slot(50, True, "", rng) for _ in range(200)} == {"stable", "canary"}


# --- distributions -----------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [5, 10, 50, 90])
def test_unkeyed_split_matches_the_weight(weight: int) -> None:
    rng = random.Random(1234)
    draws = 10_000
    canary = sum(choose_slot(weight, True, None, rng) == "canary" for _ in range(draws))
    assert abs(canary / draws - weight / 100) <= 0.02


def test_unkeyed_split_is_reproducible_with_a_seeded_rng() -> None:
    rng1, rng2 = random.Random(7), random.Random(7)
    first = [choose_slot(30, True, None, rng1) for _ in range(500)]
    assert first == [choose_slot(30, True, None, rng2) for _ in range(500)]
    assert set(first) == {"stable", "canary"}


@pytest.mark.parametrize("weight", [5, 10, 50, 90])
def test_keyed_split_over_distinct_keys_matches_the_weight(weight: int) -> None:
    keys = 10_000
    canary = sum(choose_slot(weight, True, f"req-{i}") == "canary" for i in range(keys))
    assert abs(canary / keys - weight / 100) <= 0.02


# --- CanaryGuard -------------------------------------------------------------------------------

def test_guard_policy_defaults() -> None:
    assert GuardPolicy() == GuardPolicy(window=200, max_error_rate=0.05, min_agreement=0.0)


def test_no_verdict_before_the_window_is_full() -> None:
    guard = CanaryGuard(GuardPolicy(window=10, max_error_rate=0.1))
    # every request fails, but only 9 of 10 seen
    assert [guard.record_canary("v1", True) for _ in range(9)] == [None] * 9
    assert guard.tripped is False
    assert guard.record_canary("v1", True) == "guard_error_rate"


def test_error_rate_above_threshold_trips_once() -> None:
    guard = CanaryGuard(GuardPolicy(window=10, max_error_rate=0.1))
    # 1 error in 10 = 0.1: not above the threshold
    outcomes = [True] + [False] * 9
    assert [guard.record_canary("v1", e) for e in outcomes] == [None] * 10
    # window slides: the first error drops out, two new ones come in -> 2/10 = 0.2 > 0.1
    assert guard.record_canary("v1", True) is None  # window: 9 ok + 1 err = 0.1
    assert guard.record_canary("v1", True) == "guard_error_rate"
    assert guard.tripped is True
    # no repeat for the same version, however bad it gets
    assert [guard.record_canary("v1", True) for _ in range(30)] == [None] * 30


def test_error_rate_at_or_below_threshold_never_trips() -> None:
    guard = CanaryGuard(GuardPolicy(window=20, max_error_rate=0.05))
    # exactly 1 error in every 20 = 0.05, never above
    results = [guard.record_canary("v1", i % 20 == 0) for i in range(400)]
    assert results == [None] * 400
    assert guard.tripped is False


def test_agreement_below_minimum_trips() -> None:
    guard = CanaryGuard(GuardPolicy(window=10, min_agreement=0.8))
    # 8 of 10 agree = 0.8: not below
    assert [guard.record_shadow("v1", i >= 2) for i in range(10)] == [None] * 10
    # each new disagreement pushes out the oldest entry: the two old disagreements first
    assert guard.record_shadow("v1", False) is None  # [F, T*8, F] -> 0.8
    assert guard.record_shadow("v1", False) is None  # [T*8, F, F] -> 0.8
    assert guard.record_shadow("v1", False) == "guard_agreement"  # [T*7, F*3] -> 0.7
    assert [guard.record_shadow("v1", False) for _ in range(20)] == [None] * 20


def test_agreement_needs_a_full_window() -> None:
    guard = CanaryGuard(GuardPolicy(window=5, min_agreement=0.9))
    assert [guard.record_shadow("v1", False) for _ in range(4)] == [None] * 4
    assert guard.record_shadow("v1", False) == "guard_agreement"


def test_min_agreement_zero_disables_the_agreement_check() -> None:
    guard = CanaryGuard(GuardPolicy(window=5, min_agreement=0.0))
    assert [guard.record_shadow("v1", False) for _ in range(50)] == [None] * 50
    assert guard.tripped is False


def test_one_trip_per_version_across_both_checks() -> None:
    guard = CanaryGuard(GuardPolicy(window=3, max_error_rate=0.1, min_agreement=0.9))
    assert [guard.record_canary("v1", True) for _ in range(3)] == [None, None, "guard_error_rate"]
    # the agreement check is also broken, but v1 already tripped
    assert [guard.record_shadow("v1", False) for _ in range(5)] == [None] * 5


def test_a_new_canary_version_resets_the_windows_and_the_trip() -> None:
    guard = CanaryGuard(GuardPolicy(window=4, max_error_rate=0.1, min_agreement=0.9))
    assert [guard.record_canary("v1", True) for _ in range(4)] == [None, None, None, "guard_error_rate"]
    guard.record_shadow("v1", False)
    assert guard.tripped is True
    # v2: windows start empty, so 3 errors are not yet a verdict
    assert [guard.record_canary("v2", True) for _ in range(3)] == [None] * 3
    assert guard.version == "v2" and guard.tripped is False
    assert list(guard.errors) == [True] * 3 and list(guard.agreements) == []
    assert guard.record_canary("v2", True) == "guard_error_rate"
    # switching back to v1 is a new canary too: it may trip again
    assert [guard.record_shadow("v1", False) for _ in range(4)] == [None, None, None, "guard_agreement"]


def test_shadow_results_for_a_new_version_clear_the_error_window() -> None:
    guard = CanaryGuard(GuardPolicy(window=3, max_error_rate=0.1))
    guard.record_canary("v1", True)
    guard.record_canary("v1", True)
    guard.record_shadow("v2", True)  # new version seen through the shadow path
    assert list(guard.errors) == []
    assert [guard.record_canary("v2", True) for _ in range(3)] == [None, None, "guard_error_rate"]
