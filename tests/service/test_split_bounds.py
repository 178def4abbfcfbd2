"""The A/B split's bucket ranges: independent of the order the weights came in, and with two arms any change
of weights moves users only into the arm that grew (checked bucket by bucket, over random weights)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.registry import SPLIT_BUCKETS, Routing, bucket, split_bounds


def arm_of(bounds: list[tuple[int, str]], b: int) -> str:
    return next(version for upper, version in bounds if b < upper)


def assignment(weights: dict[str, float]) -> list[str]:
    """The arm of every bucket under these weights."""
    bounds = split_bounds(weights)
    return [arm_of(bounds, b) for b in range(SPLIT_BUCKETS)]


def moved_into(before: dict[str, float], after: dict[str, float]) -> dict[tuple[str, str], int]:
    """{(from arm, to arm): buckets} of the buckets whose arm changed."""
    moves: dict[tuple[str, str], int] = {}
    for old, new in zip(assignment(before), assignment(after), strict=True):
        if old != new:
            moves[(old, new)] = moves.get((old, new), 0) + 1
    return moves


@pytest.mark.parametrize("after", [{"v1": 80, "v2": 20}, {"v2": 20, "v1": 80}], ids=["same-order", "swapped-order"])
@pytest.mark.parametrize("before", [{"v1": 90, "v2": 10}, {"v2": 10, "v1": 90}], ids=["same-order", "swapped-order"])
def test_growing_an_arm_moves_users_only_into_it_whatever_the_key_order(before, after):
    moves = moved_into(before, after)
    assert moves == {("v1", "v2"): 1000}  # exactly the 10% that v2 gained, all from v1
    users = [f"user-{i}" for i in range(20_000)]
    old = Routing(arms=tuple(split_bounds(before)))
    new = Routing(arms=tuple(split_bounds(after)))
    # Routing.select works on (upper, model) pairs; version names stand in for loaded models here
    was = [old.select(u)[0] for u in users]
    now = [new.select(u)[0] for u in users]
    assert all(n == "v2" for w, n in zip(was, now, strict=True) if w == "v2")
    grown = sum(1 for w, n in zip(was, now, strict=True) if w == "v1" and n == "v2")
    assert 0.08 < grown / len(users) < 0.12


def test_the_ranges_do_not_depend_on_key_order():
    weights = {"v3": 25, "v1": 50, "v2": 25}
    assert split_bounds(weights) == split_bounds(dict(sorted(weights.items()))) == [
        (5000, "v1"), (7500, "v2"), (SPLIT_BUCKETS, "v3")]


def test_buckets_are_stable_and_in_range():
    assert bucket("user-1") == bucket("user-1")
    assert {bucket(f"u{i}") for i in range(5000)} <= set(range(SPLIT_BUCKETS))
    assert len({bucket(f"u{i}") for i in range(5000)}) > 3500  # spread, not a few hot buckets


weight = st.integers(min_value=1, max_value=99)


@given(v1_before=weight, v1_after=weight, names=st.permutations(["v1", "v2"]),
       order_before=st.booleans(), order_after=st.booleans())
def test_two_arm_changes_move_users_only_into_the_arm_that_grew(v1_before, v1_after, names, order_before,
                                                                order_after):
    a, b = names
    before = {a: v1_before, b: 100 - v1_before}
    after = {a: v1_after, b: 100 - v1_after}
    if order_before:
        before = dict(reversed(list(before.items())))
    if order_after:
        after = dict(reversed(list(after.items())))
    for (source, target), count in moved_into(before, after).items():
        assert after[target] > before[target], (before, after, source, target)
        assert after[source] < before[source]
        assert count <= round(abs(after[target] - before[target]) / 100 * SPLIT_BUCKETS) + 1


@given(st.dictionaries(st.sampled_from([f"v{i}" for i in range(1, 6)]), st.integers(1, 100), min_size=1,
                       max_size=5), st.randoms(use_true_random=False))
def test_any_split_covers_every_bucket_once_with_its_share(weights, rng):
    shuffled = list(weights.items())
    rng.shuffle(shuffled)
    bounds = split_bounds(dict(shuffled))
    assert bounds == split_bounds(weights)  # canonical
    uppers = [upper for upper, _ in bounds]
    assert uppers == sorted(uppers) and uppers[-1] == SPLIT_BUCKETS
    total = sum(weights.values())
    lower = 0
    for upper, version in bounds:
        assert abs((upper - lower) - weights[version] / total * SPLIT_BUCKETS) <= 1
        lower = upper


def test_bucket_values_are_pinned():
    """Workers of two releases must agree on every user's arm during a rolling deploy: the hash is a contract."""
    assert {u: bucket(u) for u in ["user-1", "u42", "新用户", ""]} == {"user-1": 3768, "u42": 1823, "新用户": 5243,
                                                                       "": 9876}


def test_a_user_on_a_range_boundary_takes_the_arm_above_it():
    assert (bucket("u6512"), bucket("u3075"), bucket("u40690")) == (8999, 9000, 0)
    routing = Routing(active="the-active", arms=tuple(split_bounds({"v1": 90, "v2": 10})))
    assert routing.select("u6512") == ("v1", "split")  # the last bucket of v1's range
    assert routing.select("u3075") == ("v2", "split")  # the first of v2's
    assert routing.select("u40690") == ("v1", "split")
    assert Routing(active="the-active").select("u3075") == ("the-active", "active")  # no split: the active one


def test_a_user_id_with_a_lone_surrogate_has_a_stable_bucket():
    """JSON can carry an unpaired surrogate (\\ud800): it still hashes (surrogatepass), the same every time."""
    assert bucket("\ud800x") == bucket("\ud800x") == 6728


def test_the_routing_names_the_active_version_and_every_arm():
    from types import SimpleNamespace

    v1, v2, v3 = (SimpleNamespace(version=v) for v in ("v1", "v2", "v3"))
    assert Routing(active=v1, arms=((5000, v2), (SPLIT_BUCKETS, v3))).versions() == {"v1", "v2", "v3"}
    assert Routing(active=v1).versions() == {"v1"} and Routing().versions() == set()


def test_the_loader_thread_runs_at_lowered_priority():
    import os
    import threading

    from service.registry import _lower_priority

    seen = []

    def loader():
        _lower_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=loader)
    thread.start()
    thread.join()
    assert seen == [10]  # nice 10: loading yields the cores to request handling
