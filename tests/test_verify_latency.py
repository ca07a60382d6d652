"""Latency measurement: interleaving, percentiles, torch.compile failures, Core ML availability."""
from __future__ import annotations

import sys

import pytest
import torch

from compressadvise.measure import latency as L
from test_verify_models import Scores


def test_percentile_interpolates():
    assert L.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert L.percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)  # 3 + 0.7 * (4 - 3)
    assert L.percentile([5.0], 90) == 5.0


def test_repetitions_are_interleaved_and_alternate():
    order: list[str] = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = L.time_interleaved(calls, reps=4, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B / B A
    assert [len(v) for v in times.values()] == [4, 4] and all(t >= 0 for v in times.values() for t in v)


def test_measure_records_threads_and_memory():
    rep = L.measure({"original": Scores(), "compressed": Scores()}, (torch.randn(1, 3),), reps=3, warmup=1)
    assert rep.label == "measured" and rep.threads == torch.get_num_threads() and rep.device == "cpu"
    t = rep.get("compressed")
    assert t.mode == "eager" and t.reps == 3 and t.peak_rss_delta_mb is not None and t.peak_rss_delta_mb >= 0
    assert rep.best("original") is rep.get("original")


def test_compile_failure_is_reported_not_raised(monkeypatch):
    def no_compiler(*_a, **_k):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    rep = L.measure({"original": Scores()}, (torch.randn(1, 3),), reps=2, warmup=0, compile=True, memory=False)
    assert rep.notes == ["original: torch.compile unavailable: no working C++ compiler found"]
    assert [t.mode for t in rep.timings["original"]] == ["eager"]


@pytest.mark.skipif(sys.platform == "darwin", reason="the message is for machines without Core ML")
def test_coreml_timing_says_plainly_it_is_unavailable_here():
    ok, why = L.coreml_available()
    assert not ok and "on-device timing is unavailable here" in why
    from compressadvise.errors import Unavailable

    with pytest.raises(Unavailable, match="unavailable here"):
        L.coreml_timing("model.mlpackage", {})
