"""Benchmark 1's timing protocol (issue 18): every configuration is warmed up, and rounds rotate.

Before, the largest size of each table timed the default-thread call first with no warm-up, so
that row carried the cold start (imports, first-touch allocations, thread pools). These tests
check the protocol itself on counting stubs, without timing anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import _common, bench_speed


def _logging(log: list[str], name: str):
    def fn() -> str:
        log.append(name)
        return name

    return fn


def test_alternate_warms_every_function_then_rotates_the_order():
    log: list[str] = []
    fns = {k: _logging(log, k) for k in "abc"}
    times, outs, _ = _common.alternate(fns, 4, warmup=1, rotate=True)
    assert log[:3] == ["a", "b", "c"]  # the untimed warm-up: every function once before any timed call
    rounds = [log[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {k: len(v.values) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert outs == {"a": "a", "b": "b", "c": "c"}
    # without rotate, the former fixed order (other benchmarks rely on it)
    log.clear()
    _common.alternate(fns, 2, warmup=0)
    assert log == ["a", "b", "c", "a", "b", "c"]


def test_every_size_of_benchmark_1_is_warmed_up_and_rotated(monkeypatch):
    calls: list[dict[str, Any]] = []
    real = _common.alternate

    def recording(fns, repeats, **kw):
        calls.append({"names": list(fns), "repeats": repeats, **kw})
        return real(fns, repeats, **kw)

    def case(label: str, quick: bool):
        out = (1.0, [np.ones(3)])
        return 3, {"reference": lambda: out, "torch": lambda: out}

    monkeypatch.setattr(bench_speed, "alternate", recording)
    monkeypatch.setattr(bench_speed, "rss_probe", lambda *a, **k: 0.0)  # no subprocess for the memory probe
    monkeypatch.setattr(bench_speed, "CASES", {"stub": (case, lambda quick: {"small": 1, "large": 2})})
    monkeypatch.setattr(bench_speed, "ROUNDS", 2)
    rows = bench_speed.bench("stub", False)
    assert [r["model"] for r in rows] == ["small", "large"]
    assert len(calls) == 2
    for call in calls:  # the largest size too (it used to be timed cold)
        assert call["warmup"] >= 1 and call["rotate"] is True
        assert call["names"] == ["reference", "torch", "reference@1", "torch@1"]
    assert [c["repeats"] for c in calls] == [2, 1]
