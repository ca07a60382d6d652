"""The unchanged prefix runs once per layer (issue 23, items 1-2): suffix-only passes give the same
results as full passes, and the cost is counted in forward-pass equivalents."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from compressadvise.measure.executors import make_executor
from compressadvise.measure.sensitivity import Setting, measure, prepare
from compressadvise.measure.sensitivity_suffix import SuffixRunner
from compressadvise.model.samples import Samples


def randn(*shape: int) -> Samples:
    return Samples([torch.randn(*shape, generator=torch.Generator().manual_seed(0))], source="test", kind="file")


class Residual(nn.Module):
    """A branch and a skip: the frontier of `body.1` holds the skip value as well as its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.body(h)
        return self.head(h.flatten(1))


def settings(prep) -> list[dict[str, Setting]]:
    pal = [Setting.of("palettization", nbits=b, granularity="per_tensor") for b in (2, 4)]
    return [{layer: s} for layer in prep.weights for s in pal]


@pytest.fixture(scope="module")
def prep():
    model = Residual().eval()
    return prepare(model, randn(16, 3, 8, 8), max_samples=16)


def test_suffix_passes_equal_full_passes(prep):
    items = settings(prep)
    ctx_fast, ctx_full = prep.context(proxies=False), prep.context(proxies=False)
    ctx_full.suffix = False
    from compressadvise.measure.sensitivity_eval import evaluate

    for item in items:
        raw = {"assign": {k: v.to_dict() for k, v in item.items()}}
        fast, full = evaluate(ctx_fast, raw), evaluate(ctx_full, raw)
        assert fast["cost"]["suffix"] == 1.0 and full["cost"]["suffix"] == 0.0
        for key, value in full["metrics"].items():
            assert fast["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (item, key)


def test_the_suffix_of_a_layer_is_what_depends_on_it(prep):
    runner = SuffixRunner(prep.model, prep.context(proxies=False).macs)
    body = runner.suffix("body.2.weight")
    names = {str(n.target) for n in body.nodes if n.op == "call_module"}
    assert names == {"body.2", "head"}  # not the stem, not the first body conv
    assert {n.name for n in body.frontier} >= {"relu"}  # the skip value feeds the add after the branch
    assert 0 < body.share < runner.suffix("stem.weight").share == 1.0


def test_cost_counts_one_prefix_pass_for_the_run_and_suffix_shares(prep):
    items = settings(prep)
    results, ran, _ = measure(prep, items, executor=make_executor("serial"), proxies=False)
    passes = sum(r["cost"]["passes"] for r in results)
    runner = SuffixRunner(prep.model, prep.context(proxies=False).macs)
    shares = [runner.suffix(prep.weights[next(iter(item))]).share for item in items]
    assert ran == len(items) == 2 * len(prep.weights)
    # one pass computes every layer's prefix (up to the deepest one: 1 - its suffix share), then
    # each setting costs its layer's suffix share; one prefix pass per layer would cost more
    assert passes == pytest.approx(1.0 - min(shares) + sum(shares))
    per_layer = sum(1.0 - runner.suffix(w).share for w in prep.weights.values())
    assert passes < per_layer + sum(shares)
    assert all(r["cost"]["suffix"] == 1.0 for r in results)


def test_one_pass_keeps_every_frontier_and_each_suffix_matches_its_own_prefix(prep):
    weights = list(prep.weights.values())
    batches = [tuple(t[i:i + 5] for t in prep.samples.inputs) for i in range(0, 16, 5)]  # 4 batches, last short
    together = SuffixRunner(prep.model, prep.context(proxies=False).macs)
    cost = together.prefixes(weights, batches)
    assert cost == pytest.approx(1.0 - min(together.suffix(w).share for w in weights))
    assert together.prefixes(weights, batches) == 0.0  # kept: nothing runs again
    alone = SuffixRunner(prep.model, prep.context(proxies=False).macs)
    params = dict(prep.model.named_parameters())
    for w in weights:
        assert together.has(w) and alone.prefix(w, batches)
        saved = params[w].detach().clone()
        with torch.no_grad():
            params[w].mul_(0.5)  # what a compressed weight does: the suffix sees it, the prefix not
            expected = torch.cat([prep.model(*b) for b in batches])
        try:
            for got in (torch.cat(together.run_suffix(w)), torch.cat(alone.run_suffix(w))):
                assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), w
        finally:
            with torch.no_grad():
                params[w].copy_(saved)


def test_frontiers_over_the_bound_are_not_kept_together(prep):
    runner = SuffixRunner(prep.model, prep.context(proxies=False).macs, max_bytes=16)
    batches = [tuple(t[:4] for t in prep.samples.inputs)]
    assert runner.prefixes(list(prep.weights.values()), batches) > 0.0  # the pass ran (and is counted)
    assert not any(runner.has(w) for w in prep.weights.values())


def test_an_untraceable_model_runs_full_passes():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return -self.fc(x)

    prep = prepare(Branchy().eval(), randn(8, 64), max_samples=8)
    (r,), _, _ = measure(prep, [{"fc": Setting.of("palettization", nbits=4, granularity="per_tensor")}],
                         executor=make_executor("serial"), proxies=False)
    assert r["cost"] == {"passes": 1.0, "suffix": 0.0}


def test_a_frontier_over_the_memory_bound_falls_back(prep):
    runner = SuffixRunner(prep.model, max_bytes=16)
    batches = [tuple(t[:4] for t in prep.samples.inputs)]
    assert runner.prefix("head.weight", batches) is False
    with pytest.raises(LookupError):
        runner.run_suffix("head.weight")


def test_an_in_process_run_keeps_no_frontier_after_it_ends(prep):
    from compressadvise.measure import sensitivity_eval

    measure(prep, settings(prep)[:2], executor=make_executor("serial"), proxies=False)
    assert "runner" not in sensitivity_eval._STATE  # up to the memory bound of activations, released
