"""The search measures only what the budget can choose (issue 23): predictions, pruning,
adaptive samples and the cost they save, on the bundled digits CNN (trained weights)."""
from __future__ import annotations

import math

import pytest
import torch

from compressadvise.knowledge.base import builtin
from compressadvise.measure.executors import SerialExecutor
from compressadvise.measure.sensitivity import (Cache, Measurement, Setting, candidate_layers, compress_weight,
                                                default_grid, measure, prepare, setting_bytes)
from compressadvise.measure.sensitivity_eval import evaluate, evaluate_group
from compressadvise.measure.sensitivity_proxy import squared_error
from compressadvise.plan import search_adaptive as sa
from compressadvise.plan.search import search


@pytest.fixture(scope="module")
def prep():
    return prepare(None, "bundled", max_samples=48)


def _heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # trained weights have heavier tails than a Gaussian
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


@pytest.mark.parametrize("setting, slack", [
    (Setting.of("palettization", nbits=4, granularity="per_tensor"), 1.6),
    (Setting.of("palettization", nbits=3, granularity="per_grouped_channel", group_size=8), 1.6),
    (Setting.of("palettization", nbits=2, granularity="per_grouped_channel", group_size=16), 1.6),
    # 6 values per centroid: Lloyd stops in a local optimum; an upper estimate (documented in the module)
    (Setting.of("palettization", nbits=6, granularity="per_grouped_channel", group_size=4), 8.0),
])
def test_predicted_palettization_error_is_near_the_librarys_exact_kmeans(setting, slack):
    """Lloyd's error is at least coremltools' exact 1-D k-means optimum and close to it."""
    w = _heavy_tailed(64, 96)
    library = float(((compress_weight(w, setting).double() - w.double()) ** 2).sum())
    fast = float(squared_error(w, setting).sum())
    assert 0.95 * library <= fast <= slack * library, (fast, library)


def test_linear_quantization_prediction_is_the_library_itself():
    w = _heavy_tailed(32, 64, seed=1)
    s = Setting.of("linear_quantization", nbits=4, granularity="per_channel")
    assert torch.equal(squared_error(w, s), (compress_weight(w, s).double() - w.double()) ** 2)


def _spy(monkeypatch) -> list[dict[str, list[Setting]]]:
    calls: list[dict[str, list[Setting]]] = []
    real = sa.sensitivity

    def spy(**kw):
        calls.append({layer: list(v) for layer, v in kw["candidates"].items() if v})
        return real(**kw)

    monkeypatch.setattr(sa, "sensitivity", spy)
    return calls


def test_a_dominated_setting_is_never_measured(prep, monkeypatch):
    calls = _spy(monkeypatch)
    res = search(prepared=prep, size_fraction=0.25, cache=Cache(enabled=False), executor=SerialExecutor())
    pr = res.pruning
    assert pr is not None and pr.dominated > 0 and pr.not_needed > 0
    assert pr.measured + pr.dominated + pr.not_needed == pr.predicted == pr.candidates
    k, layers = builtin(), {x.name: x for x in candidate_layers(prep.report)}
    measured = {(layer, s.key): s for c in calls for layer, v in c.items() for s in v}
    assert measured and len(measured) == pr.measured
    by_key = {s.key: s for s in default_grid(k=k)} | {s.key: s for s in measured.values()}
    checked = 0
    for (layer, key), s in measured.items():  # no other setting of the layer is no larger and clearly less damaging
        mine, p_mine = setting_bytes(k, layers[layer], s, 2.0), prep.predictions[(layer, key)]
        for (other_layer, other), p in prep.predictions.items():
            if other_layer == layer and other != key and other in by_key and p is not None:
                smaller = setting_bytes(k, layers[layer], by_key[other], 2.0) <= mine
                assert not (smaller and p * sa.DOMINANCE_MARGIN <= p_mine), (layer, key, other)
                checked += 1
    assert checked > pr.measured


def test_adaptive_search_costs_less_and_plans_as_well(prep, tmp_path):
    """Against measuring every pair on all samples: fewer evaluations and forward passes, the same
    quality of plan (measured PSNR of the chosen candidate within 0.5 dB); a rerun comes from the cache."""
    full = search(prepared=prep, size_fraction=0.25, cache=Cache(enabled=False), executor=SerialExecutor(),
                  measure_all=True)
    fast = search(prepared=prep, size_fraction=0.25, cache=Cache(tmp_path), executor=SerialExecutor())
    again = search(prepared=prep, size_fraction=0.25, cache=Cache(tmp_path), executor=SerialExecutor())
    assert again.evaluations["single_layer"] == 0 and again.chosen.assignment == fast.chosen.assignment
    assert full.pruning is None and fast.pruning is not None
    assert fast.evaluations["single_layer"] < full.evaluations["single_layer"]
    assert fast.forward_passes < full.forward_passes
    assert fast.chosen.fits
    assert fast.chosen.measured["psnr_db"] >= full.chosen.measured["psnr_db"] - 0.5
    assert 0 < fast.pruning.first_samples < fast.pruning.all_samples == prep.n
    assert fast.pruning.proxy_spearman is not None and fast.pruning.proxy_spearman > 0.5


