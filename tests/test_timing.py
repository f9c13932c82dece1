"""runtime.timing: the one interleaved timer every benchmark measures through."""

from __future__ import annotations

import pytest

from runtime import timing


def test_round_order_rotates_alternates_or_stays_fixed():
    names = ["a", "b", "c"]
    assert [timing.round_order(names, r) for r in range(3)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]
    ]  # fmt: skip
    assert timing.round_order(names, 1, "alternate") == ["c", "b", "a"]
    assert timing.round_order(names, 1, "fixed") == names
    with pytest.raises(ValueError, match="unknown order"):
        timing.round_order(names, 0, "random")


def test_interleaved_times_every_input_every_round_and_keeps_round_zero_outputs():
    calls = []

    def make(name):
        def fn(x):
            calls.append((name, x))
            return x * 10

        return fn

    t = timing.interleaved({"a": make("a"), "b": make("b")}, [1, 2], rounds=3, warmup=1)
    assert {n: len(v) for n, v in t.ns.items()} == {"a": 6, "b": 6}
    assert t.outputs == {"a": [10, 20], "b": [10, 20]}
    assert calls[:2] == [("a", 1), ("b", 1)]  # warm-up first
    timed = [c[0] for c in calls[2:]]
    assert timed == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert set(t.stats()) == {"a", "b"} and t.stats()["a"]["frames"] == 6


def test_interleaved_per_system_inputs_and_blocks_of_calls():
    seen = {"a": 0, "b": 0}

    def count(name):
        def fn(x):
            seen[name] += 1
            return x

        return fn

    t = timing.interleaved(
        {"a": count("a"), "b": count("b")}, {"a": ["x"], "b": ["y", "z"]}, rounds=2, warmup=0,
        calls=5,
    )  # fmt: skip
    assert seen == {"a": 2 * 5, "b": 2 * 2 * 5}
    assert t.outputs == {"a": ["x"], "b": ["y", "z"]}
    assert set(t.median_round_ms()) == {"a", "b"}


def test_interleaved_needs_rounds_and_inputs():
    with pytest.raises(ValueError, match="needs rounds"):
        timing.interleaved({"a": abs}, [], rounds=1)
    with pytest.raises(ValueError, match="needs rounds"):
        timing.interleaved({"a": abs}, [1], rounds=0)