def test_first_samples_cost_their_share_of_a_pass(prep):
    """A measurement on the first n0 samples costs n0/n forward-pass equivalents (full passes) and
    records how many samples it used; it is cached under its own samples hash."""
    layer = candidate_layers(prep.report)[1].name
    item = [{layer: Setting.of("linear_quantization", nbits=4, granularity="per_channel")}]
    prep.suffix = False
    try:
        part, ran, _ = measure(prep, item, executor=SerialExecutor(), samples=16, proxies=False)
        whole, _, _ = measure(prep, item, executor=SerialExecutor(), proxies=False)
    finally:
        prep.suffix = True
    assert ran == 1 and part[0]["samples"] == 16 and whole[0]["samples"] == prep.n
    assert math.isclose(part[0]["cost"]["passes"], 16 / prep.n) and math.isclose(whole[0]["cost"]["passes"], 1.0)
    assert prep.samples_hash(16) != prep.samples_hash()
    se = part[0]["metrics"]["output_mse_se"]
    assert 0 < se < part[0]["metrics"]["output_mse"]


def test_a_group_task_gives_what_single_items_give(prep):
    """On a pool a layer's settings travel as one task (one prefix); the results are the same."""
    ctx = prep.context(proxies=False)
    layer = candidate_layers(prep.report)[0].name
    assigns = [{layer: Setting.of("palettization", nbits=n, granularity="per_tensor").to_dict()} for n in (2, 4)]
    grouped = evaluate_group(ctx, {"assigns": assigns})["results"]
    single = [evaluate(ctx, {"assign": a}) for a in assigns]
    assert [g["metrics"] for g in grouped] == [s["metrics"] for s in single]


def _m(mse: float, se: float) -> Measurement:
    return Measurement(layer="l", setting="x", label="x", technique="palettization", params={}, bytes=1,
                       metrics={"output_mse": mse, "output_mse_se": se}, proxies={})


def test_close_calls_are_the_ones_within_noise():
    assert sa._close(_m(1.0, 0.2), _m(1.3, 0.2))  # 0.3 < 2 * 0.28
    assert not sa._close(_m(1.0, 0.05), _m(1.3, 0.05))
    assert not sa._worse(_m(1.3, 0.2), _m(1.0, 0.2))  # within noise: no contradiction
    assert sa._worse(_m(5.0, 0.1), _m(1.0, 0.1))


def test_first_samples_then_all_samples_in_one_process(prep):
    """A layer measured on the first samples and then on all in the same process: the second
    measurement reruns the prefix for all samples (a cached prefix of the first samples is never
    reused), so it equals a measurement made on its own."""
    layer = candidate_layers(prep.report)[2].name
    item = [{layer: Setting.of("linear_quantization", nbits=4, granularity="per_channel")}]
    alone, _, _ = measure(prep, item, executor=SerialExecutor(), proxies=False)
    for _ in range(3):  # new contexts may reuse a freed one's id
        measure(prep, item, executor=SerialExecutor(), samples=16, proxies=False)
        after, _, _ = measure(prep, item, executor=SerialExecutor(), proxies=False)
        assert after[0]["metrics"] == alone[0]["metrics"] and after[0]["samples"] == prep.n


def test_a_pair_the_library_leaves_alone_is_left_out_and_said(monkeypatch):
    """A (layer, setting) whose prediction finds the library leaves the weight uncompressed is not a
    candidate, and the search says so in its notes."""
    from compressadvise.errors import CompressionFailed
    from compressadvise.measure import sensitivity_proxy

    real = sensitivity_proxy.squared_error

    def refuse_2bit(w, s, seed=0):
        if s.technique == "palettization" and s.p.get("nbits") == 2:
            raise CompressionFailed(f"{s.label}: the backend left a weight uncompressed (a silent no-op)")
        return real(w, s, seed)

    monkeypatch.setattr(sensitivity_proxy, "squared_error", refuse_2bit)
    fresh = prepare(None, "bundled", max_samples=48)
    res = search(prepared=fresh, size_fraction=0.25, cache=Cache(enabled=False), executor=SerialExecutor())
    assert res.pruning.predicted < res.pruning.candidates
    assert all("2-bit palettization" not in c.setting for c in res.layers)
    assert any("2-bit palettization" in n and "left out of the search" in n for n in res.notes)


def test_the_latency_memo_gives_the_same_table_and_estimates_each_pair_once(prep, monkeypatch):
    from compressadvise.measure import estimate
    from compressadvise.plan.search_space import _latency_table

    k = builtin()
    x = next(x for x in candidate_layers(prep.report) if x.macs)
    grid = [Setting.of("palettization", nbits=4, granularity="per_tensor"),
            Setting.of("linear_quantization", nbits=8, granularity="per_channel")]
    plain = _latency_table(prep.report, k, "ane-a17", 18, x, grid, 2.0)
    calls = []
    real = estimate.estimate_layer
    monkeypatch.setattr(estimate, "estimate_layer", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    memo: dict = {}
    assert _latency_table(prep.report, k, "ane-a17", 18, x, grid, 2.0, memo=memo) == plain
    assert _latency_table(prep.report, k, "ane-a17", 18, x, grid[:1], 2.0, memo=memo) == {grid[0]: plain[grid[0]]}
    assert len(calls) == len(grid)  # the second table came from the memo
